"""Scale-out on Ray Data, behind the same interface as the local runner.

Each Ray actor builds the stage once (``setup`` loads the model), runs batches with
the same per-item failure isolation as the local runner, and commits each batch as
a part directly into the shared store (the store root must be on storage every
node sees: NFS, a mounted bucket).  The driver only streams back per-item status
rows for progress and the summary.  Cache keys, item keys, resume and done-markers
are exactly those of the local runner, so a run can start on one machine and be
finished on a cluster, or the other way round.

Use ``--engine ray`` (``ENGINE=ray``); ``--workers N`` sets the actor pool size and
``RAY_ADDRESS`` picks an existing cluster (default: a local Ray instance).
"""

from __future__ import annotations

import json
import time

from .errors import PipelineError
from .progress import Progress
from .runner import Executor, RunSummary, count, finish, is_oom, plan, process_batch
from .stage import Stage
from .store import ItemResult, StageCache, Store


class _StageActor:
    """One Ray Data actor: a stage set up once, committing its own parts."""

    def __init__(self, stage: Stage, root: str):
        self.stage = stage
        self.stage.setup()
        self.cache = Store(root).stage(stage.name, stage.key)

    def _run(self, items: list[dict]) -> list[ItemResult]:
        try:
            return process_batch(self.stage, items)
        except Exception as exc:  # noqa: BLE001
            if is_oom(exc) and len(items) > 1:  # halve and carry on
                half = len(items) // 2
                return self._run(items[:half]) + self._run(items[half:])
            raise

    def __call__(self, batch: dict) -> dict:
        items = [json.loads(p) for p in batch["payload"]]
        results = self._run(items)
        self.cache.write_part(results, ragged=self.stage.ragged)
        return {
            "item_key": [r.item_key for r in results],
            "ok": [r.error is None for r in results],
            "error": [r.error or "" for r in results],
        }


class RayExecutor(Executor):
    """Batches on a pool of ``workers`` Ray Data actors (``RAY_ADDRESS`` picks a cluster)."""

    name = "ray"

    def __init__(self, workers: int | None = None):
        self.workers = workers

    def run(self, stage: Stage, items: list[dict], store: Store, batch_size: int = 32, retry_failed: bool = False,
            desc: str | None = None, unit: str = "it") -> tuple[StageCache, RunSummary]:
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise PipelineError("engine ray needs Ray Data: pip install 'ray[data]' (make install does)") from None
        with store.stage(stage.name, stage.key).lock():  # the driver holds the key; its actors write the parts
            return _run_ray(ray, stage, items, store, batch_size, retry_failed, desc, unit, self.workers)


def _run_ray(ray, stage: Stage, items: list[dict], store: Store, batch_size: int, retry_failed: bool, desc: str | None,
             unit: str, workers: int | None) -> tuple[StageCache, RunSummary]:
    cache, uniq, inputs_key, todo = plan(stage, items, store, retry_failed)
    summary = RunSummary(stage.name, stage.key, total=len(uniq), cached=len(uniq) - len(todo))
    summary.extra["engine"] = "ray"
    t0 = time.perf_counter()
    if todo:
        import ray.data

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        n = max(1, int(workers or 1))
        stage.for_workers("ray")  # e.g. one rate limiter for every actor
        ds = ray.data.from_items([{"item_key": it["item_key"], "payload": json.dumps(it, default=str)} for it in todo])
        gpus = 1 if getattr(stage, "device", "cpu").startswith("cuda") else 0
        ds = ds.map_batches(
            _StageActor,
            fn_constructor_kwargs={"stage": stage, "root": str(store.root)},
            batch_size=max(1, int(batch_size)),
            batch_format="numpy",
            concurrency=n,
            num_gpus=gpus,
        )
        with Progress(len(todo), desc or f"{stage.name} (ray)", unit=unit) as bar:
            for row_batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                keys = list(row_batch["item_key"])
                results = [ItemResult(str(k), error=(str(e) or None) if not ok else None)
                           for k, ok, e in zip(keys, row_batch["ok"], row_batch["error"])]
                count(summary, results)
                bar.update(len(keys))
        cache._index = None
    finish(cache, uniq, inputs_key, summary, t0, todo)
    return cache, summary
