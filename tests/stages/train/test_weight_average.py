"""The moving average of the weights (``train.ema``): its arithmetic, the swap, the bad values."""

import pytest
import torch

from pipeline.errors import PipelineError
from stages.train.trainer import WeightAverage


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    m[1].weight.requires_grad_(False)  # frozen parameters are not averaged
    return m


def test_the_average_follows_its_formula():
    m = _model()
    avg = WeightAverage(m, 0.9)
    w = m[0].weight
    expect = w.detach().clone()
    for n in range(1, 30):
        with torch.no_grad():
            w.add_(torch.randn_like(w))
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))
        expect = d * expect + (1 - d) * w.detach()
    assert torch.allclose(avg.shadow[0], expect, atol=1e-6)
    assert len(avg.shadow) == 3  # the Linear's weight and bias, the LayerNorm's bias; not the frozen weight
    assert not torch.equal(avg.shadow[0], w.detach())


def test_swapped_puts_the_average_in_and_the_trained_weights_back():
    m = _model()
    avg = WeightAverage(m, 0.5)
    live = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in avg.shadow:
            p.add_(1.0)
    with avg.swapped():
        assert torch.equal(m[0].weight, live["0.weight"] + 1.0)
        assert torch.equal(m[1].weight, live["1.weight"])  # frozen: untouched
    assert all(torch.equal(v, live[k]) for k, v in m.state_dict().items())
    with pytest.raises(RuntimeError), avg.swapped():
        raise RuntimeError("validation failed")
    assert all(torch.equal(v, live[k]) for k, v in m.state_dict().items())


def test_state_round_trips():
    m = _model()
    a = WeightAverage(m, 0.9)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    a.update()
    b = WeightAverage(_model(), 0.9)
    b.load_state_dict(a.state_dict())
    assert b.n == 1 and all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow))


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1])
def test_a_decay_out_of_range_is_a_clear_error(decay):
    with pytest.raises(PipelineError, match="train.ema"):
        WeightAverage(_model(), decay)


def test_a_decay_the_warm_up_never_reaches_changes_nothing_and_says_so():
    """MNRE's 4 epochs are 1,532 updates: the cap (1 + n) / (10 + n) is below 0.995 all along, so 0.995
    and 0.999 average alike (found when a run with ema 0.999 matched the shipped run's val F1 epoch for epoch)."""
    runs = {}
    for decay in (0.995, 0.999, 0.9):
        m = _model()
        avg = WeightAverage(m, decay)
        gen = torch.Generator().manual_seed(1)
        for _ in range(100):
            with torch.no_grad():
                m[0].weight.add_(torch.randn(m[0].weight.shape, generator=gen))
            avg.update()
        runs[decay] = avg
    assert all(torch.equal(x, y) for x, y in zip(runs[0.995].shadow, runs[0.999].shadow))
    assert not torch.equal(runs[0.9].shadow[0], runs[0.995].shadow[0])  # 0.9 binds at update 80
    assert (runs[0.995].binds_at, runs[0.999].binds_at, runs[0.9].binds_at) == (1790, 8990, 80)
    for avg in runs.values():  # the first update whose cap reaches the decay
        n, d = avg.binds_at, avg.decay
        assert (1 + n) / (10 + n) >= d > n / (9 + n)
    note = runs[0.995].note(1532)
    assert "until update 1,790" in note and "1,532 updates" in note and "any ema from 0.9942 up" in note
    assert runs[0.995].note(1790) is None and runs[0.9].note(1532) is None


def test_ema_warmup_sets_the_cap_and_the_memory():
    """``ema_warmup`` w: the cap (1 + n) / (w + n); a lower w averages over more of the run."""
    m = _model()
    a, b = WeightAverage(m, 0.999, 4), WeightAverage(_model(), 0.999)
    assert (a.binds_at, b.binds_at) == (2996, 8990)
    assert "(4 + n)" in a.note(1532) and "383 updates back" in a.note(1532) and "any ema from 0.9981 up" in a.note(1532)
    w = m[0].weight
    for n in range(1, 40):
        with torch.no_grad():
            w.add_(1.0)  # the weights climb by 1 an update: a longer memory lags further behind
        a.update()
    expect = w.detach().clone() - 39.0
    for n in range(1, 40):
        d = min(0.999, (1 + n) / (4 + n))
        expect = d * expect + (1 - d) * (w.detach() - 39.0 + n)
    assert torch.allclose(a.shadow[0], expect, atol=1e-5)
    lag = (w.detach() - a.shadow[0]).mean().item()
    assert 39 / 4 - 1.5 < lag < 39 / 4 + 1.5  # centred about n / w updates back
    with pytest.raises(PipelineError, match="ema_warmup"):
        WeightAverage(_model(), 0.9, 0.5)


def test_ema_warmup_at_its_default_stays_out_of_the_run_key():
    """Runs measured before the option existed keep their keys; another value is another run."""
    from types import SimpleNamespace

    from stages.train.trainer import DEFAULTS, run_config

    settings = SimpleNamespace(task="mnre", device="cpu")
    data = SimpleNamespace(cache_keys={"text_features": "k"}, labels=["None"], dims={"text": 4})
    conf = {**DEFAULTS, "ema": 0.995}
    assert "ema_warmup" not in run_config(settings, data, "none", 1, conf)["options"]
    assert run_config(settings, data, "none", 1, {**conf, "ema_warmup": 4})["options"]["ema_warmup"] == 4
