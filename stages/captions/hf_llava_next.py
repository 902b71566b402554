"""``MLLM=llava-next[:<path-or-id>]``: LLaVA-NeXT (CAMIM: LLaVA-NeXT on LLaMA3-8B,
llava-hf/llama3-llava-next-8b-hf), through the processor's chat template."""

from __future__ import annotations

from .hf_common import ChatTemplateCaptioner


class LlavaNextCaptioner(ChatTemplateCaptioner):
    backend = "llava-next"
    conf_name = "llava-next"
    default_model = "llava-hf/llama3-llava-next-8b-hf"
    model_class = "LlavaNextForConditionalGeneration"
