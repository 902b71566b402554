"""``GROUND=imported``: HVPNeT/TMR's own grounding, read from their crop indexes.

* image view: ``img_vg_crops_{split}.json`` maps the sample index (the 0-based line
  number of the split file) to crop file names; the files come from the user's crop
  folder (HVPNeT's ``img_vg``).  The first m are used, as HVPNeT and TMR do.  A listed
  file that is missing or unreadable is recorded in ``missing``.
* trans view: ``diffusion_boxes_{split}.json`` maps the sample index to boxes in the
  768x768 pixel space of TMR's generated image; they are scaled to the user's image
  size, clamped, and cut into 224x224 crops.  No de-duplication (TMR keeps
  near-identical boxes; so do we).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.hashing import key_of, sha256_file
from pipeline.paths import PathEscape

from . import find_in, load_side_index

log = logging.getLogger("camim")

SPLITS = ("train", "val", "test")


def folder_fingerprint(root: Path) -> str:
    entries = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    return key_of(entries)


class ImportedGrounding:
    def __init__(self, arg: str = "", conf: dict | None = None, settings: Settings | None = None, index_dir: Path | None = None):
        self.conf = conf or {}
        self.index_dir = index_dir
        self.crop_dir = Path(self.conf["crop_dir"]).expanduser() if self.conf.get("crop_dir") else None
        if self.crop_dir is not None and not self.crop_dir.is_dir():
            raise PipelineError(f"crop folder {self.crop_dir} does not exist")
        if index_dir is None:
            raise PipelineError("imported grounding needs the HVPNeT/TMR crop index (img_vg_crops_*.json, diffusion_boxes_*.json): "
                                "set [ground] crop_index / GROUND_INDEX, or put them in <source>/tmr_aux")
        self.vg = load_side_index(index_dir, "img_vg_crops", SPLITS)
        self.dif = load_side_index(index_dir, "diffusion_boxes", SPLITS)
        if self.vg is None and self.dif is None:
            raise PipelineError(f"{index_dir}: no img_vg_crops_<split>.json or diffusion_boxes_<split>.json")
        if self.crop_dir is None and not self.conf.get("trans_dir"):
            raise PipelineError("imported grounding has nothing to read: give the crop folder (--crop-dir) "
                                "and/or the translation images (--trans-dir)")
        self._ident = None

    def identity(self) -> dict:
        if self._ident is None:
            files = {p.name: sha256_file(p) for p in sorted(self.index_dir.glob("*.json"))
                     if p.name.startswith(("img_vg_crops_", "diffusion_boxes_"))}
            self._ident = {
                "kind": "imported",
                "index": key_of(files),
                "crop_dir": folder_fingerprint(self.crop_dir) if self.crop_dir else None,
                "trans_box_size": float(self.conf["trans_box_size"]),
            }
        return self._ident

    def label(self) -> str:
        return "imported HVPNeT/TMR crops"

    def uses_image(self, view: str) -> bool:
        return view == "trans"

    def item_spec(self, rec: dict, it: dict) -> dict | None:
        split, idx = rec["split"], str(int(rec["idx"]))
        if it["view"] == "image":
            if self.crop_dir is None or self.vg is None:
                return None
            return {"entries": list(self.vg.get(split, {}).get(idx, []))}
        if self.dif is None:
            return None
        return {"entries": [list(map(float, b)) for b in self.dif.get(split, {}).get(idx, [])]}

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def propose(self, batch: list[dict]) -> list[dict]:
        return [self._image(it) if it["view"] == "image" else self._trans(it) for it in batch]

    def _image(self, it: dict) -> dict:
        from PIL import Image, UnidentifiedImageError

        files, missing = [], []
        for name in it["entries"]:
            try:
                p = find_in(self.crop_dir, it["split"], name, what="crop index entry")
            except PathEscape as exc:
                return {"error": f"refused: {exc}"}
            if p is None:
                missing.append(name)
                continue
            try:
                with Image.open(p) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                missing.append(name)
                continue
            files.append({"key": sha256_file(p), "path": str(p.resolve())})
            if len(files) >= int(self.conf["m"]):
                break
        return {"files": files, "missing": missing}

    def _trans(self, it: dict) -> dict:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(it["image_path"]) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return {"error": f"unreadable translation image: {it['image_path']}: {type(exc).__name__}: {exc}"}
        s = float(self.conf["trans_box_size"])
        sx, sy = image.size[0] / s, image.size[1] / s
        cands = [{"box": [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], "score": 1.0, "query": None} for b in it["entries"]]
        return {"image": image, "candidates": cands, "dedup": False}
