"""A report's runs side by side on a CPU (``[report] jobs``, ``--jobs`` / ``JOBS``).

A tuned-top step on two cores is only 1.2-1.6x faster than on one (the train bench), so a
report trains more runs an hour as several one-thread processes than as one process on every
core.  ``jobs = "auto"`` fixes how many a machine takes from its cores and its memory alone
(never from how many runs are left), and each run's thread count from that: a run's thread
count changes its floats and is part of its key (``trainer.cpu_threads``), so the same report
on the same machine always trains the same runs, however far an earlier try of it got.

Each run trains in a process of its own (``spawn``), from the upstream outputs the report
resolved (nothing upstream runs again, no caption API is called again), under the run's own
lock; a process that outlives the report is killed with it (``PR_SET_PDEATHSIG``), and what a
killed run had finished (its last epoch's checkpoint) is resumed by the next report.

How many of those processes train *at once* also follows each run's memory: a run starts only while
the runs training and it fit in the memory available when the pool started (:func:`run_memory`, from
the data it loads; once a run of a source has finished, its measured peak, kept in its
``metrics.json``, stands for that source's other runs).  That never changes a run's thread count,
so never its key: on a machine with little memory, or with big data, fewer runs train side by
side, on the same threads each.
"""

from __future__ import annotations

import os
import time

from pipeline.errors import PipelineError
from pipeline.memory import meminfo

#: the resident memory one run may take, for the machine-only count of ``auto`` (the slots, and so the
#: threads of each run): 5.7-6.6 GB was measured for a run of the full MNRE with Qwen's captions
RUN_MEMORY = 6 << 30
#: a run's peak resident memory is about RUN_BASE + RUN_PER_DATA x the bytes of its data
#: (:func:`stages.train.data.tensor_bytes`).  Measured on the full MNRE (MiniLM, memory reading, 4
#: epochs, one thread, two side by side, an AMD EPYC; ``peak_memory_bytes``): text only, 0.43 GB of
#: data, 4.03 GB (planned 4.11); with Qwen's captions, 2.30 GB of data, 6.29 GB (planned 6.71); a
#: MiniCPM run, 2.38 GB of data, about 6.6 GB RSS (planned 6.83).  The optimizer, the oneDNN kernel
#: cache and the batches' activations are most of the base.
RUN_BASE = 3_500_000_000
RUN_PER_DATA = 1.4


def run_memory(data_bytes: int) -> int:
    """The memory a run whose data holds ``data_bytes`` is planned to take (see RUN_BASE)."""
    return RUN_BASE + int(RUN_PER_DATA * data_bytes)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def total_memory() -> int:
    return meminfo("MemTotal") or RUN_MEMORY


def available_memory() -> int:
    """The memory free for new processes now (``MemAvailable``; else the total)."""
    return meminfo("MemAvailable") or total_memory()


def jobs_and_threads(value, device_type: str, threads: int, where: str = "[report] jobs") -> tuple[int, int]:
    """How many runs train side by side, and the ``threads`` each gets.  ``value``: ``"auto"`` or a
    whole number >= 1; ``threads``: the ``[train] threads`` setting (0: the cores shared out).
    Off the CPU, and at 1 job, runs train one after the other, as ``threads`` says."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        auto = True
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        auto = False
    else:
        raise PipelineError(f"{where} = {value!r}: expected auto or a whole number of runs side by side (1: one after the other)")
    if device_type != "cpu":
        return 1, threads
    n = cores()
    if auto:
        jobs = max(1, min(n // max(1, threads), total_memory() // RUN_MEMORY))
    else:
        jobs = value
    if jobs == 1:
        return 1, threads
    return jobs, threads if threads > 0 else max(1, n // jobs)


def report_jobs(settings, conf: dict, jobs=None) -> tuple[int, int, str]:
    """A report's ``(jobs, threads per run, where the jobs came from)``: ``jobs`` (``--jobs``/``JOBS``)
    or the profile's ``[report] jobs``; ``conf``: the trainer's options."""
    from stages.train.trainer import pick_device

    where = "--jobs/JOBS" if jobs is not None else "[report] jobs"
    value = jobs if jobs is not None else settings.section("report").get("jobs", "auto")
    n, threads = jobs_and_threads(value, pick_device(settings.device).type, int(conf["threads"]), where)
    return n, threads, where


def can_send(inputs: dict) -> bool:
    """Whether a source's resolved upstream outputs can go to a run's process (they pickle)."""
    import pickle

    try:
        pickle.dumps(inputs)
    except Exception:  # noqa: BLE001 - any object that does not pickle: the runs train in the report's process
        return False
    return True


def _child_start(report_pid: int) -> None:
    """In each run's process: die with the report (Linux), and print nothing but errors.  A report
    that died before the signal was asked for is seen by its pid: the run's process ends too."""
    import ctypes
    import signal
    import sys

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != report_pid:
        os._exit(1)
    sys.stdout = open(os.devnull, "w")


def pool(jobs: int):
    """``jobs`` spawned processes that die with this one.  A process that dies itself (killed, out of
    memory) breaks the pool: what it was training is told, never waited on."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_child_start, initargs=(os.getpid(),))


def _stop(workers) -> None:
    """End the pool now: the runs still training are killed (the executor cannot cancel a running call);
    each resumes from its last epoch's checkpoint."""
    for p in list((getattr(workers, "_processes", None) or {}).values()):
        p.kill()
    workers.shutdown(wait=True, cancel_futures=True)


def _train(task: tuple) -> tuple:
    """One run in a worker: ``(index, settings, source, seed, overrides, inputs)`` ->
    ``(index, wall_s, error, peak resident bytes of the run)``."""
    i, settings, src, seed, over, inputs = task
    from stages.train.trainer import train_one

    t = time.perf_counter()
    try:
        run = train_one(settings, src, seed, over, inputs=inputs, quiet=True)
    except PipelineError as exc:
        return i, time.perf_counter() - t, str(exc), None
    return i, time.perf_counter() - t, None, run.metrics.get("peak_memory_bytes")


def _a_worker_died(workers) -> bool:
    """Whether a pool process has ended.  The executor misses one it started on a later ``submit``
    (CPython 3.11: the manager thread is woken before the process exists, so it waits on the older
    processes only): the report would wait for that run forever."""
    return any(p.exitcode is not None for p in list((getattr(workers, "_processes", None) or {}).values()))


def _died(describe, training, tasks) -> PipelineError:
    return PipelineError(
        f"a run's process ended without a result (killed, perhaps out of memory) while "
        f"{' or '.join(describe(j) for j in sorted(training))} trained; the finished runs are kept and a stopped "
        f"one resumes from its last epoch. To train the same runs one at a time: --jobs 1 --opt "
        f"threads={int(tasks[0][3].get('threads', 1))}")


def train_side_by_side(tasks: list[tuple], jobs: int, describe, progress, work=_train,
                       memory: list[int] | None = None, budget: int | None = None) -> None:
    """Train ``tasks`` (``(settings, source, seed, overrides, inputs)``, each a run not yet finished) in
    ``jobs`` processes, each task through ``work((index, *task))`` -> ``(index, wall_s, error, peak bytes)``.
    ``describe(i)`` names task ``i``; ``progress(i, wall_s)`` is told as each ends.  The first error, or
    a process that dies, stops the rest (finished runs stay; a stopped one resumes from its last epoch).

    ``memory``: each task's planned bytes; tasks then start in order while those training and the next
    fit in ``budget`` (default: the memory available now), one at least.  The tasks of one source and
    head (one data) then take the largest peak measured so far among them as their plan."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    if not tasks:
        return
    n = min(jobs, len(tasks))
    plan = list(memory) if memory is not None else [0] * len(tasks)
    if budget is None:
        budget = available_memory() if memory is not None else 0
    group = [(t[1], t[3].get("head")) for t in tasks]
    peaks: dict = {}
    workers = pool(n)
    ended = False
    try:
        todo, running = list(range(len(tasks))), {}
        while todo or running:
            while todo and len(running) < n and (not running or sum(plan[j] for j in running.values()) + plan[todo[0]] <= budget):
                i = todo.pop(0)
                running[workers.submit(work, (i, *tasks[i]))] = i
            finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            if not finished and _a_worker_died(workers):  # the executor may not see it (below)
                raise _died(describe, running.values(), tasks)
            for f in sorted(finished, key=running.get):
                i = running.pop(f)
                try:
                    _, wall, err, peak = f.result()
                except BrokenProcessPool:
                    raise _died(describe, [i, *running.values()], tasks) from None
                if err is not None:
                    raise PipelineError(f"{describe(i)}: {err}")
                if peak:
                    g = group[i]
                    peaks[g] = max(peaks.get(g, 0), peak)
                    for j in todo:
                        if group[j] == g:
                            plan[j] = peaks[g]
                progress(i, wall)
        ended = True
    finally:
        if ended:
            workers.shutdown(wait=True)
        else:
            _stop(workers)
