"""``MLLM=minicpm[:<path-or-id>]``: MiniCPM-V (CAMIM's best: MiniCPM V2.5,
openbmb/MiniCPM-Llama3-V-2_5; also MiniCPM-V-2_6 and the 4.x models).

* MiniCPM-V 4.x has native transformers classes: loaded with
  ``AutoModelForImageTextToText`` and captioned through the chat template.
* MiniCPM-V 2.5 / 2.6 exist only as hub code (``auto_map`` in config.json): loaded
  with ``trust_remote_code=True`` (always passed explicitly; never the interactive
  prompt) from a hub id or, offline, a local snapshot folder, and captioned with the
  model's own ``chat()``: 2.6 takes a batch of ``[image, prompt]`` messages, 2.5 one
  image at a time (``[captions.minicpm] chat_format = "2.5" | "2.6" | "auto"``).
  Their code targets transformers 4.4x; it may need a pinned transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from .hf_common import ChatTemplateCaptioner


def _model_type(path: str) -> str | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text()).get("model_type")
        except (ValueError, OSError):
            return None
    return None


class MiniCPMCaptioner(ChatTemplateCaptioner):
    extra_settings = ("chat_format",)
    backend = "minicpm"
    conf_name = "minicpm"
    default_model = "openbmb/MiniCPM-Llama3-V-2_5"
    model_class = "AutoModelForImageTextToText"

    def __init__(self, arg, settings):
        super().__init__(arg, settings)
        from transformers import CONFIG_MAPPING

        mt = _model_type(self.ref.load_from)
        # native when the folder's model type is one transformers knows; hub ids of
        # the 2.x family (and unknown folders) go through remote code
        self.native = bool(mt) and mt in CONFIG_MAPPING
        self.trust_remote_code = not self.native

    def key_config(self) -> dict:
        return {**super().key_config(), "chat_format": self.conf.get("chat_format", "auto")}

    def load_processor(self, path, kw):
        if self.native:
            return super().load_processor(path, kw)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **kw)

    def load_model(self, cls, path, kw):
        if self.native:
            return super().load_model(cls, path, kw)
        from transformers import AutoModel

        return AutoModel.from_pretrained(path, **kw)

    def chat_format(self) -> str:
        fmt = str(self.conf.get("chat_format", "auto"))
        if fmt != "auto":
            return fmt
        version = str(getattr(self.model.config, "version", "") or "")
        return "2.5" if version.startswith("2.5") or "V-2_5" in self.ref.spec else "2.6"

    def generate(self, images, prompts):
        if self.native:
            return super().generate(images, prompts)
        import torch

        g = self.generation()
        seed = g.pop("seed", self.conf["seed"])
        kw = {"tokenizer": self.processor, "sampling": g.pop("do_sample"), "max_new_tokens": g["max_new_tokens"],
              "num_beams": g["num_beams"], "repetition_penalty": g["repetition_penalty"]}
        if kw["sampling"]:
            kw.update(temperature=g["temperature"], top_p=g["top_p"])
        torch.manual_seed(int(seed))
        with torch.inference_mode():
            if self.chat_format() == "2.5":
                texts = [self.model.chat(image=im, msgs=[{"role": "user", "content": p}], **kw) for im, p in zip(images, prompts)]
            else:
                msgs = [[{"role": "user", "content": [im, p]}] for im, p in zip(images, prompts)]
                texts = self.model.chat(image=None, msgs=msgs, **kw)
                if isinstance(texts, str):
                    texts = [texts]
        texts = [t if isinstance(t, str) else "".join(t) for t in texts]
        n_out = [len(self.processor(t, add_special_tokens=False)["input_ids"]) for t in texts]
        n_in = [len(self.processor(p)["input_ids"]) for p in prompts]  # text part only; image tokens are model-internal
        return texts, n_in, n_out
