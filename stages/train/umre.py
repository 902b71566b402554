"""Training data for UMRE: the RE batch plus the image's visual objects.

``build_umre_data(settings, mllm, inputs)`` = ``build_re_data`` (sentence, caption and any image
streams) + what :func:`object_streams` (the graph's ``umre_objects`` node) gives per record, for each object of its image (at most 12 slots, sorted by k):

  * ``obj_vec``  ``[N, 12, Di]``: the pooled image feature of the object's crop (the
    ``[image]`` backbone of the profile, EfficientNet-Lite0 offline).  Crops are cut
    from the image by the normalised box (``left, top, right, bottom`` × width/height,
    as REMOTE's loader), written once under ``<cache>/umre_crops/<key>.png`` (key = image
    content × box) and encoded by the image-feature stage, so they are cached by content;
  * ``obj_box``  ``[N, 12, 4]`` normalised ``x1, y1, x2, y2`` (the head adds the area);
  * ``obj_mask`` ``[N, 12]``: the slot holds an object (with or without a crop feature:
    an object whose image is missing keeps its box embedding, and the run says so);
  * ``h_obj`` / ``t_obj`` ``[N]``: the slot of an object argument, -1 for a textual one.

These replace any 3-crop ``obj_vec`` of the visual streams: in UMRE the objects are the
annotated ``[OBJk]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.config import Settings
from pipeline.hashing import key_of
from pipeline.store import atomic_write_bytes

from .data import TrainData, build_re_data

log = logging.getLogger("camim")

SLOTS = 12


def crop_file(root: Path, image_path: str, image_key: str, box: list[float]) -> tuple[str, Path]:
    """Cut (once) the crop of ``box`` from the image; returns (content key, file)."""
    key = key_of({"k": "umre-crop", "image": image_key, "box": [round(float(v), 6) for v in box]})
    path = root / f"{key}.png"
    if not path.exists():
        import io

        from PIL import Image

        with Image.open(image_path) as im:
            im = im.convert("RGB")
            w, h = im.size
            x1, y1, x2, y2 = box
            l, t = int(x1 * w), int(y1 * h)
            r, b = max(l + 1, int(round(x2 * w))), max(t + 1, int(round(y2 * h)))
            buf = io.BytesIO()
            im.crop((l, t, min(r, w), min(b, h))).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
    return key, path


def object_streams(settings: Settings, records: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    from stages.features.image import image_item
    from stages.features.visual import run_image_features

    n = len(records)
    box = torch.zeros(n, SLOTS, 4)
    mask = torch.zeros(n, SLOTS, dtype=torch.bool)
    h_obj = torch.tensor([int(r["h_obj"]) for r in records], dtype=torch.int64)
    t_obj = torch.tensor([int(r["t_obj"]) for r in records], dtype=torch.int64)
    root = Path(settings.cache_dir) / "umre_crops"
    keys: list[list[str | None]] = []
    items: dict[str, dict] = {}
    missing_images = set()
    for i, r in enumerate(records):
        row = []
        for k, b in enumerate(r["obj_boxes"][:SLOTS]):
            box[i, k] = torch.tensor(b)
            mask[i, k] = True
            if r.get("image_path"):
                ck, path = crop_file(root, r["image_path"], r["image_key"], b)
                items.setdefault(ck, image_item(ck, str(path), "crop", f"{r['img_id']} {r['obj_names'][k]}"))
                row.append(ck)
            else:
                missing_images.add(r["img_id"])
                row.append(None)
        keys.append(row)
    streams = {"obj_box": box, "obj_mask": mask, "h_obj": h_obj, "t_obj": t_obj}
    info = {"objects": int(mask.sum()), "object_crops": 0, "images_missing": len(missing_images)}
    if items:
        feats = run_image_features(settings, list(items.values()))
        ok = [k for k, r in zip(items, feats.cache.rows(list(items))) if r is not None and r["ok"]]
        got = dict(zip(ok, feats.cache.tensors(ok, ["pooled"])["pooled"])) if ok else {}
        dim = int(next(iter(got.values())).shape[-1]) if got else 0
        if dim:
            vec = torch.zeros(n, SLOTS, dim)
            for i, row in enumerate(keys):
                for k, ck in enumerate(row):
                    if ck in got:
                        vec[i, k] = got[ck].float()
                        info["object_crops"] += 1
            streams["obj_vec"] = vec
            info["image_features"] = feats.cache.key
    if "obj_vec" not in streams:
        # box-only objects: a constant crop feature so the head still builds object tokens
        streams["obj_vec"] = torch.zeros(n, SLOTS, 1)
    if missing_images:
        log.warning("umre: %d image(s) not in the image folder; their objects have box embeddings only", len(missing_images))
    return streams, info


def build_umre_data(settings: Settings, mllm: str, inputs: dict) -> TrainData:
    data = build_re_data(settings, mllm, inputs)
    streams, info = inputs["umre_objects"]  # object_streams(), resolved once by the graph
    info = dict(info)
    data.streams.update(streams)
    if "image_features" in info:
        data.cache_keys["umre_crops"] = info.pop("image_features")
    data.modalities["objects"] = info
    return data
