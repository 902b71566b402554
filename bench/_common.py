"""Helpers shared by the benchmarks: timing, the matmul roofline measured in the same run,
and which CPU it ran on (files starting with ``_`` are not benchmarks themselves)."""

from __future__ import annotations

import os
import platform
import time


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN primitive creation, allocator)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def roofline_size(rate: float, seconds: float) -> int:
    """The square size, from 2048 down by halves to 256, whose product takes at most ``seconds``
    at ``rate`` FLOP/s."""
    n = 2048
    while n > 256 and 2 * n**3 / rate > seconds:
        n //= 2
    return n


def roofline(repeats: int, seconds: float = 2.0) -> dict:
    """GFLOP/s of a square ``torch.mm`` in fp32 and bf16, the best of ``repeats + 2``.  The size is
    2048 unless one product would take over ``seconds`` at the rate of a 256 probe (a CPU without
    native bf16 multiplies at 0.3-1.4 GFLOP/s: a 2048 product takes about a minute), then smaller; the probe
    underestimates the rate, so a fast CPU keeps 2048."""
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        p = torch.randn(256, 256).to(dt)
        n = roofline_size(2 * 256**3 / _best(lambda: torch.mm(p, p), 1), seconds)
        a = torch.randn(n, n).to(dt)
        b = torch.randn(n, n).to(dt)
        s = _best(lambda: torch.mm(a, b), repeats + 2)
        out[name] = 2 * n**3 / s / 1e9
        out[f"{name}_n"] = n
    return out


def bf16_slow(roof: dict) -> bool:
    """Whether bf16 multiplies under a quarter of fp32's rate in ``roof`` (a CPU without AMX or
    AVX512-BF16): a bench then times no bf16 model, whose runs would take minutes, and says why."""
    return roof["bf16"] < roof["fp32"] / 4


def bf16_skip_text(roof: dict) -> str:
    """Why a bench skips its bf16 timings on such a CPU, with both rates."""
    return (f"this CPU multiplies bf16 matrices at {roof['bf16']:.1f} GFLOP/s against {roof['fp32']:.1f} in fp32 "
            f"(the roofline above), {roof['fp32'] / roof['bf16']:.0f}x slower")


def roofline_text(roof: dict) -> str:
    """``fp32 <r> GFLOP/s (n=2048), bf16 <r> GFLOP/s (n=...)``: each rate with the size it was measured at."""
    return ", ".join(f"{k} {roof[k]:.1f} GFLOP/s (torch.mm n={roof[k + '_n']})" for k in ("fp32", "bf16"))


def cpu_name() -> str:
    """The CPU model, whether it runs bf16 natively (AMX / AVX512-BF16), and the cores."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    kind = "AMX-BF16" if "amx_bf16" in info else ("AVX512-BF16" if "avx512_bf16" in info else "no native bf16")
    return f"{name} ({kind}, {os.cpu_count()} cores)"


def _machine_busy_s() -> float | None:
    """CPU-seconds every process on the machine has spent busy since boot (all cores; /proc/stat's
    ``cpu`` line less idle and iowait), or None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / ticks  # user nice system idle iowait irq softirq steal


def _own_cpu_s() -> float:
    """CPU-seconds this process (every thread) and its finished children have spent."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OthersLoad:
    """How many cores *other* processes kept busy, measured from /proc/stat and this process's own
    CPU time: the load average lags by minutes (a job that ended a minute ago still shows), and it
    counts the bench itself.  ``quiet()`` samples the machine before the bench starts, waiting up to
    ``BENCH_QUIET_S`` (default 30) seconds for the others to fall under a tenth of a core; ``since()``
    gives the others' mean over the bench so far.  Read the shares, not the load average."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = _machine_busy_s()
        self.own0 = _own_cpu_s()

    def since(self) -> float | None:
        """Mean cores other processes used since the last reset (None without /proc/stat)."""
        busy = _machine_busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = max(time.perf_counter() - self.t0, 1e-9)
        return max(0.0, (busy - self.busy0) - (_own_cpu_s() - self.own0)) / wall

    def reset(self) -> None:
        self.__init__()

    def quiet(self, max_wait: float | None = None, below: float = 0.1, window: float = 1.0) -> str:
        """Sample ``window`` seconds at a time until the others use under ``below`` cores or
        ``max_wait`` seconds have gone; then start measuring the bench from now.  A line to print."""
        max_wait = float(os.environ.get("BENCH_QUIET_S", "30")) if max_wait is None else max_wait
        start, used = time.perf_counter(), None
        while True:
            self.reset()
            time.sleep(window)
            used = self.since()
            waited = time.perf_counter() - start
            if used is None or used < below or waited >= max_wait:
                break
        self.reset()
        if used is None:
            return "others' load: unknown (no /proc/stat)"
        how = "quiet" if used < below else f"not quiet after waiting {waited:.0f} s (BENCH_QUIET_S)"
        return (f"others' load before the bench: {used:.2f} of {os.cpu_count()} cores over the last {window:.0f} s "
                f"({how}; load average {os.getloadavg()[0]:.2f}, which lags by minutes)")

    def summary(self) -> str:
        used = self.since()
        if used is None:
            return "others' load during the bench: unknown (no /proc/stat)"
        return (f"others' load during the bench: {used:.2f} of {os.cpu_count()} cores on average over "
                f"{time.perf_counter() - self.t0:.0f} s" + (" (something else ran: the times are slowed)" if used >= 0.25 else ""))
