"""The commands of the chain, each over one graph (``camim/graph.py``) built from one Settings.

The CLI in ``camim/cli.py`` parses options into :class:`Settings` and calls one function
here (or the trainer/report with a resolver of the same graph).  Every node prints what it
did and where its output went.
"""

from __future__ import annotations

import logging
import time

from pipeline.config import Settings
from pipeline.progress import fmt_seconds

from .graph import build, caption_node, shipped_sources, train_inputs

log = logging.getLogger("camim")
FULL_REPORT_SOURCES = ("none", "imported:qwen", "imported:minicpm", "imported:blip2", "imported:instructblip")


def data(settings: Settings):
    return build(settings, []).resolve("data")


def captions(settings: Settings, mllms: list[str] | None = None):
    """data → captions of every source; returns (dataset, [captions per source])."""
    mllms = list(mllms or settings.mllms)
    g = build(settings, mllms)
    return g.resolve("data"), [g.resolve(caption_node(m)) for m in mllms]


def features(settings: Settings, mllms: list[str] | None = None, graph=None):
    """data → captions → text features (and, with an image source, ground → image features → streams);
    returns (dataset, [captions per source], text features)."""
    mllms = list(mllms or settings.mllms)
    g = graph or build(settings, mllms)
    feats = g.resolve("text_features")
    if "image_streams" in g:
        g.resolve("image_streams")
    return g.resolve("data"), [g.resolve(caption_node(m)) for m in mllms], feats


def ground(settings: Settings):
    """data → grounding crops; returns (dataset, grounding or None)."""
    from stages.ground import run_grounding, summary_lines

    g = build(settings, [])
    ds = g.resolve("data")
    if "ground" in g:
        return ds, g.resolve("ground")
    grounding = run_grounding(settings, ds.records.to_pylist())  # `camim ground` asked for it by name
    for line in summary_lines(grounding):
        print(line)
    return ds, grounding


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


def demo(settings: Settings, jobs: int | str | None = None) -> float:
    """data → captions (every shipped source) → features → train + report (``[report] demo_*``) on the bundled sample."""
    from stages.report import run_report, seed_list

    t0 = time.perf_counter()
    sources = shipped_sources(settings)
    g = build(settings, sources)
    features(settings, sources, g)
    rconf = settings.section("report")
    seeds = seed_list(rconf.get("demo_seeds", [1]), "[report] demo_seeds")
    epochs = int(rconf.get("demo_epochs", 3))
    smoke = (f"SMOKE CHECK of the chain, not a comparison: {len(seeds)} seed(s), {epochs} epochs on the bundled sample "
             f"(300 train / 100 test samples). That is too little data to learn the task: F1 here is far below the full "
             f"data's (README: the caption-model comparison) and moves by tens of points with any change to training, "
             f"down to 0 for a source. With one seed, training noise is unmeasured, so no difference here can be "
             f"called significant; the significance columns say so.")
    out = run_report(settings, sources, lambda m: train_inputs(g, m), seeds, {"epochs": epochs}, name="demo", quiet_runs=True,
                     smoke=smoke, jobs=jobs)
    n_sig = sum(bool((r.get("significance") or {}).get("significant")) for r in out["rows"])
    why = " (one seed: training noise is unmeasured)" if len(seeds) < 2 else " (t test over the seeds' spread and the test items, Holm-adjusted p<0.05)"
    print(f"demo: {n_sig} of {len(out['rows']) - 1} differences to 'none' are significant{why}.")
    print("demo: the real caption-model comparison (full MNRE, 3 seeds):\n"
          f"  MNRE_SOURCE=<MNRE folder> make report MLLM={','.join(FULL_REPORT_SOURCES)}")
    took = time.perf_counter() - t0
    print(f"demo: chain finished in {fmt_seconds(took)} ({took:.2f}s); cache at {settings.cache_dir}")
    return took
