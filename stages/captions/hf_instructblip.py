"""``MLLM=instructblip[:<path-or-id>]``: InstructBLIP (CAMIM: Salesforce/instructblip-vicuna-7b).

The processor feeds the prompt to both the Q-Former (its own tokenizer) and the
language model.
"""

from __future__ import annotations

from .hf_common import LocalCaptioner


class InstructBlipCaptioner(LocalCaptioner):
    backend = "instructblip"
    conf_name = "instructblip"
    default_model = "Salesforce/instructblip-vicuna-7b"
    model_class = "InstructBlipForConditionalGeneration"
