"""Shared fixtures.  The suite is hermetic: whatever the user ran before (``make demo``
writes cache/, runs/ and reports/ into the checkout) and whatever the shell holds
(``MLLM=…``, ``CACHE_DIR=…``) cannot change a test's result, and no test writes into
the checkout."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env_vars
from tests.visual_fixtures import photos, tiny_grounding_dino, tiny_owlv2, visual_source  # noqa: F401  (fixtures of the visual tests)

# the shell's values never reach a test ...
for _var in cli_env_vars():
    os.environ.pop(_var, None)
# ... and a Settings() or CLI call that names no folder writes into a scratch folder, never the checkout
_SCRATCH = Path(tempfile.mkdtemp(prefix="camim-tests-"))
os.environ["CACHE_DIR"] = str(_SCRATCH / "cache")
os.environ["RUNS_DIR"] = str(_SCRATCH / "runs")
os.environ["REPORTS_DIR"] = str(_SCRATCH / "reports")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ["BENCH_QUIET_S"] = "0"  # a bench in a test samples the machine once, never waits for it to be quiet

SAMPLE = REPO / "data" / "sample" / "mnre"


@pytest.fixture(autouse=True)
def hermetic(tmp_path_factory, monkeypatch):
    """Each test starts with its own empty default cache, runs and reports folders."""
    root = tmp_path_factory.mktemp("home")
    for var, sub in (("CACHE_DIR", "cache"), ("RUNS_DIR", "runs"), ("REPORTS_DIR", "reports")):
        monkeypatch.setenv(var, str(root / sub))
    yield root


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


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
