"""The DashScope and OpenAI-compatible backends against the fake server on 127.0.0.1."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from caption_helpers import settings

from camim import chain
from pipeline.errors import PipelineError

KEY = "sk-test-0123456789abcdef"
BACKENDS = ["dashscope:qwen-vl-plus", "openai:qwen2.5-vl-7b"]


def env_for(monkeypatch, srv, mllm):
    if mllm.startswith("dashscope"):
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", srv.dashscope_url)
        monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    else:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.openai_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)


def api_conf(mllm, **over):
    name = mllm.split(":")[0]
    base = {"concurrency": 4, "timeout": 1.0, "max_attempts": 10, "backoff_base": 0.01, "backoff_max": 0.2}
    return {"captions": {name: {**base, **over}}}


def run(tmp_path, mllm, folder, conf=None, **kw):
    s = settings(tmp_path, conf or api_conf(mllm), task="images", source=str(folder), mllm=mllm, **kw)
    ds, caps = chain.captions(s)
    return ds, caps[0]


@pytest.mark.parametrize("mllm", BACKENDS)
def test_captions_a_folder_of_real_photos(tmp_path, photos, fake_server, monkeypatch, mllm):
    env_for(monkeypatch, fake_server, mllm)
    ds, caps = run(tmp_path, mllm, photos)
    recs = ds.records.to_pylist()
    assert len(recs) == 6 and caps.summary.done == 6 and caps.summary.failed == 0
    for r in recs:
        cap = caps.for_record(r)
        # the server decoded the real photo: its size is in the caption
        from PIL import Image

        w, h = Image.open(photos / r["img_id"]).size
        assert cap.startswith(f"A {w}x{h} ") and "Please give me a detailed" in cap
    x = caps.summary.extra
    assert x["input_tokens"] > 0 and x["output_tokens"] > 0 and x["attempts"] == 6
    assert fake_server.state.auth_headers == {f"Bearer {KEY}"}
    # re-run: served from the cache, no request
    before = fake_server.state.requests
    _, again = run(tmp_path, mllm, photos)
    assert again.summary.cached == 6 and again.summary.done == 0
    assert fake_server.state.requests == before
    # it prints what it sent (nothing), and what the cached items cost when they were made
    assert again.summary.extra["attempts"] == 0 and again.summary.extra["cached_attempts"] == 6
    assert any("0 requests sent" in line for line in again.lines())
    assert again.for_record(recs[0]) == caps.for_record(recs[0])


@pytest.mark.parametrize("mllm", BACKENDS)
def test_transient_failures_recover_and_400s_are_listed(tmp_path, photos, fake_server, monkeypatch, mllm, capsys):
    env_for(monkeypatch, fake_server, mllm)
    st = fake_server.state
    st.fail_rate = 0.3
    st.kinds = ("429", "500", "502html", "503", "drop", "timeout")
    st.hang = 1.5
    st.rng.seed(7)
    bad = photos / "coffee.jpg"
    st.reject[hashlib.sha256(bad.read_bytes()).hexdigest()] = ("DataInspectionFailed", "Input data may contain inappropriate content.")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # more items: the six photos under several names
    for i in range(3):
        for p in list(photos.glob("[a-z]*.jpg")):
            if p.name not in ("broken.jpg", "coffee.jpg") and not p.stem[-1].isdigit():
                (photos / f"{p.stem}{i}.jpg").write_bytes(p.read_bytes() + bytes([i]))
    ds, caps = run(tmp_path, mllm, photos)
    recs = ds.records.to_pylist()
    failed = {f["img_id"]: f["error"] for f in caps.summary.extra["failed_items"]}
    assert set(failed) == {"coffee.jpg", "broken.jpg"}, failed
    assert failed["coffee.jpg"].startswith("http 400 DataInspectionFailed: Input data may contain")
    assert failed["broken.jpg"].startswith("bad image")
    ok = [r for r in recs if r["img_id"] not in failed]
    assert len(ok) == len(recs) - 2 and all(caps.for_record(r) for r in ok)
    assert sum(v for k, v in st.replies.items() if k != "ok") >= 5  # faults really happened
    assert st.replies.get("ok", 0) == len(ok) + 1  # the 400 image was sent once (reply "ok" kind, rejected)
    out = capsys.readouterr().out
    assert "coffee.jpg: http 400 DataInspectionFailed" in out and "failures.jsonl" in out
    lines = (caps.cache.files_dir / "failures.jsonl").read_text().splitlines()
    assert {json.loads(l)["img_id"] for l in lines} == {"coffee.jpg", "broken.jpg"}


@pytest.mark.parametrize("mllm", BACKENDS)
def test_retry_after_is_honoured(tmp_path, photos, fake_server, monkeypatch, mllm):
    env_for(monkeypatch, fake_server, mllm)
    fake_server.state.retry_after = "1"
    fake_server.state.script = ["429"]
    for p in list(photos.iterdir())[1:]:
        p.unlink()
    t0 = time.perf_counter()
    _, caps = run(tmp_path, mllm, photos, api_conf(mllm, backoff_base=0.0, backoff_max=5.0, concurrency=1))
    took = time.perf_counter() - t0
    assert caps.summary.done == 1 and fake_server.state.replies["429"] == 1
    assert took >= 1.0  # waited the server's Retry-After, not the (zero) backoff


@pytest.mark.parametrize("mllm", BACKENDS)
def test_gives_up_after_max_attempts_with_a_readable_reason(tmp_path, photos, fake_server, monkeypatch, mllm):
    env_for(monkeypatch, fake_server, mllm)
    fake_server.state.script = ["502html"] * 3
    for p in list(photos.iterdir())[1:]:
        p.unlink()
    _, caps = run(tmp_path, mllm, photos, api_conf(mllm, max_attempts=3))
    (err,) = [f["error"] for f in caps.summary.extra["failed_items"]]
    assert err.startswith("transient http 502: gave up after 3 attempts: 502 Bad Gateway")
    assert "<" not in err


@pytest.mark.parametrize("mllm", BACKENDS)
def test_timeouts_and_dropped_connections_are_retried(tmp_path, photos, fake_server, monkeypatch, mllm):
    env_for(monkeypatch, fake_server, mllm)
    fake_server.state.script = ["timeout", "drop"]
    fake_server.state.hang = 2.0
    for p in list(photos.iterdir())[1:]:
        p.unlink()
    _, caps = run(tmp_path, mllm, photos, api_conf(mllm, concurrency=1, timeout=0.5))
    row = caps.cache.rows()[0]
    assert row["ok"] and row["caption"]
    st = fake_server.state
    assert st.requests == 3 and st.replies["timeout"] == 1 and st.replies["drop"] == 1
    # the DashScope SDK re-sends once by itself on a dropped pooled connection: that is counted too
    assert row["attempts"] == st.requests == 3


@pytest.mark.parametrize("mllm", BACKENDS)
def test_concurrency_is_bounded(tmp_path, photos, fake_server, monkeypatch, mllm):
    env_for(monkeypatch, fake_server, mllm)
    fake_server.state.latency = 0.2
    _, caps = run(tmp_path, mllm, photos, api_conf(mllm, concurrency=2))
    assert caps.summary.done == 6
    assert fake_server.state.max_in_flight == 2


@pytest.mark.parametrize("mllm", BACKENDS)
def test_key_never_reaches_cache_or_output(tmp_path, photos, fake_server, monkeypatch, mllm, capsys):
    env_for(monkeypatch, fake_server, mllm)
    run(tmp_path, mllm, photos)
    out = capsys.readouterr()
    assert KEY not in out.out + out.err
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p


def test_dashscope_without_key_fails_before_any_request(tmp_path, photos, fake_server, monkeypatch):
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", fake_server.dashscope_url)
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    with pytest.raises(PipelineError, match="DASHSCOPE_API_KEY"):
        run(tmp_path, "dashscope:qwen-vl-plus", photos)
    assert fake_server.state.requests == 0


def test_wrong_key_is_permanent(tmp_path, photos, fake_server, monkeypatch):
    env_for(monkeypatch, fake_server, "dashscope")
    fake_server.state.api_key = "sk-other"
    _, caps = run(tmp_path, "dashscope:qwen-vl-plus", photos)
    assert caps.summary.failed == 6 and fake_server.state.requests == 6
    assert caps.summary.failures == {"http 401 InvalidApiKey": 6}


def test_cli_captions_a_folder_against_the_fake_server(tmp_path, photos, fake_server):
    env = dict(os.environ, DASHSCOPE_HTTP_BASE_URL=fake_server.dashscope_url, DASHSCOPE_API_KEY=KEY,
               CACHE_DIR=str(tmp_path / "cache"), TASK="images", MLLM="dashscope:qwen-vl-plus", PROMPT="short")
    env.pop("MNRE_SOURCE", None)
    root = Path(__file__).resolve().parents[3]
    p = subprocess.run([sys.executable, "-m", "camim.cli", "captions", "--source", str(photos)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "6 items, 0 cached, 6 new, 0 failed" in p.stdout and "this run: tokens" in p.stdout and "6 requests sent" in p.stdout
    assert "Traceback" not in p.stderr and KEY not in p.stdout + p.stderr


def test_rerun_retries_transient_failures_but_not_400s(tmp_path, photos, fake_server, monkeypatch):
    mllm = "openai:m"
    env_for(monkeypatch, fake_server, mllm)
    st = fake_server.state
    bad = photos / "coffee.jpg"
    st.reject[hashlib.sha256(bad.read_bytes()).hexdigest()] = ("InvalidParameter", "image too small")
    st.fail_rate, st.kinds = 1.0, ("503",)  # an outage: every request fails
    _, first = run(tmp_path, mllm, photos, api_conf(mllm, max_attempts=2))
    assert first.summary.failed == 6 and first.summary.failures == {"transient http 503 ServiceUnavailable": 6}
    st.fail_rate = 0.0  # the outage is over
    before = st.requests
    ds, second = run(tmp_path, mllm, photos, api_conf(mllm, max_attempts=2))
    assert st.requests - before == 6  # the 400 image was sent again only because it had never got an answer
    failed = {f["img_id"]: f["error"] for f in second.summary.extra["failed_items"]}
    assert list(failed) == ["coffee.jpg"] and failed["coffee.jpg"].startswith("http 400 InvalidParameter")
    assert all(second.for_record(r) for r in ds.records.to_pylist() if r["img_id"] != "coffee.jpg")
    before = st.requests
    run(tmp_path, mllm, photos, api_conf(mllm, max_attempts=2))
    assert st.requests == before  # the permanent 400 is not retried on a re-run


def test_sigkill_mid_run_resumes_from_the_last_committed_batch(tmp_path, photos, fake_server):
    import signal

    fake_server.state.latency = 0.3
    cache = tmp_path / "cache"
    env = dict(os.environ, OPENAI_BASE_URL=fake_server.openai_url, CACHE_DIR=str(cache), TASK="images",
               MLLM="openai:m", BATCH_SIZE="2", CAPTION_CONCURRENCY="1")
    env.pop("MNRE_SOURCE", None)
    root = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, "-m", "camim.cli", "captions", "--source", str(photos)]
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    parts = []
    while time.monotonic() < deadline and not parts:  # wait for the first committed part
        parts = list(cache.glob("captions/*/parts/part-*.parquet"))
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert parts, "no part was committed"
    import pyarrow.parquet as pq

    committed = sum(pq.read_table(x).num_rows for x in cache.glob("captions/*/parts/part-*.parquet"))
    assert 2 <= committed < 6
    before = fake_server.state.requests
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"6 items, {committed} cached, {6 - committed} new, 0 failed" in done.stdout
    assert fake_server.state.requests - before == 6 - committed


@pytest.mark.parametrize("mllm", BACKENDS)
def test_api_stage_pickles_for_ray_workers(tmp_path, mllm):
    import pickle

    from stages.captions import CaptionStage, make_captioner

    stage = CaptionStage(make_captioner(mllm, settings(tmp_path, api_conf(mllm, rpm=60))))
    copy = pickle.loads(pickle.dumps(stage))
    assert copy.key == stage.key and copy.device == "cpu"
    copy.captioner.limiter.acquire()  # the lock was rebuilt
