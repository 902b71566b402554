"""Training data from cached features only: the RE batch format (see ``stages.train``).

``build_re_data(settings, mllm)`` runs the upstream chain (data → captions → text
features; all cached, so cheap and without loading any model when nothing is new),
then gathers every feature it needs ONCE from the memory-mapped safetensors parts
(``StageCache.tensors``) into contiguous tensors: ragged word-piece states are kept
flat with offsets (no padding in memory) and padded per batch by a vectorised gather.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from pipeline.config import Settings
from pipeline.errors import PipelineError

log = logging.getLogger("camim")


def tensor_bytes(obj) -> int:
    """The bytes of every tensor reachable from ``obj`` (dataclasses, dicts, lists, tuples), each
    storage counted once (records that share a caption share its rows): what a run's data holds."""
    import dataclasses

    seen: set[int] = set()
    total = 0
    todo = [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            todo.extend(getattr(o, f.name) for f in dataclasses.fields(o))
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return total


@dataclass
class Ragged:
    """Variable-length rows kept flat: row i is ``flat[off[i]:off[i+1]]``.  With ``index``, row i
    is stored row ``index[i]`` instead (records that share one caption share its rows)."""

    flat: torch.Tensor  # [P, D]
    off: torch.Tensor  # [N + 1] int64
    index: torch.Tensor | None = None  # [M] int64: record -> stored row

    @classmethod
    def from_list(cls, rows: list[torch.Tensor], dim: int) -> "Ragged":
        lens = torch.tensor([int(r.shape[0]) for r in rows], dtype=torch.int64)
        off = torch.zeros(len(rows) + 1, dtype=torch.int64)
        off[1:] = lens.cumsum(0)
        flat = torch.cat(rows, 0) if rows else torch.zeros(0, dim)
        return cls(flat.contiguous(), off)

    def shared(self, ids: torch.Tensor) -> "Ragged":
        """These rows, one per distinct item, read per record through ``ids`` (-1: none, an empty row
        appended here), so records that share a caption never copy its states."""
        off = torch.cat([self.off, self.off[-1:]])
        return Ragged(self.flat, off, torch.where(ids >= 0, ids, len(self.off) - 1))

    def pad(self, rows: torch.Tensor, min_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``rows`` as a padded ``[B, L, D]`` tensor and its ``[B, L]`` bool mask."""
        if self.index is not None:
            rows = self.index[rows]
        start = self.off[rows]
        lens = self.off[rows + 1] - start
        width = max(int(lens.max()) if len(rows) else 0, min_len)
        pos = torch.arange(width)
        mask = pos[None, :] < lens[:, None]
        gi = torch.where(mask, start[:, None] + pos[None, :], torch.zeros((), dtype=torch.int64))
        if self.flat.shape[0] == 0:
            return torch.zeros(len(rows), width, self.flat.shape[1], dtype=self.flat.dtype), mask
        out = self.flat[gi]
        out = out * mask[..., None].to(out.dtype)
        return out, mask


@dataclass
class TrainData:
    """Everything a trainer needs; built once per run, batches gathered by index."""

    task: str
    labels: list[str]
    records: list[dict]
    splits: dict[str, torch.Tensor]  # split name -> record indices
    label: torch.Tensor  # [N]
    sent: Ragged
    sent_vec: torch.Tensor
    ents: torch.Tensor  # [N, 4] h_start, h_end, t_start, t_end piece indices
    cap: Ragged
    cap_vec: torch.Tensor
    has_cap: torch.Tensor
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
    cache_keys: dict[str, str] = field(default_factory=dict)
    modalities: dict[str, object] = field(default_factory=dict)
    text_levels: int = 1  # encoder levels concatenated in every word-piece vector
    # pretrained weights a head may start from, read from the cache: {"text_top": (meta, state)}
    pretrained: dict = field(default_factory=dict)
    # the models behind the features, as they enter cache keys (hub ids with their commit sha)
    models: dict = field(default_factory=dict)
    # a memory-reading tuned top's frozen caption states: cached by the text features (``text.memory``),
    # else derived once per run by the head (TopHead.prepare_data); one stored row per distinct caption
    cap_levels: Ragged | None = None
    # per record, which distinct caption it carries (-1: none); records of one image share one
    cap_id: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """Per-record sentence length in pieces (for length-bucketed batches)."""
        return self.sent.off[1:] - self.sent.off[:-1]

    @property
    def dims(self) -> dict[str, int]:
        d = {"sent_word": int(self.sent.flat.shape[-1]), "sent_vec": int(self.sent_vec.shape[-1])}
        if self.text_levels > 1:
            d["text_levels"] = self.text_levels
        if "text_top" in self.pretrained:
            from .tuned_top import top_dims

            d.update(top_dims(self.pretrained["text_top"][0]))
        if bool(self.has_cap.any()):
            d["cap_word"] = int(self.cap.flat.shape[-1])
            d["cap_vec"] = int(self.cap_vec.shape[-1])
        for name, t in self.streams.items():
            if t.is_floating_point():
                d[name] = int(t.shape[-1])
        return d

    def gold(self, split: str) -> list[int]:
        return self.label[self.splits[split]].tolist()

    def batch(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The RE batch for manifest rows ``rows`` (a LongTensor)."""
        sw, sm = self.sent.pad(rows)
        cw, cm = self.cap.pad(rows)
        ents = self.ents[rows]
        b = {
            "sent_word": sw.to(dtype),
            "sent_mask": sm,
            "sent_vec": self.sent_vec[rows].to(dtype),
            "h_idx": ents[:, 0],
            "h_end": ents[:, 1],
            "t_idx": ents[:, 2],
            "t_end": ents[:, 3],
            "label": self.label[rows],
            "index": rows,
        }
        if "cap_word" in self.dims:
            b.update(cap_word=cw.to(dtype), cap_mask=cm, cap_vec=self.cap_vec[rows].to(dtype), has_cap=self.has_cap[rows])
            if self.cap_levels is not None:
                b["cap_levels"] = self.cap_levels.pad(rows)[0].to(dtype)
        for name, t in self.streams.items():
            v = t[rows]
            b[name] = v.to(dtype) if v.is_floating_point() else v
        return b


def _check_streams(name: str, out: dict, n: int) -> dict[str, torch.Tensor]:
    pairs = {"img_vec": "has_img", "obj_vec": "obj_mask", "trans_vec": "has_trans", "trans_obj_vec": "trans_obj_mask"}
    for k, t in out.items():
        if not isinstance(t, torch.Tensor) or t.shape[0] != n:
            raise PipelineError(f"feature stream {name!r}: tensor {k!r} must be a tensor with first dimension {n}")
    for vec, mask in pairs.items():
        if vec in out and mask not in out:
            raise PipelineError(f"feature stream {name!r}: {vec!r} comes without its mask {mask!r}")
        if vec in out:
            out[mask] = out[mask].bool()
            # absent entries are zeroed explicitly, so a stale value never leaks in
            m = out[mask].reshape(out[mask].shape + (1,) * (out[vec].dim() - out[mask].dim()))
            out[vec] = out[vec] * m.to(out[vec].dtype)
    return out


def load_streams(settings: Settings, records: list[dict], inputs: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Call every registered STREAMS provider (or those named in ``[train] streams``) on the resolved inputs."""
    from . import STREAMS

    wanted = settings.section("train").get("streams", "auto")
    names = STREAMS.names() if wanted == "auto" else list(wanted)
    out: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    for name in names:
        got = STREAMS.get(name)(settings, records, inputs)
        if got is None:
            log.info("train: feature stream %s has no cache here; running without it", name)
            continue
        got = dict(got)
        key = got.pop("__cache_key__", None)
        if key is not None:
            keys[f"stream:{name}"] = str(key)
        out.update(_check_streams(name, got, len(records)))
    return out, keys


def build_re_data(settings: Settings, mllm: str, inputs: dict) -> TrainData:
    """Features of every split for one caption source ``mllm`` (``none`` = no caption), from the
    resolved upstream outputs ``inputs`` (``data``, ``captions``, ``text_features``, ``image_streams``)."""
    from stages.data import get_task
    from stages.features.text import caption_item_key, sentence_item_key

    ds, captions, feats = inputs["data"], inputs["captions"], inputs["text_features"]
    records = ds.records.to_pylist()
    task = get_task(settings)
    labels = task.labels(settings)
    cache = feats.cache
    skeys = [sentence_item_key(r) for r in records]
    uniq = list(dict.fromkeys(skeys))
    rows = {r["item_key"]: r for r in cache.rows(uniq)}
    missing = [k for k in uniq if rows.get(k) is None or not rows[k]["ok"]]
    if missing:
        bad = next(i for i, k in enumerate(skeys) if k in set(missing))
        raise PipelineError(f"record {records[bad]['sample_id']}: sentence features missing or failed in {cache.dir}")
    got = cache.tensors(uniq, ["sent"])
    pos = {k: i for i, k in enumerate(uniq)}
    order = [pos[k] for k in skeys]
    sent = Ragged(*cache.ragged(skeys, "word"))
    dim = int(sent.flat.shape[-1])
    sent_vec = torch.stack([got["sent"][i] for i in order]).contiguous()
    ents = torch.tensor([[rows[k]["h_start"], rows[k]["h_end"], rows[k]["t_start"], rows[k]["t_end"]] for k in skeys], dtype=torch.int64)

    texts = [captions.for_record(r) for r in records]
    ckeys = [caption_item_key(t) if t else None for t in texts]
    cuniq = list(dict.fromkeys(k for k in ckeys if k))
    crow = {r["item_key"]: r for r in cache.rows(cuniq) if r is not None} if cuniq else {}
    cuniq = [k for k in cuniq if k in crow and crow[k]["ok"]]
    cgot = cache.tensors(cuniq, ["sent"]) if cuniq else {"sent": []}
    cpos = {k: i for i, k in enumerate(cuniq)}
    empty_v = torch.zeros(int(got["sent"][0].shape[-1]), dtype=sent.flat.dtype)
    has_cap = torch.tensor([k is not None and k in cpos for k in ckeys], dtype=torch.bool)
    cap = Ragged(*cache.ragged([k if h else None for k, h in zip(ckeys, has_cap.tolist())], "word", dim, sent.flat.dtype))
    cap_vec = torch.stack([cgot["sent"][cpos[k]] if h else empty_v for k, h in zip(ckeys, has_cap.tolist())]).contiguous()

    label = torch.tensor([r["label_id"] for r in records], dtype=torch.int64)
    splits: dict[str, torch.Tensor] = {}
    for i, r in enumerate(records):
        splits.setdefault(r["split"], []).append(i)
    splits = {k: torch.tensor(v, dtype=torch.int64) for k, v in splits.items()}
    streams, skeys_extra = load_streams(settings, records, inputs)
    cache_keys = {"data": ds.key, "captions": captions.cache.key, "text_features": cache.key, **skeys_extra}
    uniq_caps = {captions.captioner.item_key(r): t for r, t in zip(records, texts) if t}  # per caption item (image)
    cap_words = [len(t.split()) for t in uniq_caps.values()]
    modalities = {
        "caption_len_words": sum(cap_words) / len(cap_words) if cap_words else 0.0,
        "captions": len(cap_words),
        "text": True,
        "caption": mllm if bool(has_cap.any()) else None,
        "caption_coverage": float(has_cap.float().mean()),
        "image": "img_vec" in streams,
        "objects": "obj_vec" in streams,
        "translation_image": "trans_vec" in streams,
        "translation_objects": "trans_obj_vec" in streams,
    }
    from .tuned_top import load_top

    top = load_top(cache.files_dir)
    if feats.stage.conf["cut"] and top is None:
        raise PipelineError(f"text.cut = {feats.stage.conf['cut']} but {cache.files_dir} has no top_layers; re-run features")
    cap_id = torch.tensor([cpos[k] if h else -1 for k, h in zip(ckeys, has_cap.tolist())], dtype=torch.int64)
    cap_levels = None
    if feats.stage.conf.get("memory") and cuniq:  # each distinct caption's top-layer states, cached by the features
        cap_levels = Ragged(*cache.ragged(cuniq, "levels")).shared(cap_id)
    return TrainData(settings.task, labels, records, splits, label, sent, sent_vec, ents, cap, cap_vec, has_cap,
                     streams, cache_keys, modalities, len(settings.section("text").get("layers", [-1])),
                     {"text_top": top} if top else {}, model_ids(feats, captions), cap_levels=cap_levels, cap_id=cap_id)


def model_ids(feats, captions) -> dict:
    """What the run config records of its models: the text encoder and any captioning model."""
    out = {"text": feats.stage.ref.identity}
    ref = getattr(captions.captioner, "ref", None)
    if ref is not None:
        out["captions"] = ref.identity
    elif getattr(captions.captioner, "model", None):
        out["captions"] = f"{captions.captioner.backend}:{captions.captioner.model}"
    return out
