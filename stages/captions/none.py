"""``MLLM=none``: the no-caption baseline. Every image gets an empty caption."""

from __future__ import annotations

from pipeline.store import ItemResult

from .base import Captioner


class NoCaptioner(Captioner):
    backend = "none"
    needs_images = False
    default_batch_size = 2048

    def key_config(self) -> dict:
        return {"backend": "none"}

    def caption(self, batch):
        return [ItemResult(it["item_key"], row={"img_id": it["img_id"], "caption": ""}) for it in batch]
