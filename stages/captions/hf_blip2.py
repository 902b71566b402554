"""``MLLM=blip2[:<path-or-id>]``: BLIP-2 (CAMIM: Salesforce/blip2-flan-t5-xxl).

The prompt goes in as text after the query tokens; with a Flan-T5 language model
the output holds only the answer, with an OPT one the prompt is cut off.
"""

from __future__ import annotations

from .hf_common import LocalCaptioner


class Blip2Captioner(LocalCaptioner):
    backend = "blip2"
    conf_name = "blip2"
    default_model = "Salesforce/blip2-flan-t5-xxl"
    model_class = "Blip2ForConditionalGeneration"
