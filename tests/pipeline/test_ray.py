"""The Ray Data engine: same keys, same parts, same resume as the local runner."""

import pytest
import torch

from pipeline.executors import make_executor
from pipeline.runner import run_stage
from pipeline.store import Store
from tests.pipeline.test_cache import Squares

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_ray_engine_matches_local_and_resumes(tmp_path, ray_local):
    items = [{"item_key": f"k{i}", "x": i} for i in range(40)]
    local, s_local = run_stage(Squares(), items, Store(tmp_path / "local"), batch_size=8)
    # half the items first (as if a run had stopped), then all of them on Ray
    store = Store(tmp_path / "ray")
    run_stage(Squares(), items[:20], store, batch_size=8)
    cache, summary = make_executor("ray", 2).run(Squares(), items, store, batch_size=8)
    assert summary.cached == 19 + 0 and summary.done == 20 and summary.failed == 1  # item 13 failed in the first half
    assert cache.key == local.key
    keys = [f"k{i}" for i in range(40) if i != 13]
    a = cache.tensors(keys, ["sq", "seq"])
    b = local.tensors(keys, ["sq", "seq"])
    assert all(torch.equal(x, y) for x, y in zip(a["sq"], b["sq"]))
    assert all(torch.equal(x, y) for x, y in zip(a["seq"], b["seq"]))
    assert cache.index().num_rows == 40
    # nothing left to do: a second Ray run does not start any actor
    _, again = make_executor("ray").run(Squares(), items, store, batch_size=8)
    assert again.done == 0 and again.cached == 39 and again.failed == 1


def test_one_rate_limit_for_all_ray_workers(tmp_path, ray_local, monkeypatch):
    """4 Ray workers against the fake server with rpm = 120: the limit holds for the job, not per
    worker (4 private limiters would send 8 requests a second)."""
    from PIL import Image

    from camim import chain
    from pipeline.config import Settings, load_profile, merge
    from stages.captions.fake_server import FakeServer
    from tests.helpers import REPO

    photos = sorted((REPO / "tests" / "fixtures" / "photos").glob("*.jpg"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(24):  # 24 distinct images: 24 caption items
        im = Image.open(photos[i % len(photos)]).convert("RGB").resize((64, 48))
        im.putpixel((i, 0), (255, 0, 0))
        im.save(folder / f"{i:02d}.png")
    conf = merge(load_profile("offline"), {"captions": {"openai": {"rpm": 120, "concurrency": 2, "timeout": 5.0}}})
    with FakeServer() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.openai_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        s = Settings(conf=conf, cache_dir=tmp_path / "cache", task="images", source=str(folder), mllm="openai:m",
                     engine="ray", workers=4, batch_size=3, device="cpu")
        _, (caps,) = chain.captions(s)
        times = sorted(srv.state.times)
    assert caps.summary.done == 24 and len(times) == 24
    # evenly spaced at 60/120 = 0.5 s: any 3 s hold at most 7 requests, and any minute at most 120
    most = max(sum(1 for u in times if t <= u < t + 3.0) for t in times)
    assert most <= 7, f"{most} requests within 3 s"
    assert times[-1] - times[0] >= 23 * 0.5 - 0.2
