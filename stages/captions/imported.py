"""``MLLM=imported:<source>``: captions read from existing files (CAMIM formats).

``<source>`` is a shipped name (``qwen``, ``minicpm``, ``blip2``, ``instructblip``:
``camim_captions/<name>_{split}.txt`` of the data source), a caption file, or a folder
of them.  The cache key is the content hash of the files.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.hashing import sha256_file
from pipeline.store import ItemResult
from stages.data import get_task
from stages.data.readers import read_captions

from .base import Captioner


class ImportedCaptioner(Captioner):
    backend = "imported"
    needs_images = False
    default_batch_size = 2048

    def __init__(self, arg: str, settings):
        super().__init__(arg, settings)
        if not arg:
            raise PipelineError("MLLM=imported needs a source: imported:<name|file|folder>")
        self.files = get_task(settings).caption_files(settings, arg)
        self._captions: dict[str, str] | None = None

    def key_config(self) -> dict:
        return {"backend": "imported", "files": sorted(sha256_file(f) for f in self.files)}

    def label(self) -> str:
        return f"imported:{Path(self.arg).name}"

    def setup(self) -> None:
        caps: dict[str, str] = {}
        self.skipped = []
        for f in self.files:
            got = read_captions(f, self.settings.on_error)
            self.skipped += got.skipped
            for row in got.rows:
                caps[row["img_id"]] = row["caption"]
                stem = row["img_id"].rsplit(".", 1)[0]
                caps.setdefault(stem, row["caption"])  # JSON files key by stem
        self._captions = caps

    def caption(self, batch):
        assert self._captions is not None
        out = []
        for it in batch:
            img = it["img_id"]
            cap = self._captions.get(img, self._captions.get(img.rsplit(".", 1)[0]))
            if cap is None:
                out.append(ItemResult(it["item_key"], row={"img_id": img}, error=f"missing: no caption for {img} in {self.arg}"))
            elif not cap.strip():
                out.append(ItemResult(it["item_key"], row={"img_id": img}, error=f"empty caption: the caption of {img} in {self.arg} is empty"))
            else:
                out.append(ItemResult(it["item_key"], row={"img_id": img, "caption": " ".join(cap.split())}))
        return out
