"""The cache notices damage: truncated or overwritten parts are quarantined and recomputed,
NaN/Inf never enters the cache, a full disk is one clear error line."""

import errno
import os

import pytest
import torch
from typer.testing import CliRunner

from camim.cli import app
from pipeline.runner import run_stage
from pipeline.stage import Stage
from pipeline.store import ItemResult, Store


class Vecs(Stage):
    name = "vecs"
    ragged = ("seq",)
    calls = 0

    def key_config(self):
        return {"op": "vecs"}

    def run(self, batch):
        Vecs.calls += len(batch)
        return [ItemResult(it["item_key"], row={"x": it["x"]},
                           tensors={"v": torch.full((512,), float(it["x"])), "seq": torch.arange(it["x"] % 5 + 1, dtype=torch.float32)})
                for it in batch]


ITEMS = [{"item_key": f"k{i}", "x": i} for i in range(40)]


def _clean(tmp_path):
    cache, _ = run_stage(Vecs(), ITEMS, Store(tmp_path / "cache"), batch_size=10)
    return cache


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _overwrite(p):
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = os.urandom(min(4096, len(data) - mid))
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate_tensors", "truncate_index", "overwrite_tensors"])
def test_damaged_part_is_reported_quarantined_and_recomputed(tmp_path, damage, capsys):
    cache = _clean(tmp_path)
    part = cache.part_paths()[1]
    target = part.with_suffix(".safetensors") if damage.endswith("tensors") else part
    size = target.stat().st_size
    (_truncate if damage.startswith("truncate") else _overwrite)(target)
    if damage == "overwrite_tensors":
        assert target.stat().st_size == size

    # cache verify lists the damage (exit 1) without changing anything
    r = CliRunner().invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 1 and f"damaged vecs/{cache.key}/{part.stem}" in r.output and "4 part(s) checked, 1 damaged" in r.output

    # the next run of the stage: told which part and why; only its 10 items are computed again
    Vecs.calls = 0
    again, summary = run_stage(Vecs(), ITEMS, Store(tmp_path / "cache"), batch_size=10)
    assert Vecs.calls == 10 and summary.done == 10 and summary.cached == 30
    err = capsys.readouterr().err
    assert f"damaged part {part}" in err and "recomputed" in err
    got = again.tensors([it["item_key"] for it in ITEMS], ["v", "seq"])
    assert all(bool((v == float(i)).all()) for i, v in enumerate(got["v"]))
    assert [len(s) for s in got["seq"]] == [i % 5 + 1 for i in range(40)]
    r = CliRunner().invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0 and "1 damaged" not in r.output and "quarantined" in r.output


def test_a_part_is_hashed_again_only_after_it_changed_and_cache_verify_always_hashes(tmp_path, monkeypatch):
    """Stamps (size, mtime, inode when the checksum last matched) spare a run re-hashing GBs of
    unchanged features; a changed file is hashed again, and `cache verify` hashes every part."""
    import pipeline.store as store_mod

    cache = _clean(tmp_path)
    tensors = [p.with_suffix(".safetensors") for p in cache.part_paths()]
    for p in tensors:  # as if written a while ago: the stamp no longer matches, nor is it racy afterwards
        ns = p.stat().st_mtime_ns - 10**9
        os.utime(p, ns=(ns, ns))
    hashed = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda path: hashed.append(path) or real(path))

    assert Store(tmp_path / "cache").stage("vecs", cache.key).index().num_rows == 40
    assert sorted(hashed) == sorted(tensors)  # mtime changed: each hashed once, then stamped
    hashed.clear()
    assert Store(tmp_path / "cache").stage("vecs", cache.key).index().num_rows == 40
    assert hashed == []  # a new reader trusts the stamps
    _overwrite(tensors[2])  # a write moves the mtime: hashed again, found damaged
    fresh = Store(tmp_path / "cache").stage("vecs", cache.key)
    assert fresh.index().num_rows == 30 and hashed == [tensors[2]]
    assert fresh.orphans() == sorted((cache.dir / "quarantine").iterdir())  # its stamp went with it
    hashed.clear()
    r = CliRunner().invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0 and "3 part(s) checked, 0 damaged" in r.output and len(hashed) == 3


class NanStage(Vecs):
    name = "nans"

    def run(self, batch):
        out = super().run(batch)
        for r in out:
            if r.item_key == "k3":
                r.tensors["v"][7] = float("nan")
            if r.item_key == "k4":
                r.tensors["v"][0] = float("inf")
        return out


def test_nan_or_inf_is_a_failure_naming_the_item_never_a_cached_row(tmp_path):
    cache, summary = run_stage(NanStage(), ITEMS[:10], Store(tmp_path), batch_size=10)
    assert summary.failed == 2 and summary.done == 8
    rows = {r["item_key"]: r for r in cache.rows()}
    assert not rows["k3"]["ok"] and "'v' of item k3 holds NaN or Inf" in rows["k3"]["error"]
    assert not rows["k4"]["ok"] and rows["k5"]["ok"]


def test_a_full_disk_is_one_error_line_and_committed_parts_stay(tmp_path, small_source, monkeypatch):
    import safetensors.torch

    args = ["features", "--source", str(small_source), "--cache-dir", str(tmp_path / "c"), "--mllm", "none"]
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:  # the first part lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    r = CliRunner().invoke(app, args + ["--batch-size", "8"])
    assert r.exit_code == 2 and "No space left on device" in r.output and "Traceback" not in r.output
    assert "error: cannot write" in r.output and "free space and run again to resume" in r.output
    tf = next((tmp_path / "c" / "text_features").iterdir())
    assert len(list((tf / "parts").glob("part-*.parquet"))) == 1
    assert not [p for p in (tf / "parts").iterdir() if p.name.startswith(".")]  # no temp file left behind
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "8 cached" in r.output


SLOW = '''
import os, sys, time, torch
sys.path.insert(0, {repo!r})
from pipeline.runner import run_stage
from pipeline.stage import Stage
from pipeline.store import ItemResult, Store

class Slow(Stage):
    name = "slow"
    def key_config(self):
        return {{"op": "slow"}}
    def run(self, batch):
        with open(sys.argv[2], "a") as f:
            f.write("".join(it["item_key"] + "\\n" for it in batch))
        deadline = time.time() + 120
        while not os.path.exists(sys.argv[3]) and time.time() < deadline:  # hold the key until the test says go
            time.sleep(0.02)
        return [ItemResult(it["item_key"], row={{"x": it["x"]}}, tensors={{"v": torch.tensor([float(it["x"])])}}) for it in batch]

items = [{{"item_key": f"k{{i}}", "x": i}} for i in range(60)]
_, s = run_stage(Slow(), items, Store(sys.argv[1]), batch_size=3)
print(f"new {{s.done}} cached {{s.cached}}")
'''


def test_two_concurrent_runs_compute_each_item_once(tmp_path):
    import subprocess
    import sys
    import threading
    import time

    from tests.helpers import REPO

    script = tmp_path / "slow.py"
    script.write_text(SLOW.format(repo=str(REPO)))
    cache, log, go = tmp_path / "cache", tmp_path / "computed.txt", tmp_path / "go"
    args = [str(script), str(cache), str(log), str(go)]
    a = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not log.exists() and time.time() < deadline:  # A holds the key: it has computed its first batch
        time.sleep(0.05)
    b = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    safety = threading.Timer(90, go.touch)  # never a hang, whatever happens
    safety.start()
    err_b = ""
    for line in b.stderr:  # B reaches the lock and says it waits; only then may A go on
        err_b += line
        if "waiting for it" in line:
            break
    go.touch()
    safety.cancel()
    out_a, err_a = a.communicate(timeout=120)
    out_b, rest = b.communicate(timeout=120)
    err_b += rest
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    computed = log.read_text().split()
    assert len(computed) == 60 and len(set(computed)) == 60  # every item once, between the two runs
    assert "new 60 cached 0" in out_a and "new 0 cached 60" in out_b
    assert "waiting for it" in err_b
    sc = Store(cache).entries()[0]
    assert sc.index().num_rows == 60 and len(sc.part_paths()) == 20


def test_train_heals_an_overwritten_feature_part_and_ends_as_a_clean_run(tmp_path, small_source):
    """The issue's worst case: 4 KiB overwritten inside a text-feature part (size unchanged) used to
    train to `loss nan ... val F1 0.00`.  Now the part is quarantined, recomputed, and the run
    scores exactly as one on an undamaged cache."""
    import json

    args = ["train", "--source", str(small_source), "--mllm", "imported:qwen", "--epochs", "2",
            "--opt", "hidden=32", "--opt", "heads=2"]
    clean = CliRunner().invoke(app, args + ["--cache-dir", str(tmp_path / "a"), "--runs-dir", str(tmp_path / "ra")])
    assert clean.exit_code == 0, clean.output
    CliRunner().invoke(app, ["features", "--source", str(small_source), "--mllm", "imported:qwen",
                             "--cache-dir", str(tmp_path / "b"), "--batch-size", "16"])
    tf = next((tmp_path / "b" / "text_features").iterdir())
    part = sorted((tf / "parts").glob("part-*.safetensors"))[0]
    _overwrite(part)
    healed = CliRunner().invoke(app, args + ["--cache-dir", str(tmp_path / "b"), "--runs-dir", str(tmp_path / "rb")])
    assert healed.exit_code == 0, healed.output
    assert "16 new" in healed.output  # the damaged part's items, computed again
    (ma,) = (tmp_path / "ra").glob("*/metrics.json")
    (mb,) = (tmp_path / "rb").glob("*/metrics.json")
    a, b = json.loads(ma.read_text()), json.loads(mb.read_text())
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]


def test_a_failed_write_says_what_to_do_about_its_cause(tmp_path):
    from pipeline.store import WriteError, atomic_write_bytes

    (tmp_path / "afile").write_text("x")
    with pytest.raises(WriteError, match=r"cannot write .*afile/out.txt: .*a file stands where a folder is needed"):
        atomic_write_bytes(tmp_path / "afile" / "out.txt", b"data")
