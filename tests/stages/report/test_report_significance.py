"""The report's test against none: counts agree with the metrics, noise is not called a gain, a real gain is,
and on simulated reports with no gain its standard error is the spread ΔF1 really has."""

import json

import numpy as np
import pytest
from scipy import stats

from stages.report.significance import (
    compare_counts,
    detectable,
    f1_of,
    ner_item_counts,
    re_item_counts,
    simulated_report,
)
from stages.train.metrics import re_metrics
from stages.train.ner import ner_metrics

LABELS = ["None", "/per/per/peer", "/org/org/subsidiary", "/loc/loc/contain"]


def against_none(base, other, **kw):  # one source against none
    return compare_counts(base, [other], **kw)[0]


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
    r = against_none(seeds, seeds.copy(), n_boot=500)
    assert r["delta_f1"] == 0.0 and not r["significant"] and r["p_value"] > 0.5
    assert r["ci_low"] <= 0.0 <= r["ci_high"]


def test_seed_noise_is_not_a_gain_and_a_real_gain_is():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 4, 600)
    base = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS) for _ in range(3)])
    same = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS) for _ in range(3)])
    better = np.stack([re_item_counts(gold, _preds(rng, gold, 0.75), LABELS) for _ in range(3)])
    noise = against_none(base, same, n_boot=1000)
    gain = against_none(base, better, n_boot=1000)
    assert not noise["significant"] and noise["ci_low"] < 0 < noise["ci_high"]
    assert gain["significant"] and gain["ci_low"] > 0 and gain["p_value"] < 0.01
    assert gain["delta_f1"] > 0.1


def test_one_seed_is_never_called_significant_and_seed_noise_widens_the_interval():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 4, 400)
    base = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS)])
    better = np.stack([re_item_counts(gold, _preds(rng, gold, 0.80), LABELS)])
    one = against_none(base, better, n_boot=500)
    assert one["ci_low"] > 0 and one["p_value"] < 0.01  # the items alone would say "real"...
    assert not one["significant"] and not one["enough_seeds"]  # ...but training noise is unmeasured
    assert one["df"] is None and one["se_seeds"] == 0.0  # items only (normal); the report's JSON stays strict JSON
    json.dumps(one, allow_nan=False)
    # two seeds whose gains disagree: the seed level of the bootstrap sees it
    b2 = np.stack([re_item_counts(gold, _preds(rng, gold, a), LABELS) for a in (0.55, 0.75)])
    o2 = np.stack([re_item_counts(gold, _preds(rng, gold, a), LABELS) for a in (0.75, 0.55)])
    mixed = against_none(b2, o2, n_boot=1000)
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
    assert head[-2:] == ["min/run", "GB/run"] and body[0][-2:] == ["15.0", "-"]  # runs that kept no peak memory
    kept = run(3, 900.0)
    kept.metrics["peak_memory_bytes"] = 6.4e9
    assert table_rows([summarise("imported:qwen", [run(1, 600.0), kept], {"captions": 10})])[1][0][-1] == "6.4"
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


def test_the_detectable_gain_is_the_power_formula_at_the_familys_level():
    # z(0.975) + z(0.8) = 1.95996 + 0.84162; with a family of 4, z(1 - 0.05 / 8) = 2.49771
    assert detectable(0.01) == pytest.approx(0.0280158, abs=1e-6)
    assert detectable(0.01, df=10) == pytest.approx((2.22814 + 0.87913) * 0.01, abs=1e-6)  # t with 10 degrees of freedom
    assert detectable(0.01, family=4) == pytest.approx(0.0333933, abs=1e-6)
    assert detectable(0.01, family=4) > detectable(0.01, family=2) > detectable(0.01)
    assert detectable(0.02, power=0.9) == pytest.approx(2 * (1.95996 + 1.28155) * 0.01, abs=1e-5)


def test_the_detectable_gain_follows_the_standard_error_and_shrinks_with_more_items():
    from stages.report.significance import apply_holm

    rng = np.random.default_rng(4)

    def pair(n):
        gold = rng.integers(0, 4, n)
        base = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS) for _ in range(3)])
        other = np.stack([re_item_counts(gold, _preds(rng, gold, 0.55), LABELS) for _ in range(3)])
        return against_none(base, other, n_boot=1000)

    small, large = pair(400), pair(1600)
    # the seeds' spread of 2 rows x 3 seeds is a rough estimate (4 degrees of freedom): compare medians of 8 pairs
    ses = {n: np.median([pair(n)["se"] for _ in range(8)]) for n in (400, 1600)}
    assert 0.35 < ses[1600] / ses[400] < 0.7  # four times the items: about half
    for r in (small, large):
        assert r["df"] < 10  # two rows of 3 seeds: the seeds' spread has 4 degrees of freedom
        assert r["mde"] == pytest.approx((stats.t.ppf(0.975, r["df"]) + stats.t.ppf(0.8, r["df"])) * r["se"], rel=1e-6)
        assert r["ci_high"] - r["ci_low"] == pytest.approx(2 * stats.t.ppf(0.975, r["df"]) * r["se"], rel=1e-6)
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


def test_on_reports_with_no_gain_the_standard_error_is_the_spread_the_gain_really_has():
    # 100 simulated reports (fresh test items and runs each time), 4 sources against none, none better on average:
    # the standard error the test gives must match how far ΔF1 really moves from report to report. The two-level
    # bootstrap it replaced gave about 1.4x that spread (README "Is a gain real?"), so its p-values were too large.
    rng = np.random.default_rng(11)
    deltas, ses, ps = [], [], []
    for i in range(100):
        rows = simulated_report(rng, 600)
        for r in compare_counts(rows[0], rows[1:], n_boot=200, seed=i):
            deltas.append(r["delta_f1"])
            ses.append(r["se"])
            ps.append(r["p_value"])
    ratio = np.median(ses) / np.std(deltas)
    assert 0.8 < ratio < 1.25, ratio
    assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.11


def test_the_seeds_spread_is_pooled_over_every_row_and_the_items_shared_part_is_counted_once():
    rng = np.random.default_rng(12)
    rows = simulated_report(rng, 800, seeds=3, sources=4)
    res = compare_counts(rows[0], rows[1:], n_boot=400)
    f1 = [f1_of(r.sum(1)) for r in rows]
    pooled = sum(((x - x.mean()) ** 2).sum() for x in f1) / 10  # 5 rows x (3 - 1)
    for r in res:
        assert r["seed_df"] == 10 and r["seed_sd"] == pytest.approx(pooled ** 0.5)
        assert r["se_seeds"] == pytest.approx((pooled * (1 / 3 + 1 / 3)) ** 0.5)
        assert r["se"] == pytest.approx((r["se_items"] ** 2 + r["se_seeds"] ** 2) ** 0.5)
    # a row whose seeds scatter widely widens every comparison of the report, its own and the others'
    wild = rows[2].copy()
    wild[0] = re_item_counts(*_gold_and_chance(rows[2]), LABELS)
    widened = compare_counts(rows[0], [rows[1], wild, *rows[3:]], n_boot=400)
    assert widened[0]["seed_sd"] > 2 * res[0]["seed_sd"] and widened[0]["se"] > res[0]["se"]
    # items: a source better on the same half of the items in every seed, worse on the other half, shares an item
    # part with none that no seed washes out; runs that differ only by their own noise share almost none
    split = simulated_report(rng, 800, sources=1, item_sd=2.5)
    assert compare_counts(split[0], split[1:], n_boot=400)[0]["se_items"] > 2 * res[0]["se_items"]


def _gold_and_chance(row):
    """The gold labels behind one row's counts (positive items: the gold count) and predictions at chance."""
    gold = np.where(row[0][:, 2] > 0, 1, 0)
    return gold, np.random.default_rng(0).integers(0, 4, len(gold))


def test_seeds_needed_is_the_fewest_seeds_whose_detectable_gain_reaches_the_target():
    from stages.report.significance import seeds_needed

    def mde(n, sd, items, family=4, rows=5):  # written out: the detectable gain with n seeds a row
        seeds = sd ** 2 * 2 / n
        df = (items + seeds) ** 2 / (seeds ** 2 / (rows * (n - 1)))
        return (stats.t.ppf(1 - 0.05 / (2 * family), df) + stats.t.ppf(0.8, df)) * (items + seeds) ** 0.5

    # the shipped 6-seed report: a run's F1 spreads by about 1.01 F1 from seed to seed, the items' shared part 0
    n = seeds_needed(0.0101, 0.0, 0.01, family=4, rows=5)
    assert 22 <= n <= 26 and mde(n, 0.0101, 0.0) <= 0.01 < mde(n - 1, 0.0101, 0.0)
    # a shared item part costs seeds, and one whose detectable gain alone exceeds the target can never be beaten
    with_items = seeds_needed(0.0101, 0.002 ** 2, 0.01, family=4, rows=5)
    assert with_items > n and mde(with_items, 0.0101, 0.002 ** 2) <= 0.01
    assert seeds_needed(0.0101, 0.004 ** 2, 0.01, family=4, rows=5) is None  # 3.34 x 0.4 F1 > 1 F1
    assert seeds_needed(0.0101, 0.0, 0.05, family=4, rows=5) == 2  # a large gain: the fewest a spread needs


def test_the_report_says_how_many_seeds_would_detect_the_planned_gain():
    from stages.report import plan_line
    from stages.report.significance import apply_holm, compare_counts, seeds_needed

    rows = simulated_report(np.random.default_rng(5), 800, seeds=3, sources=2)
    sigs = compare_counts(rows[0], rows[1:], n_boot=300)
    apply_holm(sigs, plan_gain=0.02)  # 800 items: the shared item noise alone is about 0.4-0.5 F1 here
    for s in sigs:
        assert s["rows"] == 3 and s["plan_gain"] == 0.02
        assert s["seeds_for_gain"] == seeds_needed(s["seed_sd"], s["se_items"] ** 2, 0.02, family=2, rows=3)
        assert s["seeds_for_gain"] > 3  # the detectable gain with these 3 seeds is above 2 F1
    never = {**sigs[1], "seeds_for_gain": None}
    line = plan_line([{"name": "none"}, {"name": "A", "significance": sigs[0]}, {"name": "B", "significance": never}])
    assert f"A {sigs[0]['seeds_for_gain']}," in line and "B never" in line and "±2.00 F1" in line
    assert "only more test items" in line  # why "never"; said only when a source reads it
    assert "never" not in plan_line([{"name": "A", "significance": sigs[0]}])
    # one seed: training noise unmeasured, so no plan
    one = compare_counts(rows[0][:1], [r[:1] for r in rows[1:]], n_boot=300)
    apply_holm(one, plan_gain=0.01)
    assert "seeds_for_gain" not in one[0] and plan_line([{"name": "A", "significance": one[0]}]) == ""


def test_plan_gain_is_checked_and_zero_turns_the_seeds_line_off():
    from pipeline.errors import PipelineError
    from stages.report import plan_gain_of

    assert plan_gain_of({}) == 1.0 and plan_gain_of({"plan_gain": 2}) == 2.0 and plan_gain_of({"plan_gain": 0}) == 0.0
    for bad in ("1", -1, 200, True):
        with pytest.raises(PipelineError, match=r"\[report\] plan_gain"):
            plan_gain_of({"plan_gain": bad})
