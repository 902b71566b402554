"""The image half of ``make features`` and the image streams the train stage reads.

The graph (``camim/graph.py``) runs grounding (cached) → image features of every
dataset image, crop, translation image and translation crop (:func:`visual_items`,
:func:`run_image_features`; one item per distinct file content) → per-record stream
tensors (:func:`assemble_streams`), stored as one content-addressed entry
``image_streams/<key>/files/streams.safetensors`` (key = records × grounding key ×
image-feature key).

``train_streams(settings, records, inputs)`` is the ``STREAMS`` provider of the train stage:
it returns ``img_vec``/``has_img``, ``obj_vec``/``obj_mask``, ``trans_vec``/``has_trans``
and ``trans_obj_vec``/``trans_obj_mask`` (``[N, ...]`` in manifest order), or ``None``
when no image source is configured.  Absent entries are masked, never zero-filled
silently: a mask bit is set only where a feature was really computed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Settings
from pipeline.hashing import key_of
from pipeline.runner import RunSummary, plan
from pipeline.store import StageCache, Store, atomic_write_bytes, atomic_write_json

from .image import ImageFeatureStage, image_item

log = logging.getLogger("camim")

STREAM_VERSION = "1"
PAIRS = {"img_vec": "has_img", "obj_vec": "obj_mask", "trans_vec": "has_trans", "trans_obj_vec": "trans_obj_mask"}


def image_stage(settings: Settings) -> ImageFeatureStage:
    return ImageFeatureStage(settings.section("image"), device=settings.device)


def has_images(settings: Settings) -> bool:
    """Whether this run has any image source: dataset images, HVPNeT crops or translation images."""
    from stages.ground import ground_conf

    conf = ground_conf(settings)
    return bool(settings.image_dir or conf["crop_dir"] or conf["trans_dir"])


@dataclass
class ImageFeatures:
    cache: StageCache
    summary: RunSummary
    stage: ImageFeatureStage


def run_image_features(settings: Settings, items: list[dict]) -> ImageFeatures:
    stage = image_stage(settings)
    store = Store(settings.cache_dir)
    if settings.executor.in_process:
        # the DataLoader decodes exactly the runner's to-do list, in its order, ahead of the model
        stage.pending = plan(stage, items, store, False)[3]
    bs = settings.batch_size or int(stage.conf["batch_size"])
    cache, summary = settings.executor.run(stage, items, store, batch_size=bs, desc="image features", unit="img")
    return ImageFeatures(cache, summary, stage)


def visual_items(records: list[dict], grounding, store_root: Path) -> list[dict]:
    from stages.ground import crop_path

    items = []
    for r in records:
        if r.get("image_path") or grounding is None:
            items.append(image_item(r["image_key"], r.get("image_path"), "image", r["img_id"]))
        if grounding is None:
            continue
        t = grounding.trans_images.get(r["sample_id"])
        if t:
            items.append(image_item(t[0], t[1], "trans"))
        for view, kind in (("image", "crop"), ("trans", "trans_crop")):
            row = grounding.row(view, r["sample_id"])
            if row is None:
                continue
            for k, f in zip(row["crop_keys"], row["crop_files"]):
                items.append(image_item(k, str(crop_path(store_root, f)), kind))
    return items


def records_fingerprint(records: list[dict]) -> str:
    return key_of([(r["sample_id"], r["image_key"]) for r in records])


def streams_key(settings: Settings, records: list[dict], ground_key: str, feat_key: str) -> str:
    return key_of({"stage": "image_streams", "version": STREAM_VERSION, "records": records_fingerprint(records),
                   "ground": ground_key, "image_features": feat_key})


def assemble_streams(settings: Settings, records: list[dict], grounding, feats: ImageFeatures) -> tuple[Path, dict]:
    import torch
    from safetensors.torch import save

    from stages.ground import ground_conf

    m = int(grounding.stage.conf["m"]) if grounding else int(ground_conf(settings)["m"])
    gkey = grounding.stage.key if grounding else "none"
    gname = grounding.stage.conf["backend"] if grounding else "none"
    ok = {r["item_key"] for r in feats.cache.rows() if r["ok"]}
    n = len(records)
    key = streams_key(settings, records, gkey, feats.stage.key)
    sc = Store(settings.cache_dir).stage("image_streams", key)
    path = sc.files_dir / "streams.safetensors"
    if path.exists():
        return path, json.loads((sc.files_dir / "meta.json").read_text())

    want: dict[str, int] = {}

    def slot(k):
        if k is None or k not in ok:
            return -1
        return want.setdefault(k, len(want))

    img = [slot(r["image_key"] if r.get("image_path") else None) for r in records]
    trans_images = grounding.trans_images if grounding else {}
    trans = [slot(trans_images.get(r["sample_id"], (None,))[0]) for r in records]
    objs, tobjs = [], []
    for r in records:
        for view, dest in (("image", objs), ("trans", tobjs)):
            row = grounding.row(view, r["sample_id"]) if grounding else None
            keys = list(row["crop_keys"])[:m] if row else []
            dest.append([slot(k) for k in keys] + [-1] * (m - len(keys)))
    keys = list(want)
    dim = int(feats.stage.shapes(feats.stage.backbone.channels)["pooled"][0])
    table = torch.zeros(len(keys) + 1, dim, dtype=torch.float16)  # last row: zeros for absent slots
    if keys:
        table[: len(keys)] = torch.stack(feats.cache.tensors(keys, ["pooled"])["pooled"]).to(torch.float16)
    it = torch.tensor(img)
    tt = torch.tensor(trans)
    ot = torch.tensor(objs, dtype=torch.int64).view(n, m)
    tot = torch.tensor(tobjs, dtype=torch.int64).view(n, m)
    out = {
        "img_vec": table[it], "has_img": it >= 0,
        "obj_vec": table[ot], "obj_mask": ot >= 0,
        "trans_vec": table[tt], "has_trans": tt >= 0,
        "trans_obj_vec": table[tot], "trans_obj_mask": tot >= 0,
    }
    present = {name: int(out[mask].sum()) for name, mask in
               (("img", "has_img"), ("obj", "obj_mask"), ("trans", "has_trans"), ("trans_obj", "trans_obj_mask"))}
    meta = {"key": key, "records": n, "dim": dim, "m": m, "present": present,
            "ground": {"key": gkey, "backend": gname},
            "image_features": {"key": feats.stage.key, "label": feats.stage.label()}}
    key_config = {k: meta[k] for k in ("ground", "image_features")} | {"records": records_fingerprint(records)}
    sc.write_spec({"stage": "image_streams", "version": STREAM_VERSION, "key_config": key_config,
                   "label": f"{feats.stage.label()} + {gname} crops", "rows": n})
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in out.items()}))
    atomic_write_json(sc.files_dir / "meta.json", meta)
    return path, meta


def train_streams(settings: Settings, records: list[dict], inputs: dict):
    """``STREAMS`` provider: the image streams the graph assembled for ``records`` (``inputs["image_streams"]``),
    or None without images."""
    meta = inputs.get("image_streams")
    if not meta:
        return None
    from safetensors.torch import load_file

    path = Path(meta["path"])
    got = dict(load_file(str(path)))
    out = {}
    for vec, mask in PAIRS.items():  # a stream no record has is left out, so the run reports it absent
        if bool(got[mask].any()):
            out[vec], out[mask] = got[vec], got[mask]
    if not out:
        log.warning("image streams: no image, crop or translation feature for any record (see %s)", path.parent)
        return None
    out["__cache_key__"] = meta["key"]
    return out


def recorded_upstream(cache_dir: Path, streams_key_: str) -> set[tuple[str, str]]:
    """The grounding and image-feature keys an ``image_streams`` entry was assembled from (its meta)."""
    meta = Path(cache_dir) / "image_streams" / streams_key_ / "files" / "meta.json"
    if not meta.is_file():
        return set()
    m = json.loads(meta.read_text())
    out = {("image_features", m["image_features"]["key"])}
    if m["ground"]["key"] != "none":
        out.add(("ground", m["ground"]["key"]))
    return out
