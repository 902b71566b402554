"""The Ray Data engine: same keys, same parts, same resume as the local runner."""

import pytest
import torch

from pipeline.runner import run_stage
from pipeline.store import Store
from tests.test_cache import Squares

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_ray_engine_matches_local_and_resumes(tmp_path, ray_local):
    items = [{"item_key": f"k{i}", "x": i} for i in range(40)]
    local, s_local = run_stage(Squares(), items, Store(tmp_path / "local"), batch_size=8)
    # half the items first (as if a run had stopped), then all of them on Ray
    store = Store(tmp_path / "ray")
    run_stage(Squares(), items[:20], store, batch_size=8)
    cache, summary = run_stage(Squares(), items, store, batch_size=8, engine="ray", workers=2)
    assert summary.cached == 19 + 0 and summary.done == 20 and summary.failed == 1  # item 13 failed in the first half
    assert cache.key == local.key
    keys = [f"k{i}" for i in range(40) if i != 13]
    a = cache.tensors(keys, ["sq", "seq"])
    b = local.tensors(keys, ["sq", "seq"])
    assert all(torch.equal(x, y) for x, y in zip(a["sq"], b["sq"]))
    assert all(torch.equal(x, y) for x, y in zip(a["seq"], b["seq"]))
    assert cache.index().num_rows == 40
    # nothing left to do: a second Ray run does not start any actor
    _, again = run_stage(Squares(), items, store, batch_size=8, engine="ray")
    assert again.done == 0 and again.cached == 39 and again.failed == 1
