"""Is a caption source's gain over ``none`` real, or noise?

Two kinds of noise move a test F1: which test items there are, and how training went (the
seed).  ΔF1 is the mean F1 of a source's seeds minus the mean F1 of ``none``'s, and its
standard error has one part for each kind of noise (the decomposition of a crossed
seeds × items design; the item level as in Koehn 2004 and Berg-Kirkpatrick et al. 2012, the
seed level as in Dror et al. 2019):

* **seeds**: how much a run's test F1 moves from seed to seed, on these test items.  It is
  pooled over every row of the report (``none`` and each source: the sum of squared
  deviations from each row's mean over the sum of their degrees of freedom, as Dunnett's
  many-to-one comparison pools its variance), so a report with 5 rows of 3 seeds estimates it
  with 10 degrees of freedom, where one pair of rows would have 4.  Its share of the squared
  error is ``s² (1/S_source + 1/S_none)``;
* **items**: how much ΔF1 would move with another draw of test items, in the part that
  every seed shares (a source that is better on some items and worse on others).  Each item
  contributes per-seed counts ``(tp, n_pred, n_gold)`` (RE: one relation; NER: its
  entities), so micro-F1 of any resample is a weighted sum of counts; ``n_boot`` resamples
  of the items (the same draw for every run) give each run's F1, and the shared part is the
  covariance of *different* runs' F1 over those resamples (within a row, between seeds; and
  between the two rows), ``c_source + c_none − 2 c_between``, floored at 0.  What a run's
  F1 does on the items alone, and no other run does, is already in the seeds' spread on
  these items, so it is not counted twice;
* the standard error is the root of the sum; the test is Welch's t with Satterthwaite's
  degrees of freedom (the items' part counted as known), the 95% interval ΔF1 ± t × se,
  and the two-sided p-value from the same t.

Simulated reports with no true gain (``bench/significance_bench.py``; README "Is the test
calibrated?") reject 5.1% of the comparisons at 0.05 with 3 seeds (4.1-6.6% over its settings),
and the median standard error is 0.95-1.01x the spread ΔF1 really has.  The two-level bootstrap
this replaces (resample the seeds, then the items) rejected 0.6-0.7% with 3 seeds: it counted a
run's own item noise at both levels, so its standard error was about 1.4x too large.

With a single seed, training noise is not measured at all: the interval and p are then the
items' alone (the whole bootstrap variance of ΔF1, normal quantiles) and nothing is called
significant.  A report compares several sources with the same ``none``, so its p-values are a
family: :func:`apply_holm` adds Holm's step-down adjustment (Holm 1979; it holds the
family-wise error rate at ``alpha`` for any dependence between the tests), and a gain is
significant when there are at least ``min_seeds`` (2) seeds and the **adjusted** p <
``alpha`` (0.05).  Selection never looks at test: each run's epoch was picked on val before
this runs.

"Not significant" is only as strong as the test's power, so each comparison also gives the
**detectable gain** (``mde``): the smallest |ΔF1| this test calls significant with
probability ``POWER`` (0.8), ``(t(1 - alpha / 2m) + t(power)) * se`` at the test's degrees of
freedom, ``m`` the family's size (Bonferroni's level, which Holm's first step uses; the later
steps are less strict, so the figure errs high).  A true gain well below it will usually come
out "no".  More seeds shrink it about as one over the square root of the seeds, as far as the
seeds' spread stays what it was and the items' shared part allows: :func:`seeds_needed` gives the
fewest seeds at which it would reach a planned gain (the report's ``[report] plan_gain``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats

NEG = 0  # labels[0] is the negative relation in RE
POWER = 0.8  # the power at which the detectable gain is given


def re_item_counts(gold: Sequence, pred: Sequence, labels: Sequence[str]) -> np.ndarray:
    """``[N, 3]`` counts per item for micro P/R/F1 over every relation but ``labels[0]``."""
    g = np.asarray(gold, dtype=np.int64)
    p = np.asarray(pred, dtype=np.int64)
    return np.stack([(g == p) & (g != NEG), p != NEG, g != NEG], 1).astype(np.float64)


def ner_item_counts(gold: Sequence, pred: Sequence, labels: Sequence[str]) -> np.ndarray:
    """``[N, 3]`` entity counts per sentence (conlleval entities, as :func:`ner_metrics`)."""
    from seqeval.metrics.sequence_labeling import get_entities

    out = np.zeros((len(gold), 3))
    for i, (gs, ps) in enumerate(zip(gold, pred)):
        ge = set(get_entities([labels[int(t)] for t in gs]))
        pe = set(get_entities([labels[int(t)] for t in ps]))
        out[i] = (len(ge & pe), len(pe), len(ge))
    return out


def counts_fn(head_name: str) -> Callable:
    from stages.train import HEADS

    return ner_item_counts if getattr(HEADS.get(head_name), "dataset", "re") == "ner" else re_item_counts


def f1_of(c: np.ndarray) -> np.ndarray:
    """Micro-F1 from counts ``[..., 3]`` (every zero denominator gives 0)."""
    tp, n_pred, n_gold = c[..., 0], c[..., 1], c[..., 2]
    denom = n_pred + n_gold
    return np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=np.float64), where=denom > 0)


def resample_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]``: how often each of ``n`` items is drawn in each resample (with replacement)."""
    idx = rng.integers(0, n, size=(n_boot, n)) + (np.arange(n_boot) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float32)


def _between_seeds(f1: np.ndarray) -> float:
    """Mean covariance, over the item resamples ``[B, S]``, between two different seeds' F1."""
    s = f1.shape[1]
    cov = np.atleast_2d(np.cov(f1, rowvar=False))
    return float((cov.sum() - np.trace(cov)) / (s * (s - 1)))


def compare_counts(base: np.ndarray, others: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0,
                   alpha: float = 0.05, min_seeds: int = 2) -> list[dict]:
    """Each of ``others`` against ``base`` (``none``), one family: every array is ``[S, N, 3]``
    per-seed, per-item counts on the same ``N`` items.  The seeds' spread is pooled over all of
    them (module doc)."""
    groups = [np.asarray(base, dtype=np.float64), *(np.asarray(o, dtype=np.float64) for o in others)]
    n = groups[0].shape[1]
    for g in groups:
        if g.ndim != 3 or g.shape[1:] != (n, 3):
            raise ValueError(f"the sources were scored on different test items: {groups[0].shape} vs {g.shape}")
    f1 = [f1_of(g.sum(1)) for g in groups]  # [S] per row: each run's F1
    dof = sum(len(x) - 1 for x in f1)
    s2 = sum(float(((x - x.mean()) ** 2).sum()) for x in f1) / dof if dof else 0.0
    w = resample_weights(n, n_boot, np.random.default_rng(seed))
    boot = [f1_of((w @ g.transpose(1, 0, 2).reshape(n, -1).astype(np.float32)).reshape(n_boot, len(g), 3).astype(np.float64))
            for g in groups]  # [B, S] per row: each run's F1 on every resample of the items
    out = []
    for f, b in zip(f1[1:], boot[1:]):
        delta = float(f.mean() - f1[0].mean())
        s_o, s_b = len(f), len(f1[0])
        enough = min(s_o, s_b) >= min_seeds
        if s_o >= 2 and s_b >= 2:
            shared = _between_seeds(b) + _between_seeds(boot[0]) - 2 * float(np.cov(b.mean(1), boot[0].mean(1))[0, 1])
            items, seeds = max(0.0, shared), s2 * (1 / s_o + 1 / s_b)
            df = (items + seeds) ** 2 / (seeds ** 2 / dof) if seeds > 0 else np.inf
        else:  # one seed: the items' noise alone, the seeds' unmeasured
            items, seeds, df = float(np.var(b.mean(1) - boot[0].mean(1), ddof=1)), 0.0, np.inf
        se = (items + seeds) ** 0.5
        p = float(2 * stats.t.sf(abs(delta) / se, df)) if se > 0 else 1.0
        half = float(stats.t.ppf(1 - alpha / 2, df)) * se
        out.append({"delta_f1": delta, "ci_low": delta - half, "ci_high": delta + half, "p_value": p,
                    "significant": bool(enough and p < alpha), "enough_seeds": bool(enough),
                    "n_items": int(n), "n_seeds": int(s_o), "n_boot": int(n_boot), "alpha": alpha,
                    "se": se, "se_items": items ** 0.5, "se_seeds": seeds ** 0.5, "df": float(df) if np.isfinite(df) else None,
                    "seed_sd": s2 ** 0.5, "seed_df": int(dof), "rows": len(groups), "power": POWER,
                    "mde": detectable(se, alpha, df=df)})
    return out


def detectable(se: float, alpha: float = 0.05, family: int = 1, power: float = POWER, df: float = np.inf) -> float:
    """The smallest |ΔF1| a two-sided t test at ``df`` degrees of freedom (normal at ``inf``) with
    standard error ``se`` rejects with probability ``power`` at the level ``alpha / family`` (module doc)."""
    q = stats.t.ppf
    return float((q(1 - alpha / (2 * max(family, 1)), df) + q(power, df)) * se)


def seeds_needed(seed_sd: float, items_var: float, target: float, alpha: float = 0.05, family: int = 1,
                 power: float = POWER, rows: int = 2, max_seeds: int = 10_000) -> int | None:
    """The fewest seeds per source (``none`` as many) at which :func:`detectable` falls to ``target``,
    if the seeds' spread ``seed_sd`` and the items' shared variance ``items_var`` stay what they are and
    ``rows`` rows pool the spread; None when no count up to ``max_seeds`` does (the items' shared part
    alone can keep it above ``target``: only more test items help then)."""
    def mde(n: int) -> float:
        seeds = seed_sd ** 2 * 2 / n
        df = (items_var + seeds) ** 2 / (seeds ** 2 / (rows * (n - 1))) if seeds > 0 else np.inf
        return detectable((items_var + seeds) ** 0.5, alpha, family, power, df)

    if mde(max_seeds) > target:
        return None
    lo, hi = 2, max_seeds  # mde falls as n grows (a smaller error, more degrees of freedom)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mde(mid) <= target else (mid + 1, hi)
    return lo


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of m is multiplied
    by m - i (i from 0), made non-decreasing along that order, and capped at 1."""
    m = len(pvals)
    out = [0.0] * m
    run = 0.0
    for i, j in enumerate(sorted(range(m), key=lambda k: pvals[k])):
        run = max(run, min(1.0, (m - i) * float(pvals[j])))
        out[j] = run
    return out


def apply_holm(sigs: Sequence[dict], plan_gain: float | None = None) -> None:
    """Adjust a report's family of comparisons in place: ``p_holm`` (Holm over every non-empty
    result), ``family`` (how many), ``significant`` decided on ``p_holm``, and the detectable
    gain ``mde`` at the family's level.  With ``plan_gain`` (a fraction of F1, e.g. 0.01) and the
    seeds' spread measured: ``seeds_for_gain``, the seeds per source at which ``mde`` would reach it
    (:func:`seeds_needed`; None: no count would)."""
    fam = [s for s in sigs if s]
    for s, adj in zip(fam, holm([s["p_value"] for s in fam])):
        s["p_holm"], s["family"] = adj, len(fam)
        s["significant"] = bool(s["enough_seeds"] and adj < s["alpha"])
        if "se" in s:
            s["mde"] = detectable(s["se"], s["alpha"], len(fam), s.get("power", POWER), s.get("df") or np.inf)
        if plan_gain and s.get("enough_seeds") and s.get("seed_sd", 0) > 0 and "rows" in s:
            s["plan_gain"] = plan_gain
            s["seeds_for_gain"] = seeds_needed(s["seed_sd"], s["se_items"] ** 2, plan_gain, s["alpha"], len(fam),
                                               s.get("power", POWER), s["rows"])


def simulated_report(rng: np.random.Generator, n: int = 1614, sources: int = 4, seeds: int = 3, shift: float = 0.0,
                     item_sd: float = 0.5, noise: float = 0.5, run_sd: float = 0.02, labels: int = 20) -> list[np.ndarray]:
    """A report whose truth is known, for checking this test (``bench/significance_bench.py`` and the
    tests): ``[S, N, 3]`` counts for ``none`` and ``sources`` rows on ``n`` fresh test items.  Each item
    has a gold relation (40% positive, as MNRE's test), a difficulty every run shares and a wrong answer
    most runs share; each row has its own effect per item (fresh draws: with ``shift`` 0 no row is
    better on average, and yet a row is better on some items); each run has a log-odds offset
    (``run_sd``) and its own noise per item (``noise``).  ``shift`` raises every source's log-odds of
    a right answer.  The defaults give about what the shipped MNRE runs show: a run's F1 moves by
    about 0.9 F1 from seed to seed and by 1.6 with the test items (README "Is a gain real?")."""
    gold = np.where(rng.random(n) < 0.4, rng.integers(1, labels + 1, n), 0)
    hard = 1.7 + 3.0 * rng.standard_normal(n)

    def wrong():
        return np.where(gold == 0, rng.integers(1, labels + 1, n),
                        np.where(rng.random(n) < 0.5, 0, (gold + rng.integers(1, labels, n) - 1) % labels + 1))

    usual = wrong()
    rows = []
    for a in range(sources + 1):
        own = item_sd * rng.standard_normal(n) + (shift if a else 0.0)
        runs = []
        for _ in range(seeds):
            logit = hard + own + run_sd * rng.standard_normal() + noise * rng.standard_normal(n)
            right = rng.random(n) < 1 / (1 + np.exp(-logit))
            pred = np.where(right, gold, np.where(rng.random(n) < 0.9, usual, wrong()))
            runs.append(re_item_counts(gold, pred, []))
        rows.append(np.stack(runs))
    return rows


def load_test_counts(run_dirs: Sequence[Path], labels: Sequence[str], counts: Callable, split: str = "test") -> tuple[np.ndarray, list]:
    """Per-seed counts ``[S, N, 3]`` from each run's ``predictions.parquet``, items in manifest order."""
    import pyarrow.parquet as pq

    per_seed, order = [], None
    for d in run_dirs:
        t = pq.read_table(Path(d) / "predictions.parquet").to_pydict()
        pos = [i for i, sp in enumerate(t["split"]) if sp == split]
        pos.sort(key=lambda i: t["index"][i])
        idx = [t["index"][i] for i in pos]
        if order is None:
            order = idx
        elif idx != order:
            raise ValueError(f"{d}: its {split} items differ from the other runs'")
        per_seed.append(counts([t["gold"][i] for i in pos], [t["pred"][i] for i in pos], labels))
    return np.stack(per_seed), order or []


def compare(base_runs: Sequence, runs_by_source: dict[str, Sequence], labels: Sequence[str], head_name: str,
            n_boot: int = 2000, alpha: float = 0.05) -> dict[str, dict]:
    """Every source of ``runs_by_source`` against ``base_runs`` (``none``), one family (``RunResult``-like:
    ``.dir``, ``.metrics``): each source on the seeds it shares with ``none``."""
    fn = counts_fn(head_name)
    seeds = {r.metrics["seed"] for r in base_runs}
    base, order = load_test_counts([r.dir for r in base_runs], labels, fn)
    names, counts = [], []
    for name, runs in runs_by_source.items():
        runs = [r for r in runs if r.metrics["seed"] in seeds]
        if not runs:
            continue
        c, o = load_test_counts([r.dir for r in runs], labels, fn)
        if o != order:
            raise ValueError(f"{name}: scored on other test items than none")
        names.append(name)
        counts.append(c)
    return dict(zip(names, compare_counts(base, counts, n_boot=n_boot, alpha=alpha))) if names else {}
