"""``TASK=images``: a plain folder of photos, one record per image file.

``--source <folder>`` (or ``IMAGE_DIR``) names the folder; files are found
recursively by extension.  Records carry no sentence or entities, so the chain runs
captions over any folder (``make captions TASK=images MLLM=...``); prompts that need
a sentence (``entity``) refuse with a clear error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.paths import PathEscape, confine

from .readers import ReadResult

log = logging.getLogger("camim")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImagesTask:
    name = "images"
    version = "1"
    kind = "images"

    def __init__(self, arg: str = ""):
        self.arg = arg

    def source_dir(self, settings: Settings) -> Path:
        src = settings.source or settings.image_dir  # MNRE_SOURCE reaches settings.source through the CLI
        if not src:
            raise PipelineError("TASK=images needs a folder: --source <folder> (or IMAGE_DIR)")
        path = Path(src)
        if not path.is_dir():
            raise PipelineError(f"image folder {path} is not a folder")
        return path

    def image_dir(self, settings: Settings) -> Path:
        return self.source_dir(settings)

    def source_files(self, settings: Settings) -> dict[str, Path]:
        root = self.source_dir(settings)
        files = {}
        for p in sorted(root.rglob("*")):
            if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")):
                continue
            try:  # a link that leads out of the folder is never read (nor sent to an API)
                confine(p, root, "image")
            except PathEscape as exc:
                if settings.on_error != "skip":
                    raise PipelineError(f"{exc} (remove the link, or --on-error skip to leave it out)") from None
                log.warning("images: %s; left out", exc)
                continue
            files[str(p.relative_to(root))] = p
        if not files:
            raise PipelineError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files

    def read(self, files: dict[str, Path], settings: Settings) -> ReadResult:
        out = ReadResult()
        for i, name in enumerate(sorted(files)):
            out.rows.append({"sample_id": f"images:{i}", "split": "images", "idx": i, "img_id": name})
        return out

    def labels(self, settings: Settings) -> list[str]:
        return []

    def caption_files(self, settings: Settings, name: str) -> list[Path]:
        path = Path(name)
        if path.is_file():
            return [path]
        if path.is_dir():
            return sorted(p for p in path.iterdir() if p.suffix in (".txt", ".json"))
        raise PipelineError(f"TASK=images: imported captions need a file or folder path, not {name!r}")

    def caption_sources(self, settings: Settings) -> list[str]:
        return []
