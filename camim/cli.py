"""``camim``: the command line. Each make target is a thin call of one command here.

Every option is declared once below (``*Opt``: flag, environment variable, help) and given to each
command that runs a stage it changes; the settings are resolved once per command in this order:
profile (with ``extends``), then environment, then the command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.progress import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CAMIM caption → feature-cache → train pipeline.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and clean the cache.")
app.add_typer(cache_app, name="cache")

ProfileOpt = typer.Option("offline", "--profile", envvar="PROFILE", help="offline | paper | path to a .toml")
CacheOpt = typer.Option(None, "--cache-dir", envvar="CACHE_DIR", help="cache store root")
TaskOpt = typer.Option("mnre", "--task", envvar="TASK", help="dataset: mnre | twitter15 | twitter17 | umre | images (a folder of photos: --source <folder>)")
SourceOpt = typer.Option(None, "--source", envvar="MNRE_SOURCE", help="dataset folder, or 'download' (default: bundled sample)")
MllmOpt = typer.Option("imported:qwen", "--mllm", envvar="MLLM", help="caption backend(s), comma-separated, e.g. imported:qwen,none")
PromptOpt = typer.Option("camim", "--prompt", envvar="PROMPT", help="prompt template name")
OnErrorOpt = typer.Option("stop", "--on-error", envvar="ON_ERROR", help="stop | skip bad input lines")
BatchOpt = typer.Option(None, "--batch-size", envvar="BATCH_SIZE", help="batch size (never part of a cache key)")
DeviceOpt = typer.Option("auto", "--device", envvar="DEVICE", help="auto | cpu | cuda | cuda:N")
ImagesOpt = typer.Option(None, "--image-dir", envvar="IMAGE_DIR", help="folder of the dataset's images")
DryOpt = typer.Option(False, "--dry-run", envvar="DRY_RUN",
                      help="say what would run (items total, cached, new; API tokens and cost) and stop: nothing is sent or written")
EngineOpt = typer.Option("local", "--engine", envvar="ENGINE", help="local | ray (Ray Data actors; RAY_ADDRESS picks a cluster)")
WorkersOpt = typer.Option(None, "--workers", envvar="WORKERS", help="Ray actor pool size (engine ray)")
JobsOpt = typer.Option(None, "--jobs", envvar="JOBS", help="report/demo: runs trained side by side on a CPU: auto | N (default: the profile's [report] jobs)")
RunsOpt = typer.Option(None, "--runs-dir", envvar="RUNS_DIR", help="folder of trained runs (default: runs/ under CAMIM_HOME or the current folder)")
ReportsOpt = typer.Option(None, "--reports-dir", envvar="REPORTS_DIR", help="folder of reports (default: reports/ under CAMIM_HOME or the current folder)")
# grounding choices (they change the grounding, image-feature and stream keys of every command that reads images)
GroundOpt = typer.Option(None, "--ground", envvar="GROUND", help="imported | detector (default: the profile's [ground] backend)")
CropDirOpt = typer.Option(None, "--crop-dir", envvar="CROP_DIR", help="HVPNeT crop folder (img_vg)")
TransDirOpt = typer.Option(None, "--trans-dir", envvar="TRANS_DIR", help="translation (generated) images (TMR diffusion_pic)")
CropIndexOpt = typer.Option(None, "--crop-index", envvar="CROP_INDEX", help="folder of img_vg_crops_*.json / diffusion_boxes_*.json")


def _settings(**kw) -> Settings:
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        return Settings(**kw)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _guard(fn, *args, **kwargs):
    """Run a command; a PipelineError becomes one clear line and exit code 2."""
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"))
    try:
        return fn(*args, **kwargs)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # disk full, permissions, a vanished file: one line naming the path
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc} (everything committed before is intact)", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: finished parts are kept; run the same command again to resume", err=True)
        raise typer.Exit(130) from None


@app.command()
def data(profile: str = ProfileOpt, cache_dir: str = CacheOpt, task: str = TaskOpt, source: Optional[str] = SourceOpt,
         on_error: str = OnErrorOpt, image_dir: Optional[str] = ImagesOpt):
    """Read and validate the dataset; write its Parquet manifest of records."""
    from . import chain

    _guard(chain.data, _settings(profile=profile, cache_dir=cache_dir, task=task, source=source, on_error=on_error, image_dir=image_dir))


@app.command()
def captions(profile: str = ProfileOpt, cache_dir: str = CacheOpt, task: str = TaskOpt, source: Optional[str] = SourceOpt,
             mllm: str = MllmOpt, prompt: str = PromptOpt, on_error: str = OnErrorOpt, batch_size: Optional[int] = BatchOpt,
             device: str = DeviceOpt, image_dir: Optional[str] = ImagesOpt, engine: str = EngineOpt,
             workers: Optional[int] = WorkersOpt, dry_run: bool = DryOpt):
    """Caption every image of the dataset with MLLM (one caption per unique image)."""
    from . import chain

    s = _settings(profile=profile, cache_dir=cache_dir, task=task, source=source, mllm=mllm, prompt=prompt,
                  on_error=on_error, batch_size=batch_size, device=device, image_dir=image_dir, engine=engine, workers=workers)
    _guard(chain.dry_run, s, "captions") if dry_run else _guard(chain.captions, s)


@app.command()
def features(profile: str = ProfileOpt, cache_dir: str = CacheOpt, task: str = TaskOpt, source: Optional[str] = SourceOpt,
             mllm: str = MllmOpt, prompt: str = PromptOpt, on_error: str = OnErrorOpt, batch_size: Optional[int] = BatchOpt,
             device: str = DeviceOpt, image_dir: Optional[str] = ImagesOpt, engine: str = EngineOpt,
             workers: Optional[int] = WorkersOpt, dry_run: bool = DryOpt,
             ground: Optional[str] = GroundOpt, crop_dir: Optional[str] = CropDirOpt, trans_dir: Optional[str] = TransDirOpt,
             crop_index: Optional[str] = CropIndexOpt):
    """Cache text features of sentences and captions (runs data and captions first); with images, also
    grounding crops, image features and the image streams."""
    from . import chain

    s = _settings(profile=profile, cache_dir=cache_dir, task=task, source=source, mllm=mllm, prompt=prompt,
                  on_error=on_error, batch_size=batch_size, device=device, image_dir=image_dir, engine=engine, workers=workers,
                  ground=ground, crop_dir=crop_dir, trans_dir=trans_dir, crop_index=crop_index)
    _guard(chain.dry_run, s, "features") if dry_run else _guard(chain.features, s)


@app.command()
def demo(profile: str = ProfileOpt, cache_dir: str = CacheOpt, batch_size: Optional[int] = BatchOpt, device: str = DeviceOpt,
         runs_dir: Optional[str] = RunsOpt, reports_dir: Optional[str] = ReportsOpt, prompt: str = PromptOpt,
         engine: str = EngineOpt, workers: Optional[int] = WorkersOpt, jobs: Optional[str] = JobsOpt):
    """The whole chain on the bundled real MNRE sample; prints this and the previous run's time."""
    from . import chain

    s = _settings(profile=profile, cache_dir=cache_dir, batch_size=batch_size, device=device, runs_dir=runs_dir,
                  reports_dir=reports_dir, prompt=prompt, engine=engine, workers=workers)
    s.source = None
    os.environ.pop("MNRE_SOURCE", None)
    took = _guard(chain.demo, s, _jobs(jobs))
    stamp = Path(s.cache_dir) / "demo-times.json"
    times = json.loads(stamp.read_text()) if stamp.exists() else []
    if times:
        first = times[0]
        typer.echo(f"demo: first run {first:.2f}s, this run {took:.2f}s ({took / first:.1%} of the first)")
    times.append(took)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(times[-20:]))


def _jobs(value: str | None) -> int | str | None:
    """``--jobs``/``JOBS``: a whole number of runs, or a word (``auto``) checked where it is used."""
    return int(value) if value is not None and value.strip().isdigit() else value


def _not_built(stage: str, issue: str) -> None:
    typer.echo(f"error: the {stage} stage is not built yet ({issue})", err=True)
    raise typer.Exit(3)


@app.command()
def ground(profile: str = ProfileOpt, cache_dir: str = CacheOpt, task: str = TaskOpt, source: Optional[str] = SourceOpt,
           on_error: str = OnErrorOpt, batch_size: Optional[int] = BatchOpt, device: str = DeviceOpt,
           image_dir: Optional[str] = ImagesOpt, engine: str = EngineOpt, workers: Optional[int] = WorkersOpt,
           ground: Optional[str] = GroundOpt, crop_dir: Optional[str] = CropDirOpt, trans_dir: Optional[str] = TransDirOpt,
           crop_index: Optional[str] = CropIndexOpt):
    """Visual-grounding crops: top-m objects per sample (image and translation image)."""
    from . import chain

    s = _settings(profile=profile, cache_dir=cache_dir, task=task, source=source, on_error=on_error,
                  batch_size=batch_size, device=device, image_dir=image_dir, engine=engine, workers=workers,
                  ground=ground, crop_dir=crop_dir, trans_dir=trans_dir, crop_index=crop_index)
    _guard(chain.ground, s)


HeadOpt = typer.Option(None, "--head", envvar="HEAD", help="head: cam | remote | vecmner (see stages/train HEADS); report: a comma list compares heads")
OptOpt = typer.Option(None, "--opt", help="head/trainer option KEY=VALUE (repeatable), e.g. --opt lr=3e-4 --opt align=S")
LogOpt = typer.Option(None, "--log", envvar="TRAIN_LOG", help="training curves: jsonl (always, runs/<id>/curves.jsonl), tensorboard (runs/<id>/tb)")
SeedsOpt = typer.Option(None, "--seeds", envvar="SEEDS", help="comma-separated seeds (default: [train] seeds)")


def _train_overrides(head, opt, epochs=None, log=None) -> dict:
    from stages.train.trainer import parse_opts

    over = parse_opts(opt or [])
    if log:
        over["log"] = log
    if head:
        over["head"] = head
    if epochs is not None:
        over["epochs"] = epochs
    return over


@app.command()
def train(profile: str = ProfileOpt, cache_dir: str = CacheOpt, task: str = TaskOpt, source: Optional[str] = SourceOpt,
          mllm: str = typer.Option("imported:qwen", "--mllm", envvar="MLLM", help="caption source (one), e.g. imported:qwen or none"),
          head: Optional[str] = HeadOpt, seed: Optional[int] = typer.Option(None, "--seed", help="default: the first of [train] seeds"),
          epochs: Optional[int] = typer.Option(None, "--epochs"), opt: Optional[list[str]] = OptOpt,
          run: Optional[str] = typer.Option(None, "--run", envvar="RUN", help="run id (default: derived from the config)"),
          force: bool = typer.Option(False, "--force", help="retrain even if this exact run exists"),
          device: str = DeviceOpt, on_error: str = OnErrorOpt, image_dir: Optional[str] = ImagesOpt,
          runs_dir: Optional[str] = RunsOpt, prompt: str = PromptOpt, log: Optional[str] = LogOpt,
          engine: str = EngineOpt, workers: Optional[int] = WorkersOpt,
          ground: Optional[str] = GroundOpt, crop_dir: Optional[str] = CropDirOpt, trans_dir: Optional[str] = TransDirOpt,
          crop_index: Optional[str] = CropIndexOpt):
    """Train a head on cached features only (runs the cached upstream stages first); writes runs/<run-id>/."""
    from stages.train.trainer import train_one, train_options

    from .graph import inputs_for

    def go():
        s = _settings(profile=profile, cache_dir=cache_dir, task=task, source=source, mllm=mllm, run=run, device=device, on_error=on_error,
                      image_dir=image_dir, runs_dir=runs_dir, prompt=prompt, engine=engine, workers=workers,
                      ground=ground, crop_dir=crop_dir, trans_dir=trans_dir, crop_index=crop_index)
        over = _train_overrides(head, opt, epochs, log)
        sd = seed if seed is not None else int(list(train_options(s, over)["seeds"])[0])
        if len(s.mllms) > 1:
            raise PipelineError(f"camim train takes one caption source, not {len(s.mllms)} ({', '.join(s.mllms)}); "
                                "`camim report --mllm ...` trains and compares several")
        src = s.mllms[0] if s.mllms else "none"
        return train_one(s, src, sd, over, force=force, inputs=inputs_for(s, src))

    _guard(go)


@app.command(name="eval")
def eval_(run: str = typer.Option(..., "--run", envvar="RUN", help="run id under the runs folder, or a run folder"),
          profile: str = ProfileOpt, cache_dir: str = CacheOpt, device: str = DeviceOpt, runs_dir: Optional[str] = RunsOpt):
    """Re-score a trained checkpoint on val and test (writes metrics-eval.json beside it)."""
    from stages.train.trainer import eval_run, run_settings

    from .graph import inputs_for

    def go():
        run_dir, config, s = run_settings(_settings(profile=profile, cache_dir=cache_dir, device=device, runs_dir=runs_dir), run)
        return eval_run(s, run_dir, config, inputs_for(s, config["mllm"]))

    _guard(go)


@app.command()
def report(profile: str = ProfileOpt, cache_dir: str = CacheOpt, task: str = TaskOpt, source: Optional[str] = SourceOpt,
           mllm: str = typer.Option("", "--mllm", envvar="MLLM", help="caption sources to compare (default: none + every shipped source)"),
           seeds: Optional[str] = SeedsOpt, head: Optional[str] = HeadOpt, epochs: Optional[int] = typer.Option(None, "--epochs"),
           opt: Optional[list[str]] = OptOpt, name: Optional[str] = typer.Option(None, "--name", envvar="REPORT", help="report name"),
           device: str = DeviceOpt, on_error: str = OnErrorOpt, image_dir: Optional[str] = ImagesOpt,
           runs_dir: Optional[str] = RunsOpt, reports_dir: Optional[str] = ReportsOpt, prompt: str = PromptOpt,
           dry_run: bool = DryOpt, log: Optional[str] = LogOpt, engine: str = EngineOpt, workers: Optional[int] = WorkersOpt,
           ground: Optional[str] = GroundOpt, crop_dir: Optional[str] = CropDirOpt, trans_dir: Optional[str] = TransDirOpt,
           crop_index: Optional[str] = CropIndexOpt, jobs: Optional[str] = JobsOpt):
    """Caption-model comparison: train the head per caption source and seed; write reports/<name>.{md,html,png,tex,json}.
    A comma list of heads (--head cam,remote) compares the heads on the same caches, sources and seeds."""
    from stages.report import run_report, seed_list
    from stages.train.trainer import train_options

    from . import chain
    from .graph import resolver, shipped_sources

    def go():
        s = _settings(profile=profile, cache_dir=cache_dir, task=task, source=source, mllm=mllm or None, device=device, on_error=on_error,
                      image_dir=image_dir, runs_dir=runs_dir, reports_dir=reports_dir, prompt=prompt, engine=engine, workers=workers,
                      ground=ground, crop_dir=crop_dir, trans_dir=trans_dir, crop_index=crop_index)
        sd = seed_list(seeds, "--seeds/SEEDS") if seeds else None
        heads = [h.strip() for h in (head or "").split(",") if h.strip()]
        over = _train_overrides(heads[0] if len(heads) == 1 else None, opt, epochs, log)
        srcs = s.mllms if mllm else (list(s.section("report").get("sources") or []) or shipped_sources(s))
        if dry_run:
            conf = train_options(s, over)  # every head and its options checked, as the real report would before training
            for h in heads:
                train_options(s, {**over, "head": h})
            n_seeds = len(sd or s.section("report").get("seeds") or conf["seeds"])
            chain.dry_run(s, "report", srcs)
            hx = f" x {len(heads)} heads" if len(heads) > 1 else ""
            from stages.report.parallel import report_jobs

            n_jobs, n_threads, _ = report_jobs(s, conf, _jobs(jobs))
            side = f", up to {n_jobs} side by side on {n_threads} thread(s) each" if n_jobs > 1 else ""
            print(f"  train: {len(srcs)} source(s){hx} x {n_seeds} seed(s) = {len(srcs) * max(1, len(heads)) * n_seeds} runs "
                  f"(finished ones are reused{side})")
            return None
        return run_report(s, srcs, resolver(s, srcs), sd, over, name, heads=heads if len(heads) > 1 else None, jobs=_jobs(jobs))

    _guard(go)


@app.command()
def export(out: str = typer.Argument(..., help="folder to write into"),
           profile: str = ProfileOpt, cache_dir: str = CacheOpt, task: str = TaskOpt, source: Optional[str] = SourceOpt,
           mllm: str = typer.Option("imported:qwen", "--mllm", envvar="MLLM", help="caption source (one)"),
           prompt: str = PromptOpt, image_dir: Optional[str] = ImagesOpt, on_error: str = OnErrorOpt,
           fmt: str = typer.Option("camim", "--format", help="camim (dict per line, per split) | json ({img_id: caption}) | "
                                   "parquet (samples + pooled features, for datasets.load_dataset)"),
           name: Optional[str] = typer.Option(None, "--name", help="file name stem (default: from the caption source)")):
    """Captions (and pooled features) out of the cache, in CAMIM's formats or as Parquet for HF datasets."""
    from .export import export as run_export

    s = _settings(profile=profile, cache_dir=cache_dir, task=task, source=source, mllm=mllm, prompt=prompt,
                  image_dir=image_dir, on_error=on_error)
    _guard(run_export, s, s.mllms[0], Path(out), fmt, name)


@app.command()
def bench(names: Optional[list[str]] = typer.Argument(None, help="benchmarks to run (default: every bench/*.py)")):
    """Benchmarks (printed numbers and ratios): runs ``main()`` of each ``bench/*.py``."""
    import importlib.util

    import bench as bench_pkg

    found = {p.stem: p for p in sorted(Path(bench_pkg.__file__).parent.glob("*.py")) if not p.name.startswith("_")}
    unknown = [n for n in names or [] if n not in found]
    if unknown:
        typer.echo(f"error: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(found)}", err=True)
        raise typer.Exit(2)
    for name in names or list(found):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", found[name])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        typer.echo(f"== bench/{name}.py")
        mod.main([])


@cache_app.command("ls")
def cache_ls(cache_dir: Optional[str] = CacheOpt):
    """Stages, keys, sizes and row counts in the store."""
    from pipeline.config import default_cache_dir
    from pipeline.store import Store

    cache_dir = cache_dir or str(default_cache_dir())
    rows = Store(cache_dir).describe()
    if not rows:
        typer.echo(f"{cache_dir}: empty")
        return
    typer.echo(f"{'stage':<16} {'key':<16} {'rows':>8} {'parts':>6} {'size':>10}  what")
    total = 0
    for r in rows:
        total += r["bytes"]
        typer.echo(f"{r['stage']:<16} {r['key']:<16} {r['rows']:>8} {r['parts']:>6} {_human(r['bytes']):>10}  {r['what']}")
    typer.echo(f"total {_human(total)} in {cache_dir}")


@cache_app.command("verify")
def cache_verify(cache_dir: Optional[str] = CacheOpt,
                 fix: bool = typer.Option(False, "--fix", help="move damaged parts to quarantine now (readers do it on first use anyway)")):
    """Check every part: readable index, tensor file present, checksum as recorded. Exit 1 if damage is found."""
    from pipeline.config import default_cache_dir
    from pipeline.store import Store

    def go():
        store = Store(cache_dir or default_cache_dir())
        n, bad = 0, 0
        for sc in store.entries():
            for part in sc.part_paths():
                n += 1
                _, why = sc.check_part(part, force=True)
                if why:
                    bad += 1
                    typer.echo(f"damaged {sc.stage}/{sc.key}/{part.stem}: {why}")
                    if fix:
                        sc.quarantine(part, why)
            for q in sc.quarantined():
                typer.echo(f"quarantined {sc.stage}/{sc.key}/{q['part']}: {q['why']} (its items are recomputed by the next run)")
        typer.echo(f"verify: {n} part(s) checked, {bad} damaged" + (" (moved to quarantine)" if fix and bad else ""))
        return bad

    if _guard(go):
        raise typer.Exit(1)


@cache_app.command("gc")
def cache_gc(profile: str = ProfileOpt, cache_dir: str = CacheOpt, task: str = TaskOpt, source: Optional[str] = SourceOpt,
             mllm: str = typer.Option("", "--mllm", envvar="MLLM", help="caption sources to keep (default: every shipped one)"),
             runs_dir: Optional[str] = RunsOpt, prompt: str = PromptOpt, image_dir: Optional[str] = ImagesOpt,
             keep_runs: Optional[list[str]] = typer.Option(None, "--keep-runs", help="another runs folder whose recorded cache keys are kept too (repeatable)"),
             yes: bool = typer.Option(False, "--yes", help="delete (default: only list what would go)"),
             on_error: str = OnErrorOpt,
             ground: Optional[str] = GroundOpt, crop_dir: Optional[str] = CropDirOpt, trans_dir: Optional[str] = TransDirOpt,
             crop_index: Optional[str] = CropIndexOpt):
    """Remove cache entries that no current config reaches (and orphaned temp files).

    Kept: what the current settings reach, plus every cache key recorded by a run in the
    runs folder in effect (--runs-dir / RUNS_DIR) and in each --keep-runs folder."""
    from . import gc

    s = _settings(profile=profile, cache_dir=cache_dir, task=task, source=source, mllm=mllm or None, runs_dir=runs_dir,
                  prompt=prompt, image_dir=image_dir, on_error=on_error, ground=ground, crop_dir=crop_dir, trans_dir=trans_dir, crop_index=crop_index)
    _guard(gc.collect, s, bool(mllm), yes, [Path(p) for p in keep_runs or []])


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:  # console script
    app()


if __name__ == "__main__":
    sys.exit(app())
