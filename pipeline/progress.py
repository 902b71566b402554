"""Progress: a tqdm bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("camim")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(message)s", stream=sys.stderr)


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Counts items; shows rate and ETA. Use as a context manager."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = 10.0, stream=None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every = every
        self.n = 0
        self.start = time.perf_counter()
        self._last = self.start
        self.stream = stream or sys.stderr
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
            return
        now = time.perf_counter()
        if now - self._last >= self.every or self.n >= self.total:
            self._last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def rate(self) -> float:
        el = time.perf_counter() - self.start
        return self.n / el if el > 0 else 0.0

    def line(self) -> str:
        r = self.rate()
        eta = (self.total - self.n) / r if r > 0 else 0.0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return (
            f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%) {r:.1f} {self.unit}/s "
            f"elapsed {fmt_seconds(time.perf_counter() - self.start)} eta {fmt_seconds(eta)}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
