"""``MLLM=qwen2-vl[:<path-or-id>]``: Qwen2-VL (default Qwen/Qwen2-VL-7B-Instruct) and
Qwen2.5-VL (e.g. ``qwen2-vl:Qwen/Qwen2.5-VL-7B-Instruct``), through the chat template.

``[captions.qwen2-vl] min_pixels / max_pixels`` bound the image resolution (and so
the visual tokens per image); they change captions, so they are in the cache key.
"""

from __future__ import annotations

from .hf_common import ChatTemplateCaptioner


class Qwen2VLCaptioner(ChatTemplateCaptioner):
    extra_settings = ("min_pixels", "max_pixels")
    backend = "qwen2-vl"
    conf_name = "qwen2-vl"
    default_model = "Qwen/Qwen2-VL-7B-Instruct"
    model_class = "AutoModelForImageTextToText"  # picks Qwen2-VL or Qwen2.5-VL from the config

    def key_config(self) -> dict:
        return {**super().key_config(), "pixels": [self.conf.get("min_pixels"), self.conf.get("max_pixels")]}

    def load_processor(self, path, kw):
        from transformers import AutoProcessor

        extra = {k: int(self.conf[k]) for k in ("min_pixels", "max_pixels") if self.conf.get(k)}
        return AutoProcessor.from_pretrained(path, **kw, **extra)
