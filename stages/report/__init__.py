"""The caption-model comparison report (the paper's Table 2, on your data).

For every caption source (default ``none`` + every shipped imported source) and
every seed, the head is trained on cached features (finished runs are reused, so
an interrupted report resumes).  ``reports/<name>.md`` / ``.html`` hold the table
(MLLM, CapLen = mean words per caption over the dataset's unique captions, Acc,
P, R, F1 as mean ± sample std over seeds, and the F1 gain over ``none``), a bar
chart (``<name>.png``), per-relation test F1 for the best source and ``none``, and
the exact configs and cache keys.  ``<name>.json`` holds every number.
Adding an MLLM = naming one more source (``--mllm none,imported:qwen,imported:/my/caps``).
"""

from __future__ import annotations

import html
import statistics
import time
from pathlib import Path

from pipeline.config import Settings
from pipeline.store import atomic_write_bytes, atomic_write_json

DISPLAY = {"none": "none (text only)", "imported:blip2": "BLIP-2", "imported:instructblip": "InstructBLIP",
           "imported:qwen": "QwenVL-Plus", "imported:minicpm": "MiniCPM-V"}
COLS = ("acc", "precision", "recall", "f1")


def _ms(vals: list[float]) -> tuple[float, float]:
    return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else (0.0, 0.0)


def summarise(source: str, runs: list, modalities: dict) -> dict:
    row = {"source": source, "name": DISPLAY.get(source, source), "seeds": [r.metrics["seed"] for r in runs],
           "runs": [r.run_id for r in runs], "caplen": modalities.get("caption_len_words", 0.0),
           "captions": modalities.get("captions", 0), "modalities": modalities,
           "cache_keys": runs[0].config["cache_keys"] if runs else {}}
    for split in ("val", "test"):
        for c in COLS:
            row[f"{split}_{c}"] = _ms([r.metrics[split][c] for r in runs if split in r.metrics])
    labels = list(runs[0].metrics["test"]["per_label"]) if runs and "test" in runs[0].metrics else []
    row["per_label_f1"] = {lab: _ms([r.metrics["test"]["per_label"][lab]["f1"] for r in runs])[0] for lab in labels}
    row["support"] = {lab: runs[0].metrics["test"]["per_label"][lab]["support"] for lab in labels}
    return row


def pct(ms: tuple[float, float]) -> str:
    return f"{ms[0] * 100:.2f} ± {ms[1] * 100:.2f}"


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    base = next((r for r in rows if r["source"] == "none"), None)
    head = ["MLLM", "CapLen", "Acc", "P", "R", "F1", "ΔF1 vs none", "val F1"]
    out = []
    for r in rows:
        gain = "" if base is None or r is base else f"{(r['test_f1'][0] - base['test_f1'][0]) * 100:+.2f}"
        cap = f"{r['caplen']:.1f}" if r["captions"] else "-"
        out.append([r["name"], cap, pct(r["test_acc"]), pct(r["test_precision"]), pct(r["test_recall"]),
                    pct(r["test_f1"]), gain, pct(r["val_f1"])])
    return head, out


def text_table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    names = [r["name"] for r in rows]
    means = [r["test_f1"][0] * 100 for r in rows]
    errs = [r["test_f1"][1] * 100 for r in rows]
    ax.bar(names, means, yerr=errs, capsize=4, color=["#999999" if r["source"] == "none" else "#3b75af" for r in rows])
    for i, m in enumerate(means):
        ax.text(i, m + 0.5, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("test micro-F1 (%)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(means + [1]) * 1.15)
    plt.xticks(rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def per_label_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    base = next((r for r in rows if r["source"] == "none"), None)
    best = max(rows, key=lambda r: r["test_f1"][0]) if rows else None
    if best is None:
        return None
    cols = [best] if base is None or base is best else [best, base]
    head = ["relation", "support"] + [f"F1 {r['name']}" for r in cols]
    out = [[lab, str(best["support"][lab])] + [f"{r['per_label_f1'][lab] * 100:.1f}" for r in cols]
           for lab in best["per_label_f1"]]
    return head, out


def write_report(rows: list[dict], meta: dict, out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    title = f"{meta['task']} ({meta['records']} samples): head {meta['head']}, {len(meta['seeds'])} seed(s)"
    bar_chart(rows, png, title)
    head, body = table_rows(rows)
    pl = per_label_rows(rows)
    configs = {r["source"]: {"runs": r["runs"], "cache_keys": r["cache_keys"], "modalities": r["modalities"]} for r in rows}
    import json

    md = [f"# Caption-model comparison: {name}", "",
          f"Task `{meta['task']}` from `{meta['source']}`; head `{meta['head']}`; seeds {meta['seeds']}; "
          f"test scores of the epoch with the best validation micro-F1 (mean ± sample std over seeds, in %). "
          f"Acc counts every sample; P/R/F1 are micro-averaged over every relation except `None`. "
          f"CapLen = mean words per caption over the dataset's unique captions.", "",
          md_table(head, body), "", f"![test F1 per caption source]({png.name})", ""]
    if pl:
        md += ["## Per-relation test F1 (best source and `none`)", "", md_table(*pl), ""]
    md += ["## Configuration", "", "Trainer and head options:", "", "```json", json.dumps(meta["options"], indent=2, sort_keys=True),
           "```", "", "Runs and cache keys per source:", "", "```json", json.dumps(configs, indent=2, sort_keys=True), "```", "",
           f"Report built in {meta['wall_s']:.1f}s.", ""]
    paths = {"md": out_dir / f"{name}.md", "html": out_dir / f"{name}.html", "png": png, "json": out_dir / f"{name}.json"}
    atomic_write_bytes(paths["md"], "\n".join(md).encode())
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:2px 6px}table{border-collapse:collapse}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title><style>{style}</style></head><body>",
             f"<h1>Caption-model comparison: {html.escape(name)}</h1>", f"<p>{html.escape(md[2])}</p>", html_table(head, body),
             f"<p><img src='{html.escape(png.name)}' alt='test F1 per caption source'></p>"]
    if pl:
        parts += ["<h2>Per-relation test F1 (best source and none)</h2>", html_table(*pl)]
    parts += ["<h2>Configuration</h2><pre>", html.escape(json.dumps({"options": meta["options"], "sources": configs}, indent=2, sort_keys=True)),
              "</pre></body></html>"]
    atomic_write_bytes(paths["html"], "".join(parts).encode())
    atomic_write_json(paths["json"], {"meta": meta, "rows": rows})
    return paths


def run_report(settings: Settings, sources: list[str] | None = None, seeds: list[int] | None = None,
               overrides: dict | None = None, name: str | None = None, quiet_runs: bool = False) -> dict:
    from stages.chain import shipped_sources
    from stages.train.trainer import load_data, train_one, train_options

    t0 = time.perf_counter()
    rconf = settings.section("report")
    conf = train_options(settings, overrides)
    sources = sources or list(rconf.get("sources") or []) or shipped_sources(settings)
    seeds = seeds or list(rconf.get("seeds") or conf["seeds"])
    name = name or rconf.get("name", "captions")
    rows = []
    n_records = 0
    for src in sources:
        data = load_data(settings, src, conf["head"])
        n_records = len(data.records)
        runs = []
        for seed in seeds:
            print(f"report: {src} seed {seed}")
            runs.append(train_one(settings, src, seed, overrides, data=data, quiet=quiet_runs))
        rows.append(summarise(src, runs, data.modalities))
        del data
    meta = {"task": settings.task, "source": settings.source or "bundled sample", "head": conf["head"], "seeds": seeds,
            "records": n_records, "options": {k: v for k, v in sorted(conf.items()) if k != "seeds"},
            "wall_s": time.perf_counter() - t0}
    paths = write_report(rows, meta, settings.reports_dir, name)
    head, body = table_rows(rows)
    print(text_table(head, body))
    print(f"report: {len(sources)} source(s) x {len(seeds)} seed(s) in {meta['wall_s']:.1f}s -> {paths['md']}, {paths['html']}, {paths['png']}")
    return {"rows": rows, "paths": paths, "meta": meta}
