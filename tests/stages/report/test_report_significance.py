"""The report's paired bootstrap: counts agree with the metrics, noise is not called a gain, a real gain is."""

import numpy as np
import pytest

from stages.report.significance import (
    f1_of,
    ner_item_counts,
    paired_bootstrap,
    re_item_counts,
)
from stages.train.metrics import re_metrics
from stages.train.ner import ner_metrics

LABELS = ["None", "/per/per/peer", "/org/org/subsidiary", "/loc/loc/contain"]


def _preds(rng, gold, acc):
    wrong = rng.integers(0, len(LABELS), size=len(gold))
    return np.where(rng.random(len(gold)) < acc, gold, wrong)


def test_item_counts_give_the_metrics_micro_f1():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, 300)
    pred = _preds(rng, gold, 0.6)
    c = re_item_counts(gold.tolist(), pred.tolist(), LABELS)
    assert np.isclose(f1_of(c.sum(0)), re_metrics(gold.tolist(), pred.tolist(), LABELS)["f1"])


def test_ner_item_counts_give_the_entity_f1():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    gold = [[1, 2, 0, 3], [0, 0, 3, 4], [1, 0, 0, 0]]
    pred = [[1, 2, 0, 0], [0, 3, 4, 4], [1, 0, 3, 0]]
    c = ner_item_counts(gold, pred, labels)
    assert np.isclose(f1_of(c.sum(0)), ner_metrics(gold, pred, labels)["f1"])


def test_identical_systems_are_not_significant():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 4, 400)
    seeds = np.stack([re_item_counts(gold, _preds(rng, gold, 0.6), LABELS) for _ in range(3)])
    r = paired_bootstrap(seeds, seeds.copy(), n_boot=500)
    assert r["delta_f1"] == 0.0 and not r["significant"] and r["p_value"] > 0.5
    assert r["ci_low"] <= 0.0 <= r["ci_high"]


def test_seed_noise_is_not_a_gain_and_a_real_gain_is():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 4, 600)
    base = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS) for _ in range(3)])
    same = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS) for _ in range(3)])
    better = np.stack([re_item_counts(gold, _preds(rng, gold, 0.75), LABELS) for _ in range(3)])
    noise = paired_bootstrap(base, same, n_boot=1000)
    gain = paired_bootstrap(base, better, n_boot=1000)
    assert not noise["significant"] and noise["ci_low"] < 0 < noise["ci_high"]
    assert gain["significant"] and gain["ci_low"] > 0 and gain["p_value"] < 0.01
    assert gain["delta_f1"] > 0.1


def test_one_seed_is_never_called_significant_and_seed_noise_widens_the_interval():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 4, 400)
    base = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS)])
    better = np.stack([re_item_counts(gold, _preds(rng, gold, 0.80), LABELS)])
    one = paired_bootstrap(base, better, n_boot=500)
    assert one["ci_low"] > 0 and one["p_value"] < 0.01  # the items alone would say "real"...
    assert not one["significant"] and not one["enough_seeds"]  # ...but training noise is unmeasured
    # two seeds whose gains disagree: the seed level of the bootstrap sees it
    b2 = np.stack([re_item_counts(gold, _preds(rng, gold, a), LABELS) for a in (0.55, 0.75)])
    o2 = np.stack([re_item_counts(gold, _preds(rng, gold, a), LABELS) for a in (0.75, 0.55)])
    mixed = paired_bootstrap(b2, o2, n_boot=1000)
    assert not mixed["significant"] and mixed["ci_high"] - mixed["ci_low"] > 0.15


def test_the_report_progress_line_counts_runs_and_estimates_from_trained_runs_only():
    from stages.report import progress_line

    assert progress_line(1, 4, [], 1.0) == "1/4 runs in 0.0 min (3 to go)"  # a reused run gives no estimate
    line = progress_line(2, 6, [600.0, 1200.0], 1800.0)
    assert line.startswith("2/6 runs in 30.0 min (4 to go") and "about 60 min more at 15.0 min a run" in line
    assert progress_line(6, 6, [600.0], 3600.0) == "6/6 runs in 60.0 min (0 to go)"


def test_the_report_gives_each_sources_run_time_and_the_total_including_reused_runs():
    """A report that reuses finished runs takes seconds; what the comparison cost is the runs' own time."""
    from types import SimpleNamespace

    from stages.report import summarise, table_rows, training_line

    def run(seed, wall):
        split = {"acc": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "per_label": {"/per/per/peer": {"f1": 0.5, "support": 3}}}
        return SimpleNamespace(run_id=f"r{seed}", config={"cache_keys": {}}, metrics={"seed": seed, "val": split, "test": split, "wall_s": wall})

    row = summarise("imported:qwen", [run(1, 600.0), run(2, 1200.0)], {"captions": 10, "caption_len_words": 9.0})
    assert row["train_s"][0] == 900.0
    head, body = table_rows([row])
    assert head[-1] == "min/run" and body[0][-1] == "15.0"
    line = training_line({"runs": 2, "runs_reused": 2, "runs_wall_s": 1800.0, "wall_s": 30.0})
    assert line.startswith("Training: 2 run(s), 0.50 h of run time in all (2 reused") and line.endswith("this report took 0.5 min.")


def test_holm_adjusts_a_family_of_p_values_step_down():
    from stages.report.significance import holm

    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> non-decreasing: 0.04 becomes 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.9]) == pytest.approx([0.6, 0.9])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_a_gain_significant_alone_is_not_once_the_family_is_adjusted():
    from stages.report.significance import apply_holm

    def sig(p, enough=True):
        return {"p_value": p, "alpha": 0.05, "enough_seeds": enough, "significant": enough and p < 0.05}

    strong, weak, noise, one_seed = sig(0.001), sig(0.03), sig(0.5), sig(0.001, enough=False)
    apply_holm([None, strong, weak, noise, one_seed])  # none's own row has no comparison
    assert strong["family"] == 4 and strong["p_holm"] == pytest.approx(0.004) and strong["significant"]
    assert weak["p_value"] == 0.03 and weak["p_holm"] == pytest.approx(0.06) and not weak["significant"]
    assert noise["p_holm"] == pytest.approx(0.5) and not noise["significant"]  # the largest: x1, after 0.06
    assert one_seed["p_holm"] == pytest.approx(0.004) and not one_seed["significant"]  # one seed: never


def test_the_detectable_gain_is_the_normal_power_formula_at_the_familys_level():
    from stages.report.significance import detectable

    # z(0.975) + z(0.8) = 1.95996 + 0.84162; with a family of 4, z(1 - 0.05 / 8) = 2.49771
    assert detectable(0.01) == pytest.approx(0.0280158, abs=1e-6)
    assert detectable(0.01, family=4) == pytest.approx(0.0333933, abs=1e-6)
    assert detectable(0.01, family=4) > detectable(0.01, family=2) > detectable(0.01)
    assert detectable(0.02, power=0.9) == pytest.approx(2 * (1.95996 + 1.28155) * 0.01, abs=1e-5)


def test_the_detectable_gain_follows_the_bootstraps_spread_and_shrinks_with_more_items():
    from stages.report.significance import apply_holm

    rng = np.random.default_rng(4)

    def pair(n):
        gold = rng.integers(0, 4, n)
        base = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS) for _ in range(3)])
        other = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS) for _ in range(3)])
        return paired_bootstrap(base, other, n_boot=1000)

    small, large = pair(400), pair(1600)
    for r in (small, large):
        assert r["mde"] == pytest.approx((1.95996 + 0.84162) * r["se"], rel=1e-4)
        # the 95% interval spans about 2 x 1.96 standard errors
        assert 2.5 * r["se"] < r["ci_high"] - r["ci_low"] < 5.5 * r["se"]
    assert 0.35 < large["mde"] / small["mde"] < 0.7  # four times the items: about half
    alone = small["mde"]
    apply_holm([small, large])
    assert small["family"] == 2 and small["mde"] > alone  # a stricter level needs a larger gain


def test_the_detectable_cell_says_na_when_training_noise_or_any_spread_is_missing():
    from stages.report import sig_cells

    base = {"delta_f1": 0.01, "ci_low": -0.02, "ci_high": 0.04, "p_value": 0.4, "p_holm": 0.8, "significant": False,
            "enough_seeds": True, "n_seeds": 3, "se": 0.009, "mde": 0.03}
    assert sig_cells(base)[-1] == "±3.00"
    assert sig_cells({**base, "enough_seeds": False, "n_seeds": 1})[-1] == "n/a (1 seed)"
    assert sig_cells({**base, "se": 0.0, "mde": 0.0})[-1] == "n/a (no spread)"
    assert sig_cells(None) == [""] * 6


def test_the_latex_table_marks_significant_gains_and_states_the_detectable_range():
    from stages.report import latex_table

    def row(source, f1, sig=None):
        ms = (f1, 0.005)
        return {"source": source, "name": source, "caplen": 9.0, "captions": 0 if source == "none" else 5, "test_acc": ms,
                "test_precision": ms, "test_recall": ms, "test_f1": ms, "significance": sig}

    sig = {"delta_f1": 0.021, "significant": True, "enough_seeds": True, "se": 0.009, "mde": 0.0301}
    weak = {"delta_f1": -0.004, "significant": False, "enough_seeds": True, "se": 0.01, "mde": 0.0342}
    tex = latex_table([row("none", 0.63), row("a_b", 0.65, sig), row("c", 0.626, weak)],
                      {"task": "mnre", "head": "cam", "seeds": [1, 2, 3]})
    assert "\\begin{tabular}{lrrrrrr}" in tex and "a\\_b & 9.0 & 65.00$\\pm$0.50" in tex
    assert "+2.10$^*$ \\\\" in tex and "-0.40 \\\\" in tex and "none & -- &" in tex
    assert "With 80\\% power this test detects gains of $\\pm$3.01--3.42 F1 or more.}" in tex
    one_seed = {**weak, "enough_seeds": False}  # one seed: no power statement
    assert "80\\%" not in latex_table([row("none", 0.63), row("c", 0.626, one_seed)], {"task": "t", "head": "h", "seeds": [1]})
