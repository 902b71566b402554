"""--dry-run: what would run and what it would cost; nothing is sent and nothing is written."""

import os
import subprocess
import sys

KEY = "sk-test-dry"


def test_captions_dry_run_counts_and_prices_and_sends_nothing(tmp_path, photos, fake_server):
    env = dict(os.environ, DASHSCOPE_HTTP_BASE_URL=fake_server.dashscope_url, DASHSCOPE_API_KEY=KEY,
               CACHE_DIR=str(tmp_path / "cache"), TASK="images", MLLM="dashscope:qwen-vl-plus")
    cmd = [sys.executable, "-m", "camim.cli", "captions", "--source", str(photos)]
    p = subprocess.run(cmd + ["--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "6 items, 0 cached, 6 new" in p.stdout and "estimated" in p.stdout and "cost $" in p.stdout
    assert fake_server.state.requests == 0 and not (tmp_path / "cache").exists()
    # after a real run of half of them, the estimate uses the output tokens measured on this key
    for ph in sorted(photos.iterdir())[3:]:
        os.rename(ph, tmp_path / ph.name)
    assert subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120).returncode == 0
    for name in sorted(p.name for p in tmp_path.glob("*.*g")):
        os.rename(tmp_path / name, photos / name)
    sent = fake_server.state.requests
    p = subprocess.run(cmd + ["--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert "6 items, 3 cached, 3 new" in p.stdout and "as measured on this key" in p.stdout
    assert fake_server.state.requests == sent


def test_features_and_report_dry_run_write_nothing(tmp_path, small_source):
    env = dict(os.environ, CACHE_DIR=str(tmp_path / "cache"), MNRE_SOURCE=str(small_source))
    for cmd in (["features", "--mllm", "imported:qwen"], ["report", "--mllm", "none,imported:qwen", "--seeds", "1,2"]):
        p = subprocess.run([sys.executable, "-m", "camim.cli", *cmd, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "text_features" in p.stdout and "new" in p.stdout
    assert "2 source(s) x 2 seed(s) = 4 runs" in p.stdout
    assert not (tmp_path / "cache").exists()
