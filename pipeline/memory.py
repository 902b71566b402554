"""This machine's memory, and a process's peak, as Linux reports them (``/proc``); None elsewhere."""

from __future__ import annotations


def _proc_kb(path: str, field: str) -> int | None:
    """The ``<field>: <n> kB`` line of a ``/proc`` file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def meminfo(field: str) -> int | None:
    """A ``/proc/meminfo`` figure (``MemTotal``, ``MemAvailable``) in bytes."""
    return _proc_kb("/proc/meminfo", field)


def peak_memory() -> int | None:
    """This process's peak resident memory since it started or the last :func:`reset_peak` (``VmHWM``), in bytes."""
    return _proc_kb("/proc/self/status", "VmHWM")


def reset_peak() -> None:
    """Start this process's peak resident memory again from what it holds now (``clear_refs`` 5, Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
