"""Benchmarks run by ``camim bench`` / ``make bench``.

Every module ``bench/<name>.py`` (not starting with ``_``) is one benchmark with a
``main(settings)`` (or ``main()``) that prints numbers and ratios; ``--only a,b``
/ ``BENCH=a,b`` picks some.  Benchmarks print, they never assert timings.
"""

from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path

from pipeline.errors import PipelineError


def names() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def run_all(settings, only: list[str] | None = None) -> None:
    known = names()
    chosen = only or known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise PipelineError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for name in chosen:
        main = importlib.import_module(f"bench.{name}").main
        print(f"== bench {name} ==")
        t0 = time.perf_counter()
        main(settings) if inspect.signature(main).parameters else main()
        print(f"== bench {name}: {time.perf_counter() - t0:.1f}s ==")
