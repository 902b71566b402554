"""Executors by name: ``local`` (this process) or ``ray`` (Ray Data actors)."""

from __future__ import annotations

from .errors import PipelineError
from .runner import Executor, LocalExecutor

ENGINES = ("local", "ray")


def make_executor(engine: str = "local", workers: int | None = None) -> Executor:
    if engine == "local":
        return LocalExecutor()
    if engine == "ray":
        from .ray_runner import RayExecutor

        return RayExecutor(workers)
    raise PipelineError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
