"""Helpers for the caption tests: paths, settings, a mini MNRE source with real photos."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PHOTOS = REPO / "tests" / "fixtures" / "photos"
SAMPLE = REPO / "data" / "sample" / "mnre"


def settings(tmp_path, conf_over: dict | None = None, **kw):
    from pipeline.config import Settings, load_profile, merge

    conf = merge(load_profile("offline"), conf_over or {})
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("device", "cpu")
    return Settings(conf=conf, **kw)


def mini_mnre(tmp_path: Path, n: int = 4) -> tuple[Path, Path, list[str]]:
    """A small real MNRE source (first ``n`` lines of each split of the bundled sample)
    and an image folder where all but the last two images are real photos saved
    under the MNRE image names.  Returns (source, image_dir, missing img_ids)."""
    import ast

    src = tmp_path / "mnre"
    src.mkdir()
    shutil.copy(SAMPLE / "ours_rel2id.json", src)
    names = []
    for split in ("train", "val", "test"):
        lines = (SAMPLE / f"mnre_{split}.txt").read_text().splitlines()[:n]
        (src / f"mnre_{split}.txt").write_text("\n".join(lines) + "\n")
        names += [ast.literal_eval(line)["img_id"] for line in lines]
    names = list(dict.fromkeys(names))
    images = tmp_path / "images"
    images.mkdir()
    photos = sorted(PHOTOS.glob("*.jpg"))
    for i, name in enumerate(names[:-2]):
        from PIL import Image

        Image.open(photos[i % len(photos)]).convert("RGB").save(images / name, "JPEG")
    return src, images, names[-2:]
