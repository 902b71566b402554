"""This machine's memory, and a process's peak, as Linux reports them (``/proc``); None elsewhere."""

from __future__ import annotations


def meminfo(field: str) -> int | None:
    """A ``/proc/meminfo`` figure (``MemTotal``, ``MemAvailable``) in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory() -> int | None:
    """This process's peak resident memory since it started or the last :func:`reset_peak` (``VmHWM``), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> None:
    """Start this process's peak resident memory again from what it holds now (``clear_refs`` 5, Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
