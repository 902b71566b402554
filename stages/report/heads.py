"""Head-vs-head comparison (e.g. CAM+MI against REMOTE on MNRE).

Every head is trained on the same caches with the same caption sources and seeds
(finished runs are reused); ``reports/<name>.md`` / ``.html`` / ``.json`` hold one row
per (head, caption source): test Acc, P, R, F1 as mean ± sample std over seeds, the F1
difference to the first head with the same source, and val F1.
"""

from __future__ import annotations

import html
import json
import time

from pipeline.config import Settings
from pipeline.store import atomic_write_bytes, atomic_write_json

from . import DISPLAY, html_table, md_table, pct, summarise, text_table


def run_head_comparison(settings: Settings, heads: list[str], sources: list[str] | None = None, seeds: list[int] | None = None,
                        overrides: dict | None = None, name: str | None = None) -> dict:
    from stages.chain import shipped_sources
    from stages.train.trainer import load_data, train_one, train_options

    t0 = time.perf_counter()
    rconf = settings.section("report")
    conf = train_options(settings, overrides)
    sources = sources or list(rconf.get("sources") or []) or shipped_sources(settings)
    seeds = seeds or list(rconf.get("seeds") or conf["seeds"])
    name = name or f"heads-{settings.task}"
    rows = []
    for src in sources:
        for head in heads:
            over = {**(overrides or {}), "head": head}
            data = load_data(settings, src, head)
            runs = []
            for seed in seeds:
                print(f"report: head {head}, {src}, seed {seed}")
                runs.append(train_one(settings, src, seed, over, data=data))
            row = summarise(src, runs, data.modalities)
            row["head"] = head
            rows.append(row)
            del data
    head_row = ["head", "MLLM", "Acc", "P", "R", "F1", "ΔF1 vs " + heads[0], "val F1"]
    body = []
    for r in rows:
        ref = next(x for x in rows if x["source"] == r["source"] and x["head"] == heads[0])
        d = "" if ref is r else f"{(r['test_f1'][0] - ref['test_f1'][0]) * 100:+.2f}"
        body.append([r["head"], DISPLAY.get(r["source"], r["source"]), pct(r["test_acc"]), pct(r["test_precision"]),
                     pct(r["test_recall"]), pct(r["test_f1"]), d, pct(r["val_f1"])])
    meta = {"task": settings.task, "source": settings.source or "bundled sample", "heads": heads, "sources": sources,
            "seeds": seeds, "wall_s": time.perf_counter() - t0}
    intro = (f"Task `{settings.task}` from `{meta['source']}`; heads {', '.join(f'`{h}`' for h in heads)} on the same "
             f"caches, caption sources and seeds {seeds}; test scores of the epoch with the best validation F1 "
             "(mean ± sample std over seeds, in %).")
    runs = {f"{r['head']} {r['source']}": r["runs"] for r in rows}
    md = [f"# Head comparison: {name}", "", intro, "", md_table(head_row, body), "",
          "Runs (under runs/):", "", "```json", json.dumps(runs, indent=2), "```", ""]
    out = settings.reports_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "html": out / f"{name}.html", "json": out / f"{name}.json"}
    atomic_write_bytes(paths["md"], "\n".join(md).encode())
    atomic_write_bytes(paths["html"], (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title></head><body>"
                                       f"<h1>Head comparison: {html.escape(name)}</h1><p>{html.escape(intro)}</p>"
                                       f"{html_table(head_row, body)}<pre>{html.escape(json.dumps(runs, indent=2))}</pre></body></html>").encode())
    atomic_write_json(paths["json"], {"meta": meta, "rows": rows})
    print(text_table(head_row, body))
    print(f"report: {len(heads)} head(s) x {len(sources)} source(s) x {len(seeds)} seed(s) in {meta['wall_s']:.1f}s -> {paths['md']}")
    return {"rows": rows, "paths": paths, "meta": meta}
