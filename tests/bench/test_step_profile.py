"""The step-profile bench runs the shipped head's step over real cached batches and splits its time."""

import re

import pytest

from pipeline.config import Settings, load_profile, merge
from tests.helpers import save_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert2(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert2"), layers=2)


def test_step_profile_prints_the_shares_of_a_tuned_top_step(tmp_path, small_source, tiny_bert2, monkeypatch, capsys):
    from bench import step_profile
    from camim import chain

    conf = merge(load_profile("offline"), {"text": {"model": str(tiny_bert2), "cut": 2, "compute_dtype": "fp32"},
                                           "train": {"hidden": 16, "heads": 2, "batch_size": 8}})
    s = Settings(cache_dir=tmp_path / "cache", source=str(small_source), conf=conf, mllm="imported:qwen")
    chain.features(s)
    monkeypatch.setenv("BENCH_STEPS", "2")
    assert step_profile.main(s) == 0
    out = capsys.readouterr().out
    shares = re.search(r"under the profiler \(2 steps\): matmuls (\d+)% .*dtype casts (\d+)%, the rest (\d+)%", out)
    assert shares, out
    assert 98 <= sum(int(x) for x in shares.groups()) <= 102 and int(shares.group(1)) > 0
    assert "2 tuned layers" in out and "of the roofline measured now" in out and "aten::mm" in out
