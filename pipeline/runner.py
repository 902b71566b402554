"""The local runner: items in, committed parts out, item-level resume.

``run_stage`` is the one place where batches meet the store.  It knows nothing of
models: a stage turns a batch of item dicts into :class:`ItemResult` objects and
the runner commits each batch as one part.  Killed at any point and started
again, it loses at most the batch in flight.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from .errors import PipelineError
from .hashing import key_of
from .progress import Progress
from .stage import Stage
from .store import ItemResult, StageCache, Store

log = logging.getLogger("camim")


@dataclass
class RunSummary:
    stage: str
    key: str
    total: int
    cached: int = 0
    done: int = 0
    failed: int = 0
    failures: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 and self.done else 0.0
        s = (
            f"{self.stage} [{self.key}]: {self.total} items, {self.cached} cached, {self.done} new, "
            f"{self.failed} failed, {self.seconds:.1f}s"
        )
        if rate:
            s += f" ({rate:.1f} items/s)"
        if self.failures:
            s += "; failures: " + ", ".join(f"{k} x{v}" for k, v in self.failures.most_common(5))
        return s

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "key": self.key,
            "total": self.total,
            "cached": self.cached,
            "done": self.done,
            "failed": self.failed,
            "failures": dict(self.failures),
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _reason(error: str) -> str:
    return error.split(":", 1)[0][:60]


def _run_isolated(stage: Stage, batch: list[dict]) -> list[ItemResult]:
    """Run items one by one so that one bad item cannot fail its neighbours."""
    out = []
    for item in batch:
        try:
            out.extend(stage.run([item]))
        except Exception as exc:  # noqa: BLE001 - recorded per item, run goes on
            if is_oom(exc):
                raise
            out.append(ItemResult(item["item_key"], error=f"{type(exc).__name__}: {exc}"))
    return out


def process_batch(stage: Stage, batch: list[dict]) -> list[ItemResult]:
    """``stage.run(batch)``; if the batch raises, its items are run one by one and
    each failure is recorded on its item. Out-of-memory errors propagate."""
    try:
        results = stage.run(batch)
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            raise
        log.warning("%s: batch failed (%s); retrying its items one by one", stage.name, exc)
        results = _run_isolated(stage, batch)
    if len(results) != len(batch):
        raise PipelineError(f"stage {stage.name} returned {len(results)} results for {len(batch)} items")
    return results


def plan(stage: Stage, items: list[dict], store: Store, retry_failed: bool = False):
    """The stage's cache folder, the de-duplicated items, their inputs key, and the
    items still to do (everything not already committed)."""
    cache = store.stage(stage.name, stage.key)
    cache.write_spec(stage.spec())
    uniq: dict[str, dict] = {}
    for it in items:
        uniq.setdefault(it["item_key"], it)
    done = cache.done_keys(include_failed=not retry_failed)
    todo = [it for k, it in uniq.items() if k not in done]
    return cache, uniq, key_of(sorted(uniq)), todo


def finish(cache: StageCache, uniq: dict, inputs_key: str, summary: RunSummary, t0: float, todo: list[dict]) -> None:
    """Count failures recorded by earlier runs (not retried now), write the done-marker."""
    fresh = {it["item_key"] for it in todo}
    for r in cache.rows():
        if r["item_key"] in uniq and r["item_key"] not in fresh and not r["ok"]:
            summary.failed += 1
            summary.cached -= 1
            summary.failures[_reason(r["error"] or "")] += 1
    summary.seconds = time.perf_counter() - t0
    cache.mark_done(inputs_key, summary.as_dict())


def count(summary: RunSummary, results: list[ItemResult]) -> None:
    for r in results:
        if r.error is None:
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures[_reason(r.error)] += 1


class Executor:
    """Runs one stage over items against the store, with item-level resume.  Chosen once per
    command (``Settings.executor``) and handed to every stage run; concrete executors are
    :class:`LocalExecutor` (this process) and ``ray_runner.RayExecutor`` (Ray Data actors)."""

    name = "executor"
    #: the stage runs in this process (so a stage may prefetch its to-do list here)
    in_process = False

    def run(self, stage: Stage, items: list[dict], store: Store, batch_size: int = 32, retry_failed: bool = False,
            desc: str | None = None, unit: str = "it") -> tuple[StageCache, RunSummary]:
        raise NotImplementedError


class LocalExecutor(Executor):
    """Batches in this process; out of memory halves the batch and carries on."""

    name = "local"
    in_process = True

    def run(self, stage: Stage, items: list[dict], store: Store, batch_size: int = 32, retry_failed: bool = False,
            desc: str | None = None, unit: str = "it") -> tuple[StageCache, RunSummary]:
        with store.stage(stage.name, stage.key).lock():
            return _run_local(stage, items, store, batch_size, retry_failed, desc, unit)


def run_stage(stage: Stage, items: list[dict], store: Store, batch_size: int = 32, retry_failed: bool = False,
              desc: str | None = None, unit: str = "it") -> tuple[StageCache, RunSummary]:
    """Run ``stage`` over ``items`` (dicts with a unique ``item_key``) in this process, resuming."""
    return LocalExecutor().run(stage, items, store, batch_size, retry_failed, desc, unit)


def _run_local(stage: Stage, items: list[dict], store: Store, batch_size: int, retry_failed: bool, desc: str | None,
               unit: str) -> tuple[StageCache, RunSummary]:
    cache, uniq, inputs_key, todo = plan(stage, items, store, retry_failed)
    summary = RunSummary(stage.name, stage.key, total=len(uniq), cached=len(uniq) - len(todo))
    t0 = time.perf_counter()
    if todo:
        stage.setup()
        try:
            bs = max(1, int(batch_size))
            with Progress(len(todo), desc or f"{stage.name} {stage.label()}".strip(), unit=unit) as bar:
                i = 0
                while i < len(todo):
                    batch = todo[i : i + bs]
                    try:
                        results = process_batch(stage, batch)
                    except Exception as exc:  # noqa: BLE001
                        if is_oom(exc) and bs > 1:
                            bs = max(1, bs // 2)
                            log.warning("%s: out of memory; batch size halved to %d", stage.name, bs)
                            _free_accelerator_memory()
                            continue
                        raise
                    cache.write_part(results, ragged=stage.ragged)
                    count(summary, results)
                    bar.update(len(batch))
                    i += len(batch)
        finally:
            stage.teardown()
    finish(cache, uniq, inputs_key, summary, t0, todo)
    return cache, summary


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
