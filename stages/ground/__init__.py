"""The grounding stage: up to m object crops per sample, for the image and for its
translation (generated) image.

``GROUNDING`` maps ``GROUND=`` names to backends:

* ``imported``: HVPNeT/TMR crop indexes (``img_vg_crops_{split}.json``: sample index →
  crop file names in the user's crop folder; ``diffusion_boxes_{split}.json``: sample
  index → pixel boxes on the 768x768 generated image, cut from the user's translation
  images);
* ``detector``: zero-shot OWLv2 / Grounding DINO (transformers) queried with the entity
  names and noun phrases of the sentence.

One item is one (view, sample): ``view`` is ``image`` or ``trans``.  Its Parquet row
holds ``boxes``, ``scores``, ``labels`` (the query each box answers), ``queries``,
``crop_keys`` (sha256 of each crop file: the key of its image features), ``crop_files``
(relative to the store root when this stage wrote them, else the user's path),
``n_crops``, ``m`` and ``short`` (fewer than m crops; never padded).  Crops this stage
cuts are 224x224 PNGs under ``ground/<key>/crops/``, written before the part commits.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.hashing import key_of
from pipeline.paths import confine
from pipeline.runner import RunSummary
from pipeline.stage import Registry, Stage
from pipeline.store import ItemResult, StageCache, Store, atomic_write_bytes

from . import boxes as box_utils

log = logging.getLogger("camim")

GROUNDING = Registry("grounding backend")
GROUNDING.add("imported", "stages.ground.imported:ImportedGrounding")
GROUNDING.add("detector", "stages.ground.detector:DetectorGrounding")

VIEWS = ("image", "trans")
DEFAULTS = {
    "backend": "imported",
    "m": 3,
    "min_side": 2.0,        # px; thinner boxes are degenerate and dropped
    "dedup_iou": 0.9,       # a box overlapping a kept one more than this is a duplicate
    "crop_size": box_utils.CROP_SIZE,
    "crop_index": "",       # folder with img_vg_crops_*.json / diffusion_boxes_*.json (default: <source>/tmr_aux)
    "crop_dir": "",         # the user's HVPNeT crop folder (img_vg): <dir>/<split>/crops/<name>, <dir>/<split>/<name> or <dir>/<name>
    "trans_dir": "",        # the user's translation images (TMR diffusion_pic): <dir>/<split>/<img_id> or <dir>/<img_id>
    "trans_box_size": 768,  # the pixel space of diffusion_boxes (Stable Diffusion 2: 768x768)
    "model": "google/owlv2-base-patch16-ensemble",
    "revision": "main",
    "min_score": 0.0,
    "text_threshold": 0.0,  # Grounding DINO: token score threshold for labels
    "phrases": "tmr",       # tmr (phrase_text_*.json next to the index) | none | spacy:<model>
    "max_queries": 8,
    "compute_dtype": "fp32",
    "batch_size": 8,
}


def ground_conf(settings: Settings, backend: str | None = None) -> dict:
    conf = dict(DEFAULTS)
    given = settings.section("ground")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise PipelineError(f"[ground] unknown setting(s): {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    conf.update(given)
    conf.update(settings.ground_overrides())  # run-time choices (--ground, --crop-dir, ...) beat the profile
    if backend:
        conf["backend"] = backend
    if int(conf["m"]) < 1:
        raise PipelineError(f"[ground] m must be at least 1, not {conf['m']}")
    return conf


def crop_path(store_root: Path, rel_or_abs: str) -> Path:
    p = Path(rel_or_abs)
    return p if p.is_absolute() else Path(store_root) / p


class GroundStage(Stage):
    """One stage for every backend: the backend proposes boxes (or crop files); this
    class clamps, filters, cuts and records them."""

    name = "ground"
    version = "1"

    def __init__(self, backend, conf: dict, store_root: Path):
        self.backend = backend
        self.conf = conf
        self.store_root = Path(store_root)

    def key_config(self) -> dict:
        return {
            "backend": self.backend.identity(),
            "m": int(self.conf["m"]),
            "min_side": float(self.conf["min_side"]),
            "dedup_iou": float(self.conf["dedup_iou"]),
            "crop_size": int(self.conf["crop_size"]),
            "crop_resample": "bicubic, png",
        }

    def label(self) -> str:
        return self.backend.label()

    @property
    def crops_rel(self) -> str:
        return f"{self.name}/{self.key}/crops"

    def setup(self) -> None:
        self.backend.setup()

    def teardown(self) -> None:
        self.backend.teardown()

    def run(self, batch: list[dict]) -> list[ItemResult]:
        proposals = self.backend.propose(batch)
        return [self._finish(it, p) for it, p in zip(batch, proposals)]

    def _finish(self, item: dict, prop: dict) -> ItemResult:
        m = int(self.conf["m"])
        base = {"view": item["view"], "sample_id": item["sample_id"], "m": m, "queries": list(item.get("queries", []))}
        if prop.get("error"):
            return ItemResult(item["item_key"], row=base, error=prop["error"])
        if "files" in prop:  # ready-made crop files (imported HVPNeT crops)
            files = prop["files"][:m]
            row = {**base, "boxes": [], "scores": [], "labels": [], "crop_keys": [f["key"] for f in files],
                   "crop_files": [f["path"] for f in files], "missing": prop.get("missing", []), "dropped": 0,
                   "width": 0, "height": 0, "image_key": ""}
        else:
            image = prop["image"]
            w, h = image.size
            dedup = float(self.conf["dedup_iou"]) if prop.get("dedup", True) else 1.01
            kept, dropped = box_utils.clean_boxes(prop["candidates"], w, h, m, float(self.conf["min_side"]), dedup)
            keys, files = [], []
            for c in kept:
                data, sha = box_utils.cut(image, c["box"], int(self.conf["crop_size"]))
                rel = f"{self.crops_rel}/{sha}.png"
                path = self.store_root / rel
                if not path.exists():
                    atomic_write_bytes(path, data)
                keys.append(sha)
                files.append(rel)
            row = {**base, "boxes": [[round(v, 3) for v in c["box"]] for c in kept], "scores": [c["score"] for c in kept],
                   "labels": [str(c.get("query") or "") for c in kept], "crop_keys": keys, "crop_files": files,
                   "missing": [], "dropped": dropped, "width": w, "height": h, "image_key": item.get("image_key", "")}
        row["n_crops"] = len(row["crop_keys"])
        row["short"] = row["n_crops"] < m
        return ItemResult(item["item_key"], row=row)


@dataclass
class Grounding:
    """What the grounding stage hands on, per record and view."""

    cache: StageCache
    summary: RunSummary
    stage: GroundStage
    items: dict  # (view, sample_id) -> item_key
    trans_images: dict  # sample_id -> (content key, path) of its translation image

    def row(self, view: str, sample_id: str) -> dict | None:
        k = self.items.get((view, sample_id))
        if k is None:
            return None
        if not hasattr(self, "_rows"):
            self._rows = {r["item_key"]: r for r in self.cache.rows()}
        r = self._rows.get(k)
        return r if r is not None and r["ok"] else None


def find_in(root: Path, split: str, name: str, subdirs=("crops",), what: str = "entry") -> Path | None:
    """``<root>/<split>/<sub>/<name>``, ``<root>/<split>/<name>`` or ``<root>/<name>``; an entry
    that resolves outside ``root`` (``..``, an absolute path, a link) raises :class:`PathEscape`."""
    cands = [root / split / s / name for s in subdirs] + [root / split / name, root / name]
    found = next((c for c in cands if c.is_file()), None)
    if found is not None:
        confine(found, root, f"{what} {name!r}:")
    return found


def trans_image_path(trans_dir: Path, split: str, img_id: str) -> Path | None:
    """TMR names the generated image after the tweet image; its script saved .png."""
    stem = Path(img_id).stem
    for name in (img_id, f"{stem}.png", f"{stem}.jpg"):
        p = find_in(trans_dir, split, name, subdirs=(), what="translation image")
        if p is not None:
            return p
    return None


def load_side_index(index_dir: Path | None, prefix: str, splits) -> dict[str, dict[str, list]] | None:
    """``{split: {sample index (str): entries}}`` from ``<index_dir>/<prefix>_<split>.json``."""
    if index_dir is None:
        return None
    out = {}
    for split in splits:
        p = index_dir / f"{prefix}_{split}.json"
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise PipelineError(f"{p}: expected a JSON object {{sample index: [...]}}")
        for k, v in data.items():
            if not isinstance(v, (list, str)):
                raise PipelineError(f"{p}: entry {k!r} must be a list (or, for phrases, a string)")
        out[split] = data
    return out or None


def index_dir(settings: Settings, conf: dict) -> Path | None:
    if conf["crop_index"]:
        p = Path(conf["crop_index"]).expanduser()
        if not p.is_dir():
            raise PipelineError(f"[ground] crop_index {p} is not a folder")
        return p
    from stages.data import get_task

    task = get_task(settings)
    d = Path(task.source_dir(settings)) / "tmr_aux"
    return d if d.is_dir() else None


def build_items(records: list[dict], backend, conf: dict, settings: Settings) -> tuple[list[dict], dict, dict]:
    trans_dir = Path(conf["trans_dir"]).expanduser() if conf["trans_dir"] else None
    if trans_dir is not None and not trans_dir.is_dir():
        raise PipelineError(f"translation image folder {trans_dir} does not exist")
    items, keys, trans = [], {}, {}
    from functools import lru_cache

    from pipeline.hashing import sha256_file

    sha256_file = lru_cache(maxsize=None)(sha256_file)  # samples share images

    for rec in records:
        for view in VIEWS:
            if view == "trans":
                if trans_dir is None:
                    continue
                try:
                    p = trans_image_path(trans_dir, rec["split"], rec["img_id"])
                except PipelineError as exc:  # a link out of the folder: refused
                    if settings.on_error != "skip":
                        raise PipelineError(f"record {rec['sample_id']}: {exc} (--on-error skip leaves it out)") from None
                    log.warning("ground: record %s: %s; left out", rec["sample_id"], exc)
                    continue
                if p is None:
                    continue
                tkey = sha256_file(str(p))
                trans[rec["sample_id"]] = (tkey, str(p))
                it = {"view": view, "image_key": tkey, "image_path": str(p)}
            else:
                it = {"view": view, "image_key": rec.get("image_key"), "image_path": rec.get("image_path")}
            it.update(sample_id=rec["sample_id"], split=rec["split"], idx=int(rec["idx"]), img_id=rec["img_id"])
            spec = backend.item_spec(rec, it)
            if spec is None:
                continue
            it.update(spec)
            spec_key = {k: v for k, v in spec.items() if k != "what"}
            it["item_key"] = key_of({"view": view, **spec_key, "image": it["image_key"] if backend.uses_image(view) else None})
            items.append(it)
            keys[(view, rec["sample_id"])] = it["item_key"]
    return items, keys, trans


def make_stage(settings: Settings, backend_name: str | None = None) -> tuple[GroundStage, dict]:
    conf = ground_conf(settings, backend_name)
    backend = GROUNDING.create(conf["backend"], conf=conf, settings=settings, index_dir=index_dir(settings, conf))
    return GroundStage(backend, conf, Path(settings.cache_dir)), conf


def run_grounding(settings: Settings, records: list[dict], backend_name: str | None = None) -> Grounding:
    stage, conf = make_stage(settings, backend_name)
    items, keys, trans = build_items(records, stage.backend, conf, settings)
    bs = settings.batch_size or int(conf["batch_size"])
    cache, summary = settings.executor.run(stage, items, Store(settings.cache_dir), batch_size=bs, desc=f"ground {conf['backend']}",
                                           unit="item")
    return Grounding(cache, summary, stage, keys, trans)


def summary_lines(g: Grounding) -> list[str]:
    rows = [r for r in g.cache.rows() if r["item_key"] in set(g.items.values())]
    lines = [g.summary.line()]
    for view in VIEWS:
        vr = [r for r in rows if r.get("view") == view and r["ok"]]
        if not vr:
            continue
        n = sum(r["n_crops"] for r in vr)
        short = sum(1 for r in vr if r["short"])
        lines.append(f"  {view:<6} {len(vr):>6} samples, {n:>6} crops, {short} with fewer than {vr[0]['m']}")
    lines.append(f"  -> {g.cache.dir}")
    return lines
