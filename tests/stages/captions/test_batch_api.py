"""Batch backends against the fake server's Batch API: one job, partial failures per item, half the
price, and a run killed while polling resumes the same job instead of submitting a second."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from caption_helpers import settings

from camim import chain
from tests.helpers import REPO

KEY = "sk-test-batch"


def conf(name="openai_batch", **over):
    batch = {"poll_seconds": 0.05} if name.endswith("_batch") else {}
    return {"captions": {name: {**batch, "timeout": 5.0, "price_in_per_mtok": 2.0, "price_out_per_mtok": 4.0, **over}}}


def test_openai_batch_job_maps_back_with_per_item_failures_at_half_price(tmp_path, photos, fake_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.openai_url)
    bad = sorted(photos.glob("*"))[0]
    fake_server.state.reject[hashlib.sha256(bad.read_bytes()).hexdigest()] = ("InvalidParameter", "scripted refusal")
    s = settings(tmp_path, conf(), task="images", source=str(photos), mllm="openai-batch:m")
    ds, (caps,) = chain.captions(s)
    assert fake_server.state.batches_created == 1 and fake_server.state.requests == 0  # no real-time request
    assert caps.summary.done == 5 and caps.summary.failed == 1
    rows = {r["img_id"]: r for r in caps.cache.rows()}
    assert "batch 400: scripted refusal" in rows[bad.name]["error"]
    ok = [r for r in rows.values() if r["ok"]]
    assert all(r["batch_id"] == "batch_1" and r["caption"].startswith("A ") for r in ok)
    r = ok[0]
    assert r["cost_usd"] == pytest.approx((r["input_tokens"] * 1.0 + r["output_tokens"] * 2.0) / 1e6)  # list price x 0.5
    assert json.loads((caps.cache.files_dir / "batches.json").read_text()) == {}  # mapped back: nothing pending
    # the same captions as the real-time backend would write (the fake server answers both alike)
    rt_settings = settings(tmp_path / "rt", {}, task="images", source=str(photos), mllm="openai:m")
    _, (rt,) = chain.captions(rt_settings)
    assert {k: v for k, v in caps.by_item.items()} == {k: v for k, v in rt.by_item.items() if k in caps.by_item}
    # a dry run prices the batch at half the list price
    est = chain.dry_run(settings(tmp_path / "dry", conf(), task="images", source=str(photos), mllm="openai-batch:m"), "captions")
    est_rt = chain.dry_run(settings(tmp_path / "dry", conf("openai"), task="images", source=str(photos), mllm="openai:m"), "captions")
    assert est["captions"]["openai-batch:m"]["cost_usd"] == pytest.approx(est_rt["captions"]["openai:m"]["cost_usd"] / 2)


def test_a_run_killed_while_polling_resumes_the_same_job(tmp_path, photos, fake_server):
    fake_server.state.polls_to_finish = 10**9  # the job never finishes while the first run polls
    env = {**os.environ, "OPENAI_BASE_URL": fake_server.openai_url, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1",
           "NO_PROXY": "127.0.0.1,localhost", "PROFILE": str(tmp_path / "p.toml")}
    (tmp_path / "p.toml").write_text('extends = "offline"\n[captions.openai_batch]\npoll_seconds = 0.05\n')
    cmd = [sys.executable, "-m", "camim.cli", "captions", "--task", "images", "--source", str(photos), "--mllm", "openai-batch:m",
           "--cache-dir", str(tmp_path / "cache")]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    end = time.monotonic() + 120
    while fake_server.state.batch_polls < 3 and time.monotonic() < end and p.poll() is None:
        time.sleep(0.05)
    assert fake_server.state.batch_polls >= 3, p.stdout.read().decode() if p.poll() is not None else "no polls"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert fake_server.state.batches_created == 1
    fake_server.state.polls_to_finish = 0  # the provider finishes the job
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resuming batch job batch_1" in again.stdout
    assert fake_server.state.batches_created == 1  # not paid twice
    assert "6 items, 0 cached, 6 new, 0 failed" in again.stdout


def test_vllm_run_batch_path(tmp_path, photos):
    """``vllm-batch``: the JSONL goes through a local run-batch command (here the fake server's)."""
    cmd = "{python} -m stages.captions.fake_server run-batch -i {input} -o {output} --model {model}"
    s = settings(tmp_path, {"captions": {"vllm_batch": {"vllm_command": cmd}}}, task="images", source=str(photos), mllm="vllm-batch:m")
    _, (caps,) = chain.captions(s)
    assert caps.summary.done == 6 and caps.summary.failed == 0
    assert all(c.startswith("A ") for c in caps.by_item.values())
    assert not list((caps.cache.files_dir / "vllm-batch").glob("*.jsonl"))  # mapped back and cleaned up
