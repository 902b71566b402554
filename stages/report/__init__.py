"""The caption-model comparison report (the paper's Table 2, on your data).

For every caption source (the application passes ``none`` + every shipped imported
source by default) and every seed, the head is trained on cached features (finished runs are reused, so
an interrupted report resumes).  ``reports/<name>.md`` / ``.html`` hold the table
(MLLM, CapLen = mean words per caption over the dataset's unique captions, Acc,
P, R, F1 as mean ± sample std over seeds, the F1 gain over ``none`` with its paired
significance, val F1, and the mean wall time of one run of the source), a bar
chart (``<name>.png``), per-relation test F1 for the best source and ``none``, and
the exact configs and cache keys.  ``<name>.json`` holds every number.
Adding an MLLM = naming one more source (``--mllm none,imported:qwen,imported:/my/caps``).
"""

from __future__ import annotations

import html
import math
import statistics
import time
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.store import atomic_write_bytes, atomic_write_json

from .tables import control_of, display, html_table, html_text, md_table, pct, text_table

COLS = ("acc", "precision", "recall", "f1")
SIG_NOTE = ("ΔF1 vs none: the source's mean F1 over seeds minus none's; 95% CI and p from a t test whose standard error "
            "adds the seeds' spread (pooled over every row of the report) and the part of the test items' noise that all "
            "seeds share (2,000 resamples of the items, the same for every run; see stages/report/significance.py). "
            "p (Holm): p adjusted by Holm's step-down method over every source compared with none in this report "
            "(family-wise error rate 0.05). significant: p (Holm) < 0.05 with at least 2 seeds; with 1 seed training noise "
            "is unmeasured and nothing is called significant. detectable: the smallest gain (either way) this test calls "
            "significant 4 times in 5 (80% power, at the Holm family's strictest level), from the spread of the resampled "
            "ΔF1; a true gain well below it usually comes out 'no', so 'no' is not evidence of no effect. More seeds "
            "usually shrink it, but only as far as their spread allows (README: the detectable column, 3 and 6 seeds).")


def _ms(vals: list[float]) -> tuple[float, float]:
    return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else (0.0, 0.0)


def summarise(source: str, runs: list, modalities: dict) -> dict:
    row = {"source": source, "name": display(source), "seeds": [r.metrics["seed"] for r in runs],
           "runs": [r.run_id for r in runs], "caplen": modalities.get("caption_len_words", 0.0),
           "captions": modalities.get("captions", 0), "modalities": modalities,
           "cache_keys": runs[0].config["cache_keys"] if runs else {}}
    for split in ("val", "test"):
        for c in COLS:
            row[f"{split}_{c}"] = _ms([r.metrics[split][c] for r in runs if split in r.metrics])
    row["train_s"] = _ms([float(r.metrics.get("wall_s", 0.0)) for r in runs])  # what one run of this source costs
    peaks = [int(r.metrics["peak_memory_bytes"]) for r in runs if r.metrics.get("peak_memory_bytes")]
    row["peak_memory_bytes"] = max(peaks) if peaks else None  # the most one run took (runs before it was kept: none)
    labels = list(runs[0].metrics["test"]["per_label"]) if runs and "test" in runs[0].metrics else []
    row["per_label_f1"] = {lab: _ms([r.metrics["test"]["per_label"][lab]["f1"] for r in runs])[0] for lab in labels}
    row["support"] = {lab: runs[0].metrics["test"]["per_label"][lab]["support"] for lab in labels}
    return row


def shown_mde(sig: dict) -> float | str:
    """The detectable gain a table shows, or why it shows none: with one seed training noise is
    unmeasured, so the spread (and the power) would be the items' alone; with no spread both sources
    scored alike on every resample, so the power figure means nothing."""
    if "mde" not in sig:
        return ""
    if not sig.get("enough_seeds", True):
        return f"n/a ({sig.get('n_seeds', 1)} seed)"
    return sig["mde"] if sig.get("se", 1.0) > 0 else "n/a (no spread)"


def sig_cells(sig: dict | None) -> list[str]:
    """ΔF1 [95% CI], p, p (Holm), a mark (``*``: significant at the report's alpha after Holm) and
    the detectable gain (±, at 80% power)."""
    if not sig:
        return ["", "", "", "", "", ""]
    verdict = "yes *" if sig["significant"] else ("no" if sig.get("enough_seeds", True) else f"n/a ({sig['n_seeds']} seed)")
    mde = shown_mde(sig)
    mde = mde if isinstance(mde, str) else f"±{mde * 100:.2f}"
    return [f"{sig['delta_f1'] * 100:+.2f}", f"[{sig['ci_low'] * 100:+.2f}, {sig['ci_high'] * 100:+.2f}]",
            f"{sig['p_value']:.3f}", f"{sig.get('p_holm', sig['p_value']):.3f}", verdict, mde]


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["MLLM", "CapLen", "Acc", "P", "R", "F1", "ΔF1 vs none", "95% CI", "p", "p (Holm)", "significant",
            "detectable", "val F1", "min/run", "GB/run"]
    out = []
    for r in rows:
        cap = f"{r['caplen']:.1f}" if r["captions"] else "-"
        out.append([r["name"], cap, pct(r["test_acc"]), pct(r["test_precision"]), pct(r["test_recall"]),
                    pct(r["test_f1"]), *sig_cells(r.get("significance")), pct(r["val_f1"]),
                    f"{r['train_s'][0] / 60:.1f}", f"{r['peak_memory_bytes'] / 1e9:.1f}" if r.get("peak_memory_bytes") else "-"])
    return head, out


def latex_table(rows: list[dict], meta: dict) -> str:
    """A booktabs table in the layout of the CAMIM paper's Table 2 (mean ± std, %)."""
    def esc(t: str) -> str:
        return "".join("\\" + c if c in "&%$#_{}" else c for c in t)

    def pm(ms) -> str:
        return f"{ms[0] * 100:.2f}$\\pm${ms[1] * 100:.2f}"

    # what a "no" rules out, for a reviewer: the detectable gains (80% power), when seeds measure training noise
    mdes = [m * 100 for r in rows if r.get("significance") and not isinstance(m := shown_mde(r["significance"]), str)]
    power = (f" With 80\\% power this test detects gains of $\\pm${min(mdes):.2f}"
             + (f"--{max(mdes):.2f}" if max(mdes) - min(mdes) >= 0.005 else "") + " F1 or more.") if mdes else ""
    lines = ["% generated by camim report; needs \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering",
             f"\\caption{{Caption sources on {esc(meta['task'])} (head {esc(meta['head'])}; test, mean$\\pm$std over "
             f"{len(meta['seeds'])} seed(s)); $^*$: gain over text only significant at p<{meta.get('alpha', 0.05)} "
             f"(t test over the seeds' pooled spread and the test items' shared noise; p adjusted by Holm's method over the sources).{power}}}",
             "\\begin{tabular}{lrrrrrr}", "\\toprule",
             "MLLM & CapLen & Acc & P & R & F1 & $\\Delta$F1 \\\\", "\\midrule"]
    for r in rows:
        sig = r.get("significance") or {}
        d = f"{sig['delta_f1'] * 100:+.2f}{'$^*$' if sig.get('significant') else ''}" if sig else "--"
        cap = f"{r['caplen']:.1f}" if r["captions"] else "--"
        lines.append(f"{esc(r['name'])} & {cap} & {pm(r['test_acc'])} & {pm(r['test_precision'])} & "
                     f"{pm(r['test_recall'])} & {pm(r['test_f1'])} & {d} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    names = [r["name"] for r in rows]
    means = [r["test_f1"][0] * 100 for r in rows]
    errs = [r["test_f1"][1] * 100 for r in rows]
    ax.bar(names, means, yerr=errs, capsize=4, color=["#999999" if r["source"] == "none" else "#c8c8c8" if r["source"].startswith("shuffled:") else "#3b75af"
                                                   for r in rows])
    for i, (m, r) in enumerate(zip(means, rows)):
        star = "*" if (r.get("significance") or {}).get("significant") else ""
        ax.text(i, m + errs[i] + 0.5, f"{m:.1f}{star}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("test micro-F1 (%)")
    ax.set_title(f"{title}\nerror bars: ±1 std over seeds; *: gain over none with Holm-adjusted p < 0.05", fontsize=8)
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


def plan_line(rows: list[dict]) -> str:
    """How many seeds would detect a gain of ``[report] plan_gain`` F1 (``seeds_for_gain`` of each
    source's comparison), or "" where the seeds' spread is unmeasured."""
    sigs = [(r["name"], r["significance"]) for r in rows if (r.get("significance") or {}).get("plan_gain")]
    if not sigs:
        return ""
    first = sigs[0][1]
    each = ", ".join(f"{name} {'never' if s['seeds_for_gain'] is None else s['seeds_for_gain']}" for name, s in sigs)
    never = any(s["seeds_for_gain"] is None for _, s in sigs)
    return (f"Seeds to detect a ±{first['plan_gain'] * 100:.2f} F1 gain 4 times in 5 (at the Holm family's level), per source "
            f"and as many for none: {each}. From this report's pooled seed spread ({first['seed_sd'] * 100:.2f} F1 a run) and "
            f"each source's shared item noise, if further seeds spread alike"
            + ("; 'never': that item noise alone keeps the detectable gain above it, and only more test items would help"
               if never else "") + " ([report] plan_gain).")


def training_line(meta: dict) -> str:
    """What the report's runs cost: every run's own wall time, reused ones included, against the
    time this report took (a report that reuses finished runs takes seconds)."""
    return (f"Training: {meta['runs']} run(s), {meta['runs_wall_s'] / 3600:.2f} h of run time in all ({meta['runs_reused']} reused from earlier reports or "
            f"`camim train`; min/run = the mean wall time of one run of that source, GB/run the largest peak memory of one); this report took "
            f"{meta['wall_s'] / 60:.1f} min.")


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
          SIG_NOTE, ""]
    if meta.get("smoke"):
        md += [f"**{meta['smoke']}**", ""]
    plan = plan_line(rows)
    md += [md_table(head, body), ""]
    if plan:
        md += [plan, ""]
    content = content_rows(rows)
    if content:
        md += ["## Content controls", "", CONTENT_NOTE, "", md_table(*content), ""]
    md += [f"![test F1 per caption source]({png.name})", ""]
    if pl:
        md += ["## Per-relation test F1 (best source and `none`)", "", md_table(*pl), ""]
    md += ["## Configuration", "", "Trainer and head options:", "", "```json", json.dumps(meta["options"], indent=2, sort_keys=True),
           "```", "", "Runs and cache keys per source:", "", "```json", json.dumps(configs, indent=2, sort_keys=True), "```", "",
           training_line(meta), ""]
    paths = {"md": out_dir / f"{name}.md", "html": out_dir / f"{name}.html", "png": png, "json": out_dir / f"{name}.json",
             "tex": out_dir / f"{name}.tex"}
    atomic_write_bytes(paths["md"], "\n".join(md).encode())
    atomic_write_bytes(paths["tex"], latex_table(rows, meta).encode())
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:2px 6px}table{border-collapse:collapse}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title><style>{style}</style></head><body>",
             f"<h1>Caption-model comparison: {html.escape(name)}</h1>", f"<p>{html_text(md[2])}</p>",
             f"<p>{html.escape(SIG_NOTE)}</p>"]
    if meta.get("smoke"):
        parts += [f"<p><strong>{html.escape(meta['smoke'])}</strong></p>"]
    parts += [html_table(head, body)] + ([f"<p>{html.escape(plan)}</p>"] if plan else [])
    if content:
        parts += ["<h2>Content controls</h2>", f"<p>{html_text(CONTENT_NOTE)}</p>", html_table(*content)]
    parts += [f"<p>{html_text(training_line(meta))}</p>",
             f"<p><img src='{html.escape(png.name)}' alt='test F1 per caption source'></p>"]
    if pl:
        parts += ["<h2>Per-relation test F1 (best source and none)</h2>", html_table(*pl)]
    parts += ["<h2>Configuration</h2><pre>", html.escape(json.dumps({"options": meta["options"], "sources": configs}, indent=2, sort_keys=True)),
              "</pre></body></html>"]
    atomic_write_bytes(paths["html"], "".join(parts).encode())
    atomic_write_json(paths["json"], {"meta": meta, "rows": rows})
    return paths


def add_significance(rows: list[dict], runs_by_source: dict[str, list], labels: list[str], head: str,
                     plan_gain: float | None = None) -> None:
    """Fill ``row["significance"]`` of every source against ``none`` (when both were run); the
    report's comparisons are one family, adjusted by Holm's method.  ``plan_gain`` (F1 points):
    also the seeds that would detect a gain that size (:func:`plan_line`)."""
    from .significance import apply_holm, compare

    base = runs_by_source.get("none")
    if base:
        sigs = compare(base, {src: runs for src, runs in runs_by_source.items() if src != "none"}, labels, head)
        for r in rows:
            if r["source"] in sigs:
                r["significance"] = sigs[r["source"]]
    apply_holm([r.get("significance") for r in rows], plan_gain / 100 if plan_gain else None)


def add_content_controls(rows: list[dict], runs_by_source: dict[str, list], labels: list[str], head: str) -> None:
    """Fill ``row["content"]`` of every ``imported:x`` whose control ``shuffled:x`` (its own captions,
    each given to another image) is in the report too: the same test with the control as the base
    (the seeds' spread still pooled over every row of the report).  Those comparisons are a family of
    their own, adjusted by Holm's method."""
    from .significance import apply_holm, compare

    for r in rows:
        ctrl = control_of(r["source"])
        if ctrl and runs_by_source.get(ctrl) and runs_by_source.get(r["source"]):
            others = {src: runs for src, runs in runs_by_source.items() if src != ctrl}
            r["content"] = compare(runs_by_source[ctrl], others, labels, head).get(r["source"])
    apply_holm([r.get("content") for r in rows])


CONTENT_NOTE = ("Content controls: each caption source against its own captions shuffled across images (`shuffled:<x>`, "
                "every caption given to another image), with the test above and the control as the base; p (Holm) over "
                "these comparisons. A gain here is what the captions' content gives; a gain over none alone may be "
                "what a caption stream does with any text.")


def content_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """The content controls' table, or None where the report holds no source with its control."""
    body = [[r["name"], *sig_cells(r["content"])] for r in rows if r.get("content")]
    head = ["MLLM", "ΔF1 vs shuffled", "95% CI", "p", "p (Holm)", "significant", "detectable"]
    return (head, body) if body else None


def plan_gain_of(rconf: dict) -> float:
    """``[report] plan_gain`` in F1 points (0: no seeds line); anything but a number from 0 to 100 is an error."""
    v = rconf.get("plan_gain", 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
        raise PipelineError(f"profile [report] plan_gain must be a number of F1 points from 0 (off) to 100, not {v!r}")
    return float(v)


def progress_line(done: int, total: int, trained: list[float], elapsed: float, jobs: int = 1) -> str:
    """Where a report stands: runs done, and the time left if every remaining run is trained
    at the mean wall time of the runs trained so far (reused runs cost nothing), ``jobs`` at a time."""
    line = f"{done}/{total} runs in {elapsed / 60:.1f} min ({total - done} to go"
    if trained and done < total:
        per_run = sum(trained) / len(trained)
        side = f", {jobs} side by side" if jobs > 1 else ""
        line += f"; about {math.ceil((total - done) / jobs) * per_run / 60:.0f} min more at {per_run / 60:.1f} min a run{side}"
    return line + ")"


def seed_list(seeds, where: str) -> list[int]:
    """``seeds`` (ints, or a comma string such as ``--seeds``/``SEEDS`` gives) as a list of distinct
    whole numbers >= 0; anything else is an error naming ``where`` (a repeated seed would be the
    same run counted twice: its spread and its test would be made up)."""
    items = [x.strip() for x in seeds.split(",") if x.strip()] if isinstance(seeds, str) else list(seeds)
    out = []
    for x in items:
        try:
            v = int(x) if not isinstance(x, (bool, float)) else None
        except (TypeError, ValueError):
            v = None
        if v is None or v < 0:
            raise PipelineError(f"{where}: seed {x!r} is not a whole number >= 0 (seeds are comma-separated, e.g. 1,2,3)")
        if v in out:
            raise PipelineError(f"{where}: seed {v} is given twice; each seed is one run, and a repeat would count it twice")
        out.append(v)
    if not out:
        raise PipelineError(f"{where}: no seeds given")
    return out


def run_label(src: str, seed: int, head: str, several_heads: bool) -> str:
    return f"{src} seed {seed}" + (f" head {head}" if several_heads else "")


def _plan_side(settings: Settings, src: str, head: str, seeds: list[int], over: dict, data, inputs: dict, threads: int,
               quiet: bool, tasks: list, names: list, trained: list, several_heads: bool) -> tuple[list[tuple], int | None]:
    """Side by side: every seed's ``(run folder, key)``, and the largest peak memory its finished runs
    measured (None: none did); each unfinished run is queued in ``tasks`` (named in ``names``), or, when
    the source's upstream outputs cannot go to another process, trained here."""
    from stages.train.trainer import finished_run, plan_run, train_one, train_options

    from .parallel import can_send

    sendable = can_send(inputs)
    if not sendable:
        print(f"report: {src}: its upstream outputs cannot be sent to another process; its runs train here, "
              f"one after the other, on {threads} thread(s) each (the same runs)")
    conf, plans, peak = train_options(settings, over), [], None
    for seed in seeds:
        _, key, out_dir = plan_run(settings, data, src, seed, conf)
        plans.append((out_dir, key))
        if (done := finished_run(out_dir, key)) is not None:
            if done.metrics.get("peak_memory_bytes"):
                peak = max(peak or 0, int(done.metrics["peak_memory_bytes"]))
            continue
        name = f"report: run {run_label(src, seed, head, several_heads)}"
        if sendable:
            tasks.append((settings, src, seed, over, inputs))
            names.append(name)
        else:
            t_run = time.perf_counter()
            train_one(settings, src, seed, over, data=data, quiet=quiet)
            trained.append(time.perf_counter() - t_run)
            print(f"{name}: trained in {trained[-1] / 60:.1f} min")
    return plans, peak


def run_report(settings: Settings, sources: list[str], resolve, seeds: list[int] | None = None,
               overrides: dict | None = None, name: str | None = None, heads: list[str] | None = None,
               quiet_runs: bool = False, smoke: str | None = None, jobs: int | str | None = None) -> dict:
    """The one report loop: every caption source x head x seed is trained (finished runs are reused).
    ``resolve(source) -> inputs`` gives each source's resolved upstream outputs (``camim.graph``).
    One head: the caption-model comparison; several (``--head cam,remote``): the head comparison."""
    from stages.train.trainer import load_data, train_one, train_options

    t0 = time.perf_counter()
    rconf = settings.section("report")
    plan_gain = plan_gain_of(rconf)  # checked before any run trains
    conf = train_options(settings, overrides)
    seeds = (seed_list(seeds, "--seeds") if seeds else seed_list(rconf["seeds"], "[report] seeds") if rconf.get("seeds")
             else seed_list(conf["seeds"], "[train] seeds"))
    heads = heads or [conf["head"]]
    name = name or (f"heads-{settings.task}" if len(heads) > 1 else rconf.get("name") or "captions")
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
        raise PipelineError(f"report name {name!r} (--name / REPORT / [report] name) is a file name under the reports folder, "
                            "not a path: choose the folder with --reports-dir (REPORTS_DIR)")
    from stages.train.data import tensor_bytes
    from stages.train.trainer import finished_run

    from .parallel import available_memory, report_jobs, run_memory, train_side_by_side

    jobs, job_threads, where = report_jobs(settings, conf, jobs)
    side = {"threads": job_threads} if jobs > 1 else {}  # side by side: each run on its share of the cores
    rows = []
    runs_by: dict[tuple[str, str], list] = {}
    planned: dict[tuple[str, str], tuple] = {}  # side by side: (modalities, [(out_dir, key)]) per source and head
    tasks, names, memory = [], [], []  # side by side: each queued run, its name and its planned memory
    n_records, labels = 0, []
    total, done, trained = len(sources) * len(heads) * len(seeds), 0, []
    if side:
        print(f"report: {total} runs, up to {jobs} side by side on {job_threads} thread(s) each "
              f"({where}; a run's thread count is part of its key)")
    for src in sources:
        for head in heads:
            over = {**(overrides or {}), "head": head, **side}
            inputs = resolve(src)
            data = load_data(settings, src, head, inputs)
            n_records, labels = len(data.records), data.labels
            if side:  # the runs not finished yet go to the pool (or train here); all are read back below
                plans, peak = _plan_side(settings, src, head, seeds, over, data, inputs, job_threads, quiet_runs, tasks,
                                         names, trained, len(heads) > 1)
                planned[(src, head)] = (data.modalities, plans)
                memory += [peak or run_memory(tensor_bytes(data))] * (len(tasks) - len(memory))  # measured, else planned
                del data
                continue
            runs = []
            for seed in seeds:
                done += 1
                print(f"report: run {done}/{total}: {run_label(src, seed, head, len(heads) > 1)}")
                t_run = time.perf_counter()
                runs.append(train_one(settings, src, seed, over, data=data, quiet=quiet_runs))
                if not runs[-1].reused:
                    trained.append(time.perf_counter() - t_run)
                print("report: " + progress_line(done, total, trained, time.perf_counter() - t0))
            rows.append({**summarise(src, runs, data.modalities), "head": head})
            runs_by[(src, head)] = runs
            del data
    if side:
        done = total - len(tasks)
        if done and tasks:
            print(f"report: {done}/{total} runs already trained (or trained here); reusing them")

        def ended(i, wall):
            nonlocal done
            done += 1
            trained.append(wall)
            print(f"{names[i]}: trained in {wall / 60:.1f} min; " + progress_line(done, total, trained, time.perf_counter() - t0, jobs))

        budget = available_memory()
        if tasks and jobs > 1 and max(memory) * min(jobs, len(tasks)) > budget:
            print(f"report: a run is planned to take up to {max(memory) / 1e9:.1f} GB and {budget / 1e9:.1f} GB is free, "
                  f"so fewer than {jobs} may train at once (on {job_threads} thread(s) each all the same: the same runs)")
        train_side_by_side(tasks, jobs, lambda i: names[i], ended, memory=memory, budget=budget)
        for (src, head), (modalities, plans) in planned.items():
            runs = [finished_run(out_dir, key) for out_dir, key in plans]
            if any(r is None for r in runs):
                raise PipelineError(f"report: a run of {src} did not finish ({', '.join(str(d) for (d, _), r in zip(plans, runs) if r is None)})")
            rows.append({**summarise(src, runs, modalities), "head": head})
            runs_by[(src, head)] = runs
    if len(heads) > 1:
        from .heads import write_head_report

        return write_head_report(settings, rows, heads, sources, seeds, name, t0)
    add_significance(rows, {src: runs_by[(src, heads[0])] for src in sources}, labels, heads[0],
                     plan_gain)
    add_content_controls(rows, {src: runs_by[(src, heads[0])] for src in sources}, labels, heads[0])
    meta = {"task": settings.task, "source": settings.source or "bundled sample", "head": heads[0], "seeds": seeds,
            "records": n_records, "options": {k: v for k, v in sorted(conf.items()) if k != "seeds"},
            "wall_s": time.perf_counter() - t0, "alpha": 0.05, "smoke": smoke,
            "runs": total, "runs_reused": total - len(trained),
            "runs_wall_s": sum(float(r.metrics.get("wall_s", 0.0)) for rs in runs_by.values() for r in rs)}
    paths = write_report(rows, meta, settings.reports_dir, name)
    head, body = table_rows(rows)
    if smoke:
        print(smoke)
    print(text_table(head, body))
    if plan := plan_line(rows):
        print("report: " + plan)
    if content := content_rows(rows):
        print("report: " + CONTENT_NOTE.replace("`", ""))
        print(text_table(*content))
    print("report: " + training_line(meta))
    print(f"report: {len(sources)} source(s) x {len(seeds)} seed(s) in {meta['wall_s']:.1f}s -> {paths['md']}, {paths['html']}, "
          f"{paths['png']}, {paths['tex']}")
    return {"rows": rows, "paths": paths, "meta": meta}
