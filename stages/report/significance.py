"""Is a caption source's gain over ``none`` real, or noise?

Two kinds of noise move a test F1: which test items there are, and how training went (the
seed).  The test is a **two-level paired bootstrap** over seeds and test items (a
hierarchical bootstrap; Koehn 2004 and Berg-Kirkpatrick et al. 2012 for the item level,
Dror et al. 2019 for seeds):

* both rows were trained with the same seeds and scored on the same test items;
* each item contributes per-seed counts ``(tp, n_pred, n_gold)`` (RE: one relation;
  NER: its entities), so micro-F1 of any resample is a weighted sum of counts;
* one resample draws S seed pairs with replacement, and N items with replacement (the
  SAME items for both sources and every seed), and computes ΔF1 = mean over the drawn seeds
  of F1(source) − F1(none) on the drawn items;
* the 95% interval is the 2.5/97.5 percentiles of the resampled ΔF1;
* the two-sided p-value is the share of resamples whose ΔF1, centred on the observed one,
  lies at least as far from it as the observed ΔF1 lies from 0 (``(count + 1) / (B + 1)``).

With a single seed, training noise is not measured at all: the interval and p are still
given (item noise only) but nothing is called significant.  A report compares several
sources with the same ``none``, so its p-values are a family: :func:`apply_holm` adds Holm's
step-down adjustment (Holm 1979; it holds the family-wise error rate at ``alpha`` for any
dependence between the tests), and a gain is significant when there are at least
``min_seeds`` (2) seeds and the **adjusted** p < ``alpha`` (0.05).  Selection never looks
at test: each run's epoch was picked on val before this runs.

"Not significant" is only as strong as the test's power, so each comparison also gives the
**detectable gain** (``mde``): the smallest |ΔF1| this test calls significant with
probability ``POWER`` (0.8), ``(z(1 - alpha / 2m) + z(power)) * se``, where ``se`` is the
standard deviation of the resampled ΔF1 and ``m`` the family's size (Bonferroni's level,
which Holm's first step uses; the later steps are less strict, so the figure errs high).  It
is a normal approximation to the bootstrap distribution.  A true gain well below it will
usually come out "no".  More seeds usually shrink it, at best as one over the square root of the
seeds; on MNRE going from 3 to 6 seeds gave 1.0-1.27x, as the new seeds spread ΔF1 wider (README).
"""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

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


def paired_bootstrap(base: np.ndarray, other: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05, min_seeds: int = 2) -> dict:
    """``base`` and ``other``: ``[S, N, 3]`` per-seed, per-item counts on the same items."""
    if base.shape != other.shape:
        raise ValueError(f"paired test needs the same seeds and items: {base.shape} vs {other.shape}")
    s, n, _ = base.shape
    diff_obs = float(np.mean(f1_of(other.sum(1)) - f1_of(base.sum(1))))
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, n), dtype=np.float32)
    idx = rng.integers(0, n, size=(n_boot, n))
    rows = np.repeat(np.arange(n_boot), n)
    np.add.at(w, (rows, idx.ravel()), 1.0)
    flat_b = base.transpose(1, 0, 2).reshape(n, s * 3).astype(np.float32)
    flat_o = other.transpose(1, 0, 2).reshape(n, s * 3).astype(np.float32)
    cb = (w @ flat_b).reshape(n_boot, s, 3).astype(np.float64)
    co = (w @ flat_o).reshape(n_boot, s, 3).astype(np.float64)
    per_seed = f1_of(co) - f1_of(cb)  # [B, S]: each seed's ΔF1 on the resampled items
    pick = rng.integers(0, s, size=(n_boot, s))  # and the seeds, resampled too
    deltas = np.take_along_axis(per_seed, pick, axis=1).mean(1)
    lo, hi = np.percentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    extreme = int(np.sum(np.abs(deltas - diff_obs) >= abs(diff_obs)))
    p = (extreme + 1) / (n_boot + 1)
    enough = s >= min_seeds
    se = float(np.std(deltas, ddof=1))
    return {"delta_f1": diff_obs, "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p),
            "significant": bool(enough and p < alpha), "enough_seeds": bool(enough),
            "n_items": int(n), "n_seeds": int(s), "n_boot": int(n_boot), "alpha": alpha,
            "se": se, "power": POWER, "mde": detectable(se, alpha)}


def detectable(se: float, alpha: float = 0.05, family: int = 1, power: float = POWER) -> float:
    """The smallest |ΔF1| a test with standard error ``se`` rejects with probability ``power`` at
    the two-sided level ``alpha / family`` (normal approximation; module doc)."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha / (2 * max(family, 1))) + z(power)) * se


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


def apply_holm(sigs: Sequence[dict]) -> None:
    """Adjust a report's family of comparisons in place: ``p_holm`` (Holm over every non-empty
    result), ``family`` (how many), ``significant`` decided on ``p_holm``, and the detectable
    gain ``mde`` at the family's level."""
    fam = [s for s in sigs if s]
    for s, adj in zip(fam, holm([s["p_value"] for s in fam])):
        s["p_holm"], s["family"] = adj, len(fam)
        s["significant"] = bool(s["enough_seeds"] and adj < s["alpha"])
        if "se" in s:
            s["mde"] = detectable(s["se"], s["alpha"], len(fam), s.get("power", POWER))


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


def compare(base_runs: Sequence, other_runs: Sequence, labels: Sequence[str], head_name: str, n_boot: int = 2000,
            alpha: float = 0.05) -> dict:
    """Pair the runs by seed and test ``other`` against ``base`` (``RunResult``-like: ``.dir``, ``.metrics``)."""
    by_seed = {r.metrics["seed"]: r for r in base_runs}
    pairs = [(by_seed[r.metrics["seed"]], r) for r in other_runs if r.metrics["seed"] in by_seed]
    if not pairs:
        return {}
    fn = counts_fn(head_name)
    cb, ib = load_test_counts([b.dir for b, _ in pairs], labels, fn)
    co, io = load_test_counts([o.dir for _, o in pairs], labels, fn)
    if ib != io:
        raise ValueError("the two sources were scored on different test items")
    return paired_bootstrap(cb, co, n_boot=n_boot, alpha=alpha)
