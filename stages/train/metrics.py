"""MNRE evaluation exactly as HVPNeT/TMR/CAMIM report it.

* Acc = correct / all samples (the negative label included);
* micro P = #(pred == gold != neg) / #(pred != neg);
* micro R = #(pred == gold != neg) / #(gold != neg);
* F1 = 2PR / (P + R); every zero denominator gives 0.

``labels[0]`` is the negative label (``None`` in MNRE).  All values are fractions.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def re_metrics(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Acc, micro P/R/F1 over every label but ``labels[0]``, and a per-relation table."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    neg = 0
    n = len(gold)
    correct = sum(int(g == p) for g, p in zip(gold, pred))
    tp = sum(int(g == p and g != neg) for g, p in zip(gold, pred))
    n_pred = sum(int(p != neg) for p in pred)
    n_gold = sum(int(g != neg) for g in gold)
    p, r, f = _prf(tp, n_pred, n_gold)
    per = {}
    for k, name in enumerate(labels):
        if k == neg:
            continue
        tp_k = sum(int(g == k and q == k) for g, q in zip(gold, pred))
        pk, rk, fk = _prf(tp_k, sum(int(q == k) for q in pred), sum(int(g == k) for g in gold))
        per[name] = {"precision": pk, "recall": rk, "f1": fk, "support": sum(int(g == k) for g in gold)}
    return {"n": n, "acc": correct / n if n else 0.0, "precision": p, "recall": r, "f1": f, "per_label": per}


def metric_fn(head_cls) -> Callable:
    """The head's own metric function (``metrics = "module:function"``) or :func:`re_metrics`."""
    from . import DEFAULT_METRICS

    target = getattr(head_cls, "metrics", None) or DEFAULT_METRICS
    if callable(target):
        return target
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)
