"""How well the report's test against ``none`` is calibrated: simulated reports whose truth is known.

Each simulated report (``significance.simulated_report``: fresh test items and runs, figures like
the shipped MNRE runs') has ``none`` and 4 sources.  With no true gain, a calibrated test rejects
5% of the comparisons at p < 0.05 (before Holm's adjustment) and 1% at 0.01, and its median
standard error equals the spread the observed ΔF1 really has over the reports.  With a true gain
it prints how often the gain is found (the power).  Nothing is trained; numpy only.

``BENCH_REPORTS`` (default 500) simulated reports per setting, ``BENCH_BOOT`` (default 500) item
resamples each.
"""

from __future__ import annotations

import os
import time

import numpy as np


def main(settings=None, argv: list[str] | None = None) -> int:
    from stages.report.significance import compare_counts, simulated_report

    reps = int(os.environ.get("BENCH_REPORTS", "500"))
    n_boot = int(os.environ.get("BENCH_BOOT", "500"))
    print(f"significance: {reps} simulated reports per setting (none + 4 sources, 1,614 test items), "
          f"{n_boot} item resamples each; rejection rates are over the 4 comparisons of every report, before Holm")
    print(f"{'setting':44s} {'seeds':>5s} {'mean dF1':>8s} {'p<0.05':>7s} {'p<0.01':>7s} {'se (median)':>11s} "
          f"{'dF1 spread':>10s} {'ratio':>6s}")
    settings_ = [("no gain", 3, {}), ("no gain, 2 seeds", 2, {}), ("no gain, 6 seeds", 6, {}),
                 ("no gain, seeds' spread about 1.8x wider", 3, {"noise": 0.9, "run_sd": 0.15}),
                 ("every source better (log-odds +0.12)", 3, {"shift": 0.12})]
    for name, seeds, kw in settings_:
        rng = np.random.default_rng(2026)
        t0 = time.perf_counter()
        d, se, p = [], [], []
        for i in range(reps):
            rows = simulated_report(rng, seeds=seeds, **kw)
            for r in compare_counts(rows[0], rows[1:], n_boot=n_boot, seed=i):
                d.append(r["delta_f1"])
                se.append(r["se"])
                p.append(r["p_value"])
        d, se, p = np.array(d) * 100, np.array(se) * 100, np.array(p)
        spread = float(d.std(ddof=1))
        print(f"{name:44s} {seeds:5d} {d.mean():+8.2f} {np.mean(p < 0.05):7.3f} {np.mean(p < 0.01):7.3f} "
              f"{np.median(se):11.3f} {spread:10.3f} {np.median(se) / spread:6.2f}   ({time.perf_counter() - t0:.0f}s)")
    print("a calibrated test: p<0.05 near 0.05 and ratio near 1 with no gain (dF1 in F1 points; 'mean dF1' is the "
          "mean over the simulated reports)")
    return 0
