import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.pop("MNRE_SOURCE", None)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "mnre"


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture
def small_source(tmp_path) -> Path:
    """A copy of the first lines of the bundled sample (fast end-to-end runs)."""
    dst = tmp_path / "mnre"
    (dst / "camim_captions").mkdir(parents=True)
    n = {"train": 24, "val": 8, "test": 8}
    for split, k in n.items():
        lines = (SAMPLE / f"mnre_{split}.txt").read_text().splitlines()[:k]
        (dst / f"mnre_{split}.txt").write_text("\n".join(lines) + "\n")
        for src in ("qwen", "blip2"):
            caps = (SAMPLE / "camim_captions" / f"{src}_{split}.txt").read_text()
            (dst / "camim_captions" / f"{src}_{split}.txt").write_text(caps)
    shutil.copy(SAMPLE / "ours_rel2id.json", dst / "ours_rel2id.json")
    return dst
