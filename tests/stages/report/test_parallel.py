"""A report's runs side by side (``[report] jobs``) and the thread count in a run's key."""

import pytest

from pipeline.errors import PipelineError
from stages.report import parallel, progress_line


def test_auto_jobs_follow_the_cores_and_memory_never_the_runs_left(monkeypatch):
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    monkeypatch.setattr(parallel, "total_memory", lambda: 24 << 30)
    assert parallel.jobs_and_threads("auto", "cpu", 0) == (2, 1)
    monkeypatch.setattr(parallel, "cores", lambda: 16)
    assert parallel.jobs_and_threads("auto", "cpu", 0) == (4, 4)  # 24 GiB holds 4 runs of 6 GiB
    assert parallel.jobs_and_threads("auto", "cpu", 8) == (2, 8)
    assert parallel.jobs_and_threads(1, "cpu", 0) == (1, 0)  # one after the other, on every core as today
    assert parallel.jobs_and_threads("auto", "cuda", 0) == (1, 0)


@pytest.mark.parametrize("bad", ["many", 0, -1, 1.5, True])
def test_a_bad_jobs_value_is_an_error_naming_where_it_came_from(bad):
    with pytest.raises(PipelineError, match=r"--jobs/JOBS = .*expected auto or a whole number"):
        parallel.jobs_and_threads(bad, "cpu", 0, "--jobs/JOBS")


def test_the_time_left_counts_the_runs_side_by_side():
    assert "about 20 min more at 10.0 min a run, 2 side by side" in progress_line(1, 5, [600.0], 600.0, jobs=2)
    assert "about 40 min more at 10.0 min a run)" in progress_line(1, 5, [600.0], 600.0)


def test_the_thread_count_is_in_a_run_key_except_one_thread(tmp_path, small_source):
    from camim.graph import inputs_for
    from pipeline.config import Settings
    from stages.train.trainer import load_data, plan_run, train_options

    s = Settings(cache_dir=tmp_path / "c", runs_dir=tmp_path / "r", source=str(small_source), mllm="none")
    data = load_data(s, "none", "cam", inputs_for(s, "none"))
    keys = {n: plan_run(s, data, "none", 1, train_options(s, {"threads": n}))[1] for n in (1, 2)}
    c1 = plan_run(s, data, "none", 1, train_options(s, {"threads": 1}))[0]
    assert "threads" not in c1 and keys[1] != keys[2]  # one thread keeps the key runs had before it was held


def test_inputs_that_do_not_pickle_are_told_apart():
    assert parallel.can_send({"a": 1}) and not parallel.can_send({"m": pytest})


_KILLED_REPORT = """
import os, sys, time
sys.path.insert(0, {root!r})
from stages.report.parallel import pool


def hold(path):
    print(os.getpid(), file=open(path, "a"), flush=True)  # started: its initializer has run
    time.sleep(600)


if __name__ == "__main__":
    workers = pool(2)
    results = [workers.submit(hold, {pids!r}) for _ in range(2)]
    while not os.path.exists({pids!r}) or len(open({pids!r}).read().split()) < 2:
        time.sleep(0.05)
    print(" ".join(open({pids!r}).read().split()), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has died: only its parent's wait is left
    except OSError:
        return False


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_report_takes_its_runs_processes_with_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "report.py"
    script.write_text(_KILLED_REPORT.format(root=str(Path(parallel.__file__).resolve().parents[2]), pids=str(tmp_path / "pids")))
    report = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        children = [int(p) for p in report.stdout.readline().split()]
        assert len(children) == 2 and all(_alive(p) for p in children)
        os.kill(report.pid, signal.SIGKILL)  # as the OOM killer or `kill -9` would: no cleanup runs
        report.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in children)
    finally:
        report.kill()
        for p in children:  # a failed check leaves no sleeper behind
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


_DYING_RUN = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from pipeline.errors import PipelineError
from stages.report.parallel import train_side_by_side


def work(task):
    i = task[0]
    print(os.getpid(), file=open({pids!r}, "a"), flush=True)
    if i == 1:
        while len(open({pids!r}).read().split()) < 2:  # run 0 has started too
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
    time.sleep(600)
    return i, 0.0, None, None


if __name__ == "__main__":
    tasks = [(None, f"src{{i}}", 1, {{"threads": 1}}, {{}}) for i in range(4)]
    try:
        train_side_by_side(tasks, 2, lambda i: f"run {{i}}", lambda i, wall: print("progress", i), work=work)
    except PipelineError as exc:
        print("error:", exc, flush=True)
"""


def test_a_run_whose_process_dies_stops_the_report_with_its_name_and_kills_the_rest(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script, pids = tmp_path / "report.py", tmp_path / "pids"
    script.write_text(_DYING_RUN.format(root=str(Path(parallel.__file__).resolve().parents[2]), pids=str(pids)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120).stdout
    assert "error: a run's process ended without a result (killed, perhaps out of memory) while run 0 or run 1 trained" in out
    assert "--jobs 1 --opt threads=1" in out and "progress" not in out
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2 and not any(_alive(p) for p in started)  # run 0, asleep, was killed: no orphan trains on


_MEMORY_PLAN = """
import sys, time
sys.path.insert(0, {root!r})
from stages.report.parallel import train_side_by_side

MEASURED = {measured!r}


def work(task):
    i = task[0]
    print("start", i, file=open({log!r}, "a"), flush=True)
    deadline = time.monotonic() + 30
    while MEASURED and i == 1 and "start 2" not in open({log!r}).read() and time.monotonic() < deadline:
        time.sleep(0.05)  # run 1 ends only once run 2 has started beside it (if it may)
    print("end", i, file=open({log!r}, "a"), flush=True)
    return i, 1.0, None, 3 << 30 if MEASURED and i == 0 else None  # run 0 measures 3 GiB: less than it was planned


if __name__ == "__main__":
    tasks = [(None, src, 1, {{"threads": 1}}, {{}}) for src in ("a", "a", "b")]
    train_side_by_side(tasks, 2, str, lambda i, wall: None, work=work, memory=[6 << 30] * 3, budget=10 << 30)
"""


@pytest.mark.parametrize("measured", [False, True])
def test_runs_start_only_as_memory_allows_and_a_measured_peak_replaces_the_plan(tmp_path, measured):
    import subprocess
    import sys
    from pathlib import Path

    script, log = tmp_path / "report.py", tmp_path / "log"
    script.write_text(_MEMORY_PLAN.format(root=str(Path(parallel.__file__).resolve().parents[2]), log=str(log), measured=measured))
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    events = log.read_text().split("\n")[:-1]
    # two slots, but two planned 6 GiB runs do not fit in 10 GiB: one at a time ...
    assert events[:3] == ["start 0", "end 0", "start 1"]
    if measured:  # ... until run 0 of source a measured 3 GiB: a's next run (3) and b's (6) fit together
        assert events[3] == "start 2"
    else:
        assert events[3:] == ["end 1", "start 2", "end 2"]


def test_a_runs_data_bytes_count_each_storage_once():
    import torch

    from stages.train.data import Ragged, tensor_bytes

    flat = torch.zeros(10, 4, dtype=torch.float16)
    rag = Ragged(flat, torch.tensor([0, 4, 10]))
    shared = rag.shared(torch.tensor([0, 0, 1, -1]))  # four records read two stored rows
    got = tensor_bytes({"a": rag, "b": [shared, (torch.zeros(3, dtype=torch.int64), "text")], "n": 3})
    # the flat rows once (80), both offsets (3 and 4 int64), the index (4) and the int64 tensor (3); no int
    assert got == 10 * 4 * 2 + (3 + 4 + 4 + 3) * 8


def test_a_run_keeps_its_peak_memory_and_the_report_plans_its_sources_other_runs_from_it(tmp_path, small_source, monkeypatch):
    import json

    from camim.graph import inputs_for
    from pipeline.config import Settings
    from pipeline.memory import peak_memory
    from stages.report import _plan_side
    from stages.train.trainer import load_data, train_one

    if peak_memory() is None:
        pytest.skip("no /proc/self/status here")
    s = Settings(cache_dir=tmp_path / "c", runs_dir=tmp_path / "r", source=str(small_source), mllm="none")
    inputs = inputs_for(s, "none")
    data = load_data(s, "none", "cam", inputs)
    over = {"epochs": 1, "head": "cam", "threads": 1}
    run = train_one(s, "none", 1, over, data=data, quiet=True)
    peak = json.loads((run.dir / "metrics.json").read_text())["peak_memory_bytes"]
    from stages.report.parallel import total_memory

    assert 50 << 20 < peak < total_memory()  # torch and the run's data at least (Linux keeps the peak lazily: no exact bound)
    tasks, names = [], []
    plans, planned = _plan_side(s, "none", "cam", [1, 2], over, data, inputs, 1, True, tasks, names, [], False)
    assert planned == peak and [t[2] for t in tasks] == [2] and len(plans) == 2  # seed 1 is reused, seed 2 queued


def test_a_report_short_of_memory_says_so_and_still_trains_every_run(tmp_path, small_source, monkeypatch, capsys):
    import json

    from camim.graph import resolver
    from pipeline.config import Settings
    from stages.report import run_report

    monkeypatch.setattr(parallel, "available_memory", lambda: 1 << 30)  # less than one run's plan: one at a time
    s = Settings(cache_dir=tmp_path / "c", runs_dir=tmp_path / "r", reports_dir=tmp_path / "rep", source=str(small_source))
    srcs = ["none", "imported:qwen"]
    run_report(s, srcs, resolver(s, srcs), seeds=[1], overrides={"epochs": 1}, quiet_runs=True, jobs=2)
    out = capsys.readouterr().out
    assert "GB is free, so fewer than 2 may train at once (on 1 thread(s) each all the same: the same runs)" in out
    runs = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*/metrics.json")]
    assert sorted(m["mllm"] for m in runs) == sorted(srcs) and all(m["peak_memory_bytes"] > 0 for m in runs)
