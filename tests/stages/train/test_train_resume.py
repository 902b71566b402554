"""A train killed (SIGKILL) mid-run and run again continues from its last finished epoch
and ends with the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys


def _train(small_source, cache, runs, kill_after=None):
    env = dict(os.environ)
    if kill_after:
        env["CAMIM_TEST_KILL_AFTER_EPOCH"] = str(kill_after)
    cmd = [sys.executable, "-m", "camim.cli", "train", "--source", str(small_source), "--cache-dir", str(cache),
           "--runs-dir", str(runs), "--mllm", "imported:qwen", "--epochs", "4",
           "--opt", "hidden=32", "--opt", "heads=2", "--opt", "lr=3e-3", "--opt", "log_every=1",
           "--opt", "ema=0.9"]  # the weight average is part of what resumes
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _comparable(metrics):
    hist = [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]]
    return {"best_epoch": metrics["best_epoch"], "val": metrics["val"], "test": metrics["test"], "history": hist}


def test_killed_train_resumes_to_the_same_metrics(tmp_path, small_source):
    cache = tmp_path / "cache"
    clean = _train(small_source, cache, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    (ref,) = (tmp_path / "clean").glob("*/metrics.json")

    killed = _train(small_source, cache, tmp_path / "runs", kill_after=2)
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.json").exists()
    assert "epoch 3/4" not in killed.stdout

    again = _train(small_source, cache, tmp_path / "runs")
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch 2" in again.stdout and "epoch 1/4" not in again.stdout and "epoch 3/4" in again.stdout
    assert not (run_dir / "checkpoint.pt").exists()
    got = json.loads((run_dir / "metrics.json").read_text())
    assert _comparable(got) == _comparable(json.loads(ref.read_text()))
    # the curves: each epoch once, steps in order, also across the kill
    lines = [json.loads(x) for x in (run_dir / "curves.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if "val_f1" in x] == [1, 2, 3, 4]
    steps = [x["step"] for x in lines if "val_f1" not in x]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) > 0
