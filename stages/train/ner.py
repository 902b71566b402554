"""Sequence labelling pieces shared by NER heads: the CRF, entity-level metrics, and the
batch assembly from cached token features.

CRF: ``pytorch-crf`` (``torchcrf.CRF``, the library VEC-MNER itself uses), over words:
the emission of a word is the state of its first word piece (first-piece labelling), so
the CRF never sees the other pieces and no ``X`` tag is needed.

Metric: seqeval's ``classification_report`` in its default (conlleval) mode, which is
what VEC-MNER, DeepKE and UMT report: an orphan ``I-X`` starts an entity.  Entity-level
micro P/R/F1 plus a per-type table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class WordCRF(nn.Module):
    """A linear-chain CRF over words; ``mask`` marks real words (left-aligned)."""

    def __init__(self, n_tags: int):
        super().__init__()
        from torchcrf import CRF

        self.crf = CRF(n_tags, batch_first=True)

    @staticmethod
    def _safe(mask: torch.Tensor) -> torch.Tensor:
        # pytorch-crf wants the first step of every sequence on; an empty sentence cannot
        # occur (readers refuse them) but a batch may be padded with one: keep step 0 on
        m = mask.bool().clone()
        m[:, 0] = True
        return m

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood over the sentences of the batch."""
        tags = tags.clamp(min=0)
        return -self.crf(emissions.float(), tags, self._safe(mask), reduction="mean")

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Viterbi paths, padded with -1 where ``mask`` is off: ``[B, W]``."""
        paths = self.crf.decode(emissions.float(), self._safe(mask))
        out = torch.full(mask.shape, -1, dtype=torch.long, device=emissions.device)
        lens = mask.bool().sum(1).tolist()
        for b, p in enumerate(paths):
            n = int(lens[b])
            out[b, :n] = torch.tensor(p[:n], dtype=torch.long, device=emissions.device)
        return out


def ner_metrics(gold: list[list[int]], pred: list[list[int]], labels: list[str]) -> dict:
    """Entity-level micro P/R/F1 and a per-type table (fractions), seqeval default
    (conlleval) mode, over tag-id sequences; ``labels`` maps ids to BIO tags."""
    from seqeval.metrics import classification_report

    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tag sequences differ in shape")
    g = [[labels[int(t)] for t in s] for s in gold]
    p = [[labels[int(t)] for t in s] for s in pred]
    rep = classification_report(g, p, output_dict=True, zero_division=0) if any(g) else {}
    micro = rep.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
    types = {
        k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]), "support": int(v["support"])}
        for k, v in rep.items()
        if k not in ("micro avg", "macro avg", "weighted avg")
    }
    n_tok = sum(len(s) for s in g)
    acc = sum(int(a == b) for gs, ps in zip(g, p) for a, b in zip(gs, ps)) / n_tok if n_tok else 0.0
    return {
        "n": len(g),
        "acc": acc,  # token accuracy, for the trainer's log only
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "support": int(micro["support"]),
        "per_type": types,
        "per_label": types,  # the name the report reads (entity types here)
    }


#: word-shape classes fed to NER heads that use ``shape`` features (the frozen MiniLM is
#: uncased, so capitalisation would otherwise be lost)
SHAPES = ("pad", "lower", "Title", "UPPER", "mixed", "digit", "punct", "@user", "#tag", "url", "other")


def word_shape(w: str) -> int:
    if w.startswith("@") and len(w) > 1:
        return SHAPES.index("@user")
    if w.startswith("#") and len(w) > 1:
        return SHAPES.index("#tag")
    if w.startswith(("http://", "https://", "www.")):
        return SHAPES.index("url")
    letters = [c for c in w if c.isalpha()]
    if not letters:
        if any(c.isdigit() for c in w):
            return SHAPES.index("digit")
        return SHAPES.index("punct") if w.strip() else SHAPES.index("other")
    if all(c.islower() for c in letters):
        return SHAPES.index("lower")
    if all(c.isupper() for c in letters):
        return SHAPES.index("UPPER") if len(letters) > 1 else SHAPES.index("Title")
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return SHAPES.index("Title")
    return SHAPES.index("mixed")


@dataclass
class NerData:
    """The NER counterpart of ``stages.train.data.TrainData``: built once per run,
    batches gathered by manifest row.  The batch:

    ==========  ============  ===============================================
    sent_word   [B, P, D]     word-piece states (all pieces, CLS/SEP included)
    sent_mask   [B, P] bool
    first       [B, W] long   first piece of each word
    first_mask  [B, W] bool   real (and not cut off) words
    shape       [B, W] long   word-shape class (``SHAPES``)
    label       [B, W] long   tag ids, -100 on padding
    cap_word    [B, C, D]     caption pieces of the tweet's image (optional)
    cap_mask    [B, C] bool
    index       [B] long      manifest row
    ==========  ============  ===============================================
    """

    task: str
    labels: list[str]
    records: list[dict]
    splits: dict[str, torch.Tensor]
    sent: object  # stages.train.data.Ragged
    first: object  # Ragged of [n_words] int64
    tags: object  # Ragged of [n_words] int64
    shape: object  # Ragged of [n_words] int64
    cap: object | None
    text_levels: int = 1
    cache_keys: dict = field(default_factory=dict)
    modalities: dict = field(default_factory=dict)
    pretrained: dict = field(default_factory=dict)  # {"text_top": (meta, state)} with text.cut > 0
    models: dict = field(default_factory=dict)  # model identities (hub ids with their commit sha)
    cap_levels: object | None = None  # a memory-reading tuned top's frozen caption states (TopHead.prepare_data)

    @property
    def dims(self) -> dict[str, int]:
        d = {"sent_word": int(self.sent.flat.shape[-1]), "text_levels": self.text_levels}
        if "text_top" in self.pretrained:
            from .tuned_top import top_dims

            d.update(top_dims(self.pretrained["text_top"][0]))
        if self.cap is not None:
            d["cap_word"] = int(self.cap.flat.shape[-1])
        return d

    @property
    def lengths(self) -> torch.Tensor:
        """Per-record sentence length in pieces (for length-bucketed batches)."""
        return self.sent.off[1:] - self.sent.off[:-1]

    def label_text(self, ids: list[int]) -> str:
        """A tag-id sequence as space-separated BIO tags (predictions.parquet)."""
        return " ".join(self.labels[int(i)] for i in ids)

    def gold(self, split: str) -> list[list[int]]:
        return [list(self.records[i]["tag_ids"]) for i in self.splits[split].tolist()]

    def batch(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        sw, sm = self.sent.pad(rows)
        first, fm = self.first.pad(rows)
        tags, _ = self.tags.pad(rows)
        shape, _ = self.shape.pad(rows)
        fm = fm & (first[..., 0] >= 0)
        b = {
            "sent_word": sw.to(dtype), "sent_mask": sm,
            "first": first[..., 0].clamp(min=0), "first_mask": fm,
            "shape": shape[..., 0], "label": tags[..., 0].masked_fill(~fm, -100), "index": rows,
        }
        if self.cap is not None:
            cw, cm = self.cap.pad(rows)
            b.update(cap_word=cw.to(dtype), cap_mask=cm)
            if self.cap_levels is not None:
                b["cap_levels"] = self.cap_levels.pad(rows)[0].to(dtype)
        return b

    def decode(self, batch: dict, pred: torch.Tensor) -> list[list[int]]:
        """Per-sample tag ids for every word of the record (words past ``max_len``,
        never seen by the model, count as ``O``)."""
        out = []
        for j, i in enumerate(batch["index"].tolist()):
            n = len(self.records[i]["tokens"])
            row = [max(int(t), 0) for t in pred[j, :n].tolist()]
            out.append(row + [0] * (n - len(row)))
        return out


def build_ner_data(settings, mllm: str, inputs: dict) -> NerData:
    """Token features of every split for one caption source (``none`` = text only), from the resolved inputs."""
    from pipeline.errors import PipelineError
    from stages.data import get_task
    from stages.features.text import caption_item_key, tokens_item_key

    from .data import Ragged, model_ids

    ds, captions, feats = inputs["data"], inputs["captions"], inputs["text_features"]
    records = ds.records.to_pylist()
    task = get_task(settings)
    cache = feats.cache
    keys = [tokens_item_key(r["tokens"]) for r in records]
    uniq = list(dict.fromkeys(keys))
    rows = {r["item_key"]: r for r in cache.rows(uniq) if r is not None}
    bad = next((i for i, k in enumerate(keys) if k not in rows or not rows[k]["ok"]), None)
    if bad is not None:
        raise PipelineError(f"record {records[bad]['sample_id']}: token features missing or failed in {cache.dir}")
    sent = Ragged(*cache.ragged(keys, "word"))
    dim = int(sent.flat.shape[-1])
    col = lambda xs: Ragged.from_list([torch.tensor(x, dtype=torch.int64).view(-1, 1) for x in xs], 1)  # noqa: E731
    first = col([rows[k]["word_first"] for k in keys])
    tags = col([r["tag_ids"] for r in records])
    shape = col([[word_shape(t) for t in r["tokens"]] for r in records])
    texts = [captions.for_record(r) for r in records]
    cap = None
    if any(texts):
        ckeys = [caption_item_key(t) if t else None for t in texts]
        cu = list(dict.fromkeys(k for k in ckeys if k))
        crow = {r["item_key"]: r for r in cache.rows(cu) if r is not None and r["ok"]}
        cu = [k for k in cu if k in crow]
        cap = Ragged(*cache.ragged([k if k in crow else None for k in ckeys], "word", dim, sent.flat.dtype))
    splits: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        splits.setdefault(r["split"], []).append(i)
    levels = len(settings.section("text").get("layers", [-1]))
    modalities = {"text": True, "caption": mllm if cap is not None else None,
                  "caption_coverage": sum(bool(t) for t in texts) / max(1, len(texts)), "image": False}
    from .tuned_top import load_top

    top = load_top(cache.files_dir)
    if feats.stage.conf["cut"] and top is None:
        raise PipelineError(f"text.cut = {feats.stage.conf['cut']} but {cache.files_dir} has no top_layers; re-run features")
    return NerData(settings.task, list(task.labels(settings)), records,
                   {k: torch.tensor(v, dtype=torch.int64) for k, v in splits.items()},
                   sent, first, tags, shape, cap, levels,
                   {"data": ds.key, "captions": captions.cache.key, "text_features": cache.key}, modalities,
                   {"text_top": top} if top else {}, model_ids(feats, captions))
