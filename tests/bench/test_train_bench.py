"""The train bench's roofline floor counts the tuned top's FLOPs from the real piece counts."""

from types import SimpleNamespace

import torch

from bench.train_bench import top_flops
from stages.train.data import Ragged


def _data(sent_lens, cap_lens):
    def ragged(lens):
        return Ragged.from_list([torch.zeros(n, 4) for n in lens], 4)

    return SimpleNamespace(sent=ragged(sent_lens), cap=ragged(cap_lens),
                           splits={"train": torch.tensor([0, 1]), "val": torch.tensor([2])})


def test_top_flops_counts_pieces_layers_and_backward():
    d, f, k = 4, 16, 2
    dims = {"sent_word": d, "top_ffn": f, "top_layers": k}
    lin = 2 * (4 * d * d + 2 * d * f)

    def fwd(n):  # one tuned layer over one sequence of n pieces
        return lin * n + 4 * d * n * n

    text = top_flops(_data([3, 5, 2], [0, 0, 0]), dims, joint=True)
    assert text["train"] == (fwd(3) + fwd(5)) * (3 * k - 1)  # k layers x (fwd + 2x bwd) less the first input grad
    assert text["val"] == fwd(2) * k
    # with captions read jointly each sample is one sequence of sentence + caption pieces
    joint = top_flops(_data([3, 5, 2], [4, 1, 6]), {**dims, "cap_word": d}, joint=True)
    assert joint["train"] == (fwd(7) + fwd(6)) * (3 * k - 1)
    assert joint["val"] == fwd(8) * k
    # read separately, the two are two sequences: the attention is cheaper than joint
    apart = top_flops(_data([3, 5, 2], [4, 1, 6]), {**dims, "cap_word": d}, joint=False)
    assert apart["train"] == (fwd(3) + fwd(5) + fwd(4) + fwd(1)) * (3 * k - 1)
    assert apart["train"] < joint["train"]


def test_top_flops_of_memory_reading():
    """joint = "memory": sentence queries over sentence + caption keys; the caption costs its K and V
    projections (forward + weight gradient) each epoch, and the frozen top's forward once a run."""
    d, f, k = 4, 16, 2
    dims = {"sent_word": d, "top_ffn": f, "top_layers": k, "cap_word": d}
    lin = 2 * (4 * d * d + 2 * d * f)
    data = _data([3, 5, 2], [4, 1, 6])
    mem = top_flops(data, dims, joint="memory")

    def sent(s, c):  # one layer: the sentence's linear layers + its attention over s + c keys
        return lin * s + 4 * d * s * (s + c)

    assert mem["train"] == (sent(3, 4) + sent(5, 1)) * (3 * k - 1) + 2 * k * 4 * d * d * (4 + 1)
    assert mem["val"] == k * (sent(2, 6) + 4 * d * d * 6)
    assert mem["once"] == k * sum(lin * c + 4 * d * c * c for c in (4, 1, 6))
    assert mem["train"] < top_flops(data, dims, joint=True)["train"]


def test_roofline_size_shrinks_only_for_a_slow_dtype():
    """A CPU without native bf16 multiplied at about 1 GFLOP/s (0.3 at 2048: about a minute a product): the bench
    measures it on a smaller product; fp32's probe rate (about 40 GFLOP/s at 256) keeps 2048."""
    from bench._common import roofline_size, roofline_text

    assert roofline_size(39e9, 2.0) == 2048
    assert roofline_size(1.4e9, 2.0) == 1024
    assert roofline_size(0.01e9, 2.0) == 256
    text = roofline_text({"fp32": 150.0, "fp32_n": 2048, "bf16": 1.0, "bf16_n": 1024})
    assert "fp32 150.0 GFLOP/s (torch.mm n=2048)" in text and "bf16 1.0 GFLOP/s (torch.mm n=1024)" in text


def test_others_load_subtracts_the_bench_own_cpu_time(monkeypatch):
    """The benches print how many cores *other* processes used: the machine's busy CPU-seconds less
    the bench's own, over the wall time; the load average lags by minutes and counts the bench."""
    import bench._common as common

    clock = {"t": 100.0, "busy": 1000.0, "own": 5.0}
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(common, "_machine_busy_s", lambda: clock["busy"])
    monkeypatch.setattr(common, "_own_cpu_s", lambda: clock["own"])
    load = common.OthersLoad()
    clock.update(t=110.0, busy=1000.0 + 18.0, own=5.0 + 14.0)  # 10 s: 18 core-s busy, 14 of them the bench's
    assert abs(load.since() - 0.4) < 1e-9
    assert "0.40 of" in load.summary() and "something else ran" in load.summary()
    clock.update(busy=1000.0 + 14.5)
    assert abs(load.since() - 0.05) < 1e-9 and "something else ran" not in load.summary()
    monkeypatch.setattr(common, "_machine_busy_s", lambda: None)  # no /proc/stat: said, not guessed
    assert load.since() is None and "unknown" in load.summary()


def test_others_load_waits_for_a_quiet_machine_and_says_when_it_was_not(monkeypatch):
    import bench._common as common

    clock = {"t": 0.0, "busy": 0.0}
    per_window = iter([1.5, 1.2, 0.02])  # cores the others use in each 1 s window

    def sleep(s):
        clock["t"] += s
        clock["busy"] += next(per_window, 0.0) * s

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(common.time, "sleep", sleep)
    monkeypatch.setattr(common, "_machine_busy_s", lambda: clock["busy"])
    monkeypatch.setattr(common, "_own_cpu_s", lambda: 0.0)
    line = common.OthersLoad().quiet(max_wait=30)
    assert clock["t"] == 3.0 and "0.02 of" in line and "(quiet;" in line
    per_window = iter([1.5] * 100)
    line = common.OthersLoad().quiet(max_wait=5)
    assert "1.50 of" in line and "not quiet after waiting 5 s" in line
    assert common._machine_busy_s() is None or common._machine_busy_s() >= 0  # the real /proc/stat reads
