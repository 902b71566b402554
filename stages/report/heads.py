"""Head-vs-head comparison (e.g. CAM+MI against REMOTE on MNRE).

``run_report(..., heads=[...])`` trains every head on the same caches with the same
caption sources and seeds (finished runs are reused); ``reports/<name>.md`` / ``.html`` / ``.json`` hold one row
per (head, caption source): test Acc, P, R, F1 as mean ± sample std over seeds, the F1
difference to the first head with the same source, and val F1.
"""

from __future__ import annotations

import html
import json
import time

from pipeline.config import Settings
from pipeline.store import atomic_write_bytes, atomic_write_json

from .tables import display, html_table, html_text, md_table, pct, text_table


def write_head_report(settings: Settings, rows: list[dict], heads: list[str], sources: list[str], seeds: list[int],
                      name: str, t0: float) -> dict:
    """The head-comparison page of rows that :func:`stages.report.run_report` trained."""
    head_row = ["head", "MLLM", "Acc", "P", "R", "F1", "ΔF1 vs " + heads[0], "val F1"]
    body = []
    for r in rows:
        ref = next(x for x in rows if x["source"] == r["source"] and x["head"] == heads[0])
        d = "" if ref is r else f"{(r['test_f1'][0] - ref['test_f1'][0]) * 100:+.2f}"
        body.append([r["head"], display(r["source"]), pct(r["test_acc"]), pct(r["test_precision"]),
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
                                       f"<h1>Head comparison: {html.escape(name)}</h1><p>{html_text(intro)}</p>"
                                       f"{html_table(head_row, body)}<pre>{html.escape(json.dumps(runs, indent=2))}</pre></body></html>").encode())
    atomic_write_json(paths["json"], {"meta": meta, "rows": rows})
    print(text_table(head_row, body))
    print(f"report: {len(heads)} head(s) x {len(sources)} source(s) x {len(seeds)} seed(s) in {meta['wall_s']:.1f}s -> {paths['md']}")
    return {"rows": rows, "paths": paths, "meta": meta}
