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


def dry_run(settings: Settings, what: str, mllms: list[str] | None = None) -> dict:
    """What ``captions`` / ``features`` / ``report`` would do: items total, cached, new per stage,
    and for API backends the estimated tokens and cost.  Nothing is sent and nothing is written."""
    from pipeline.store import Store
    from stages.captions import CaptionStage, make_captioner
    from stages.data import prepare
    from stages.features import text_stage
    from stages.features.text import (
        caption_item_key,
        sentence_item_key,
        tokens_item_key,
    )

    store = Store(settings.cache_dir)
    ds = prepare(settings, write=False)
    records = ds.records.to_pylist()
    print(f"dry run: {len(records)} records of {settings.task} ({ds.source}); nothing is sent and nothing is written")
    out = {"records": len(records), "captions": {}, "text_features": None}
    cap_texts: set[str] = set()
    for mllm in mllms or settings.mllms:
        captioner = make_captioner(mllm, settings)
        stage = CaptionStage(captioner)
        items = captioner.items(records)
        sc = store.stage(stage.name, stage.key)
        rows = {r["item_key"]: r for r in sc.rows()} if sc.part_paths() else {}
        ok = [k for k in (it["item_key"] for it in items) if rows.get(k, {}).get("ok")]
        transient = [k for k in (it["item_key"] for it in items)
                     if k in rows and not rows[k]["ok"] and (rows[k].get("error") or "").startswith("transient")]
        new = [it for it in items if it["item_key"] not in rows or it["item_key"] in set(transient)]
        line = {"items": len(items), "cached": len(items) - len(new), "new": len(new)}
        msg = f"  captions {mllm} [{stage.key}]: {len(items)} items, {line['cached']} cached, {len(new)} new"
        if hasattr(captioner, "estimate"):
            done_out = [rows[k].get("output_tokens") for k in ok if rows[k].get("output_tokens")]
            est = captioner.estimate(new, sum(done_out) / len(done_out) if done_out else None)
            line.update(est)
            msg += (f"; estimated {est['input_tokens']:,} input + {est['output_tokens']:,} output tokens "
                    f"(output {'as measured on this key' if est['output_from'] == 'measured' else 'at est_output_tokens'}; "
                    f"at most {est['output_tokens_max']:,} at max_tokens), ")
            msg += (f"cost ${est['cost_usd']:.4f} (at most ${est['cost_usd_max']:.4f})" if est["priced"]
                    else "cost unknown: set price_in_per_mtok / price_out_per_mtok")
        print(msg)
        out["captions"][mllm] = line
        cap_texts |= {rows[k].get("caption") or "" for k in ok}
    if what in ("features", "report") and settings.task != "images":
        tf = text_stage(settings)
        sc = store.stage(tf.name, tf.key)
        have = {r["item_key"] for r in sc.rows() if r["ok"]} if sc.part_paths() else set()
        keys = {tokens_item_key(r["tokens"]) if "tags" in r else sentence_item_key(r) for r in records}
        keys |= {caption_item_key(t) for t in cap_texts if t}
        n_new = len(keys - have)
        print(f"  text_features [{tf.key}]: {len(keys)} items known now, {len(keys) - n_new} cached, {n_new} new"
              + (" (captions still to be made add theirs)" if any(v["new"] for v in out["captions"].values()) else ""))
        out["text_features"] = {"items": len(keys), "new": n_new}
    return out


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
             f"(300 train / 100 test samples). With one seed, training noise is unmeasured, so no difference here can be "
             f"called significant; the significance columns say so.")
    out = run_report(settings, shipped_sources(settings), seeds, {"epochs": epochs}, name="demo", quiet_runs=True, smoke=smoke)
    n_sig = sum(bool((r.get("significance") or {}).get("significant")) for r in out["rows"])
    why = " (one seed: training noise is unmeasured)" if len(seeds) < 2 else " (paired bootstrap over seeds and items, p<0.05)"
    print(f"demo: {n_sig} of {len(out['rows']) - 1} differences to 'none' are significant{why}.")
    print("demo: the real caption-model comparison (full MNRE, 3 seeds):\n"
          f"  MNRE_SOURCE=<MNRE folder> make report MLLM={','.join(FULL_REPORT_SOURCES)}")
    took = time.perf_counter() - t0
    print(f"demo: chain finished in {fmt_seconds(took)} ({took:.2f}s); cache at {settings.cache_dir}")
    return took
