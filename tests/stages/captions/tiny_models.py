"""Tiny random vision-language models, built from configs and saved with
``save_pretrained`` (model + real processor), for the local caption backends' tests.

Nothing is downloaded: tokenizers are byte-level BPEs trained on the fly.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "a photo of a cat sitting on a red chair", "an astronaut in a white suit holding a helmet",
    "a cup of coffee on a wooden table", "a rocket launching into the blue sky",
    "a man riding a motorcycle on the road", "a black horse standing in a field",
    "please give me a detailed description of the picture", "describe the picture in one short sentence",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer(specials: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = json.loads(tk.to_str())
    vocab = d["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in d["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         bos_token=None, unk_token=None, padding_side="left")
    tok.add_tokens(specials, special_tokens=True)
    return tok


def bert_tokenizer():
    from transformers import BertTokenizer

    words = sorted({w for s in CORPUS for w in s.split()})
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + words
    return BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(toks))})


def _opt_text(tok, hidden=32):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                     max_position_embeddings=256, word_embed_proj_dim=hidden, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).to_dict()


def _llama_text(tok, hidden=32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None).to_dict()


def _blip_family(tok, nq, qformer_vocab):
    """Config parts BLIP-2 and InstructBLIP share: vision tower, Q-Former, OPT text model."""
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    return dict(vision_config=dict(layer, image_size=32, patch_size=8),
                qformer_config=dict(layer, encoder_hidden_size=32, vocab_size=qformer_vocab),
                text_config=_opt_text(tok), num_query_tokens=nq, image_token_index=tok.convert_tokens_to_ids("<image>"))


def _seed():
    import torch

    torch.manual_seed(0)


def build_blip2(path: Path) -> Path:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    _seed()
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_end|>", "<image>"])
    nq = 4
    model = Blip2ForConditionalGeneration(Blip2Config(**_blip_family(tok, nq, qformer_vocab=100)))
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok, num_query_tokens=nq)
    return _save(model, proc, tok, path)


def build_instructblip(path: Path) -> Path:
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    _seed()
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_end|>", "<image>"])
    qtok = bert_tokenizer()
    nq = 4
    model = InstructBlipForConditionalGeneration(InstructBlipConfig(**_blip_family(tok, nq, qformer_vocab=len(qtok))))
    proc = InstructBlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                                 qformer_tokenizer=qtok, num_query_tokens=nq)
    return _save(model, proc, tok, path)


def build_llava_next(path: Path) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    _seed()
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                              patch_size=8).to_dict() | {"model_type": "clip_vision_model"}
    cfg = LlavaNextConfig(vision_config=vision, text_config=_llama_text(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], vision_feature_select_strategy="default",
                          vision_feature_layer=-1)
    model = LlavaNextForConditionalGeneration(cfg)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return _save(model, proc, tok, path)


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_vl(path: Path) -> Path:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    _seed()
    specials = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = bpe_tokenizer(specials)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"])
    cfg = Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                                                            patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(cfg)
    ip = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=1024)
    vp = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=1024)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    return _save(model, proc, tok, path)


def _save(model, proc, tok, path: Path) -> Path:
    _fix_generation(model, tok)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _fix_generation(model, tok) -> None:
    gc = model.generation_config
    gc.pad_token_id = tok.pad_token_id
    gc.eos_token_id = tok.eos_token_id
    # random weights would stop at once now and then: demand a few tokens
    gc.min_new_tokens = 3


MINICPM_CONFIG = '''
from transformers import PretrainedConfig


class ToyMiniCPMVConfig(PretrainedConfig):
    model_type = "toy_minicpmv"

    def __init__(self, hidden_size=8, version=2.6, **kw):
        self.hidden_size = hidden_size
        self.version = version
        super().__init__(**kw)
'''

# A stand-in for MiniCPM-V 2.x's hub code: same entry point (``chat``) and message
# formats (2.6: batch of [image, text] turns; 2.5: one image + text turn), with a
# real (tiny) parameter so dtype/device placement is exercised.
MINICPM_MODEL = '''
import torch
from transformers import PreTrainedModel

from .configuration_toy import ToyMiniCPMVConfig


class ToyMiniCPMV(PreTrainedModel):
    config_class = ToyMiniCPMVConfig
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(3, config.hidden_size)
        self.post_init()

    def _one(self, image, text, tokenizer, max_new_tokens):
        import numpy as np
        x = torch.tensor(np.asarray(image.convert("RGB"), dtype="float32").reshape(-1, 3).mean(0) / 255.0)
        h = self.proj(x.to(self.proj.weight.dtype).to(self.proj.weight.device))
        words = ["cat", "chair", "astronaut", "coffee", "rocket", "horse", "road", "sky"]
        pick = [words[int(i) % len(words)] for i in torch.argsort(h.float(), descending=True)[:3]]
        body = f"{image.size[0]}x{image.size[1]} image of " + " ".join(pick) + f" ({text.split()[0]})"
        body = tokenizer.decode(tokenizer(body)["input_ids"][:max_new_tokens])
        return "<|im_start|>assistant\\n" + body + "<|im_end|>"

    def chat(self, image, msgs, tokenizer, sampling=False, max_new_tokens=64, **kw):
        assert not sampling or "temperature" in kw
        if self.config.version == 2.5:
            assert image is not None and isinstance(msgs[0]["content"], str)
            return self._one(image, msgs[0]["content"], tokenizer, max_new_tokens)
        batch = msgs if isinstance(msgs[0], list) else [msgs]
        outs = [self._one(m[0]["content"][0], m[0]["content"][1], tokenizer, max_new_tokens) for m in batch]
        return outs if isinstance(msgs[0], list) else outs[0]
'''


def build_minicpm_toy(path: Path, version: float = 2.6) -> Path:
    """A ``trust_remote_code`` folder shaped like a MiniCPM-V 2.x snapshot."""
    import importlib
    import sys

    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_toy.py").write_text(MINICPM_CONFIG)
    (path / "modeling_toy.py").write_text(MINICPM_MODEL)
    sys.path.insert(0, str(path))
    try:
        cfg_mod = importlib.import_module("configuration_toy")
        cfg = cfg_mod.ToyMiniCPMVConfig(version=version)
    finally:
        sys.path.remove(str(path))
        sys.modules.pop("configuration_toy", None)
    d = cfg.to_dict()
    d["auto_map"] = {"AutoConfig": "configuration_toy.ToyMiniCPMVConfig", "AutoModel": "modeling_toy.ToyMiniCPMV"}
    d["architectures"] = ["ToyMiniCPMV"]
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"proj.weight": torch.randn(8, 3), "proj.bias": torch.randn(8)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(d, indent=1))
    bpe_tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>"]).save_pretrained(path)
    return path
