"""The package installs: the wheel carries prompts, profiles and samples; defaults never point
into the installed package."""

import subprocess
import sys
import zipfile

from tests.helpers import REPO


def test_defaults_go_under_camim_home_or_the_current_folder(tmp_path, monkeypatch):
    from pipeline.config import Settings

    for var in ("CACHE_DIR", "RUNS_DIR", "REPORTS_DIR", "CAMIM_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert (s.cache_dir, s.runs_dir, s.reports_dir) == (tmp_path / "cache", tmp_path / "runs", tmp_path / "reports")
    monkeypatch.setenv("CAMIM_HOME", str(tmp_path / "home"))
    assert Settings().cache_dir == tmp_path / "home" / "cache"


def test_the_wheel_carries_prompts_profiles_and_samples(tmp_path):
    import shutil

    src = tmp_path / "src"  # a copy: building in the checkout would write build/ into it
    for name in ("pipeline", "stages", "bench", "camim", "prompts", "data/sample"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_assets"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (whl,) = tmp_path.glob("camim_pipeline-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for want in ("pipeline/_assets/prompts/camim.txt", "pipeline/profiles/offline.toml",
                 "pipeline/_assets/sample/mnre/mnre_train.txt", "pipeline/_assets/sample/mnre/camim_captions/qwen_train.txt",
                 "pipeline/_assets/sample/twitter2017/train.txt", "camim/__init__.py", "bench/train_bench.py"):
        assert want in names, want
