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
