"""The stage chain: each command runs its upstream stages (cached, so cheap) first.

The CLI in ``pipeline/cli.py`` parses options into :class:`Settings` and calls one
function here.  Every function prints what it did and where the output went.
"""

from __future__ import annotations

import logging
import time

from pipeline.config import Settings
from pipeline.progress import fmt_seconds

log = logging.getLogger("camim")
FULL_REPORT_SOURCES = ("none", "imported:qwen", "imported:minicpm", "imported:blip2", "imported:instructblip")


def data(settings: Settings):
    from stages.data import prepare, summary_lines

    ds = prepare(settings)
    for line in summary_lines(ds):
        print(line)
    return ds


def captions(settings: Settings, mllms: list[str] | None = None, ds=None):
    from stages.captions import run_captions

    ds = ds or data(settings)
    records = ds.records.to_pylist()
    out = []
    for mllm in mllms or settings.mllms:
        caps = run_captions(settings, mllm, records)
        for line in caps.lines():
            print(line)
        print(f"  -> {caps.cache.dir}")
        out.append(caps)
    return ds, out


def features(settings: Settings, mllms: list[str] | None = None):
    from stages.features import run_text_features

    ds, caps = captions(settings, mllms)
    feats = run_text_features(settings, ds.records.to_pylist(), caps)
    print(feats.summary.line())
    print(f"  -> {feats.cache.dir}")
    from stages.features.visual import has_images, run_visual

    if has_images(settings):  # the image half: grounding crops + image features + streams
        run_visual(settings, ds.records.to_pylist())
    return ds, caps, feats


def ground(settings: Settings):
    from stages.ground import run_grounding, summary_lines

    ds = data(settings)
    g = run_grounding(settings, ds.records.to_pylist())
    for line in summary_lines(g):
        print(line)
    return ds, g


def shipped_sources(settings: Settings) -> list[str]:
    from stages.data import get_task

    return ["none"] + [f"imported:{s}" for s in get_task(settings).caption_sources(settings)]


def demo(settings: Settings) -> float:
    """data → captions (every shipped source) → features → train + report (``[report] demo_*``) on the bundled sample."""
    from stages.report import run_report

    t0 = time.perf_counter()
    features(settings, shipped_sources(settings))
    rconf = settings.section("report")
    seeds = [int(x) for x in rconf.get("demo_seeds", [1])]
    epochs = int(rconf.get("demo_epochs", 3))
    smoke = (f"SMOKE CHECK of the chain, not a comparison: {len(seeds)} seed(s), {epochs} epochs on the bundled sample "
             f"(300 train / 100 test samples). Differences this small are noise; the significance columns say so.")
    out = run_report(settings, shipped_sources(settings), seeds, {"epochs": epochs}, name="demo", quiet_runs=True, smoke=smoke)
    n_sig = sum(bool((r.get("significance") or {}).get("significant")) for r in out["rows"])
    print(f"demo: {n_sig} of {len(out['rows']) - 1} differences to 'none' are significant (paired bootstrap, p<0.05).")
    print("demo: the real caption-model comparison (full MNRE, 3 seeds):\n"
          f"  MNRE_SOURCE=<MNRE folder> make report MLLM={','.join(FULL_REPORT_SOURCES)}")
    took = time.perf_counter() - t0
    print(f"demo: chain finished in {fmt_seconds(took)} ({took:.2f}s); cache at {settings.cache_dir}")
    return took
