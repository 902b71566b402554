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


def roofline(repeats: int) -> dict:
    import torch

    out = {}
    n = 2048
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n).to(dt)
        b = torch.randn(n, n).to(dt)
        s = _best(lambda: torch.mm(a, b), repeats + 2)
        out[name] = 2 * n**3 / s / 1e9
    return out


def cpu_name() -> str:
    """The CPU model, whether it runs bf16 natively (AMX / AVX512-BF16), and the cores."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    kind = "AMX-BF16" if "amx_bf16" in info else ("AVX512-BF16" if "avx512_bf16" in info else "no native bf16")
    return f"{name} ({kind}, {os.cpu_count()} cores)"
