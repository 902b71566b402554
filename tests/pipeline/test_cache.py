"""Cache keys and the store: what invalidates what, atomic parts, ls and gc."""

import subprocess
import sys

import pytest
import torch

from camim import chain
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.runner import run_stage
from pipeline.stage import Stage
from pipeline.store import ItemResult, Store
from stages.captions import CAPTIONERS
from stages.captions.base import Captioner


class TemplateCaptioner(Captioner):
    """A deterministic captioner whose output depends on a prompt template file, so
    that the engine's invalidation rules can be checked without a generative model."""

    backend = "template"
    needs_images = False
    default_batch_size = 16

    def key_config(self):
        return {"backend": "template", "prompt": self.rendered()}

    def rendered(self):
        with open(self.arg) as f:
            return f.read().strip()

    def caption(self, batch):
        p = self.rendered()
        return [ItemResult(it["item_key"], row={"img_id": it["img_id"], "caption": f"{p} showing {it['img_id']}"}) for it in batch]


@pytest.fixture
def template(tmp_path):
    CAPTIONERS.add("template", TemplateCaptioner)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A photo")
    return prompt


def _run(tmp_path, source, mllm, batch_size=None):
    s = Settings(cache_dir=tmp_path / "cache", source=str(source), mllm=mllm, batch_size=batch_size)
    return chain.features(s)


def test_prompt_edit_invalidates_captions_and_caption_features_only(tmp_path, small_source, template):
    ds1, caps1, f1 = _run(tmp_path, small_source, f"template:{template}")
    n_sent = ds1.records.num_rows
    n_img = len(caps1[0].by_item)
    assert f1.summary.done == n_sent + n_img  # every image has a distinct caption

    template.write_text("A detailed picture")  # the prompt edit
    ds2, caps2, f2 = _run(tmp_path, small_source, f"template:{template}")
    assert ds2.key == ds1.key
    assert caps2[0].cache.key != caps1[0].cache.key          # captions re-run
    assert caps2[0].summary.done == n_img
    assert f2.cache.key == f1.cache.key                      # same encoder, same stage key
    assert f2.summary.done == n_img                          # only the new caption features
    assert f2.summary.cached == n_sent                       # sentence features untouched


def test_batch_size_invalidates_nothing(tmp_path, small_source):
    ds1, caps1, f1 = _run(tmp_path, small_source, "imported:qwen", batch_size=7)
    ds2, caps2, f2 = _run(tmp_path, small_source, "imported:qwen", batch_size=32)
    assert (ds1.key, caps1[0].cache.key, f1.cache.key) == (ds2.key, caps2[0].cache.key, f2.cache.key)
    assert caps2[0].summary.done == 0 and f2.summary.done == 0
    assert f2.summary.cached == f1.summary.done


def test_device_and_paths_stay_out_of_keys(tmp_path, small_source):
    copy = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(small_source, copy)
    s1 = Settings(cache_dir=tmp_path / "c1", source=str(small_source), device="cpu")
    s2 = Settings(cache_dir=tmp_path / "c2", source=str(copy), device="auto")
    from stages.data import prepare
    from stages.features import text_stage

    assert prepare(s1).key == prepare(s2).key
    assert text_stage(s1).key == text_stage(s2).key


class Squares(Stage):
    name = "squares"
    ragged = ("seq",)

    def key_config(self):
        return {"op": "square"}

    def run(self, batch):
        out = []
        for it in batch:
            if it["x"] == 13:
                raise ValueError("unlucky item")
            n = it["x"] % 4 + 1
            out.append(ItemResult(it["item_key"], row={"x": it["x"]},
                                  tensors={"sq": torch.tensor([it["x"] ** 2], dtype=torch.float32), "seq": torch.arange(n, dtype=torch.int32)}))
        return out


def test_parts_roundtrip_ragged_and_bad_items(tmp_path):
    store = Store(tmp_path)
    items = [{"item_key": f"k{i}", "x": i} for i in range(30)]
    cache, summary = run_stage(Squares(), items, store, batch_size=8)
    assert summary.done == 29 and summary.failed == 1
    assert "ValueError" in summary.line()
    keys = [f"k{i}" for i in range(30) if i != 13]
    t = cache.tensors(keys, ["sq", "seq"])
    assert [int(v[0]) for v in t["sq"]] == [i * i for i in range(30) if i != 13]
    assert [len(v) for v in t["seq"]] == [i % 4 + 1 for i in range(30) if i != 13]
    row = cache.rows(["k13"])[0]
    assert not row["ok"] and "unlucky item" in row["error"]
    # warm re-run: nothing new, the failure still reported
    _, again = run_stage(Squares(), items, store, batch_size=3)
    assert again.done == 0 and again.cached == 29 and again.failed == 1


class Rows(Stage):
    """Item x: x % 3 + 1 rows of width 2 (x, x), one ragged tensor."""

    name = "rows"
    ragged = ("seq",)

    def key_config(self):
        return {"op": "rows"}

    def run(self, batch):
        return [ItemResult(it["item_key"], row={"x": it["x"]},
                           tensors={"seq": torch.full((it["x"] % 3 + 1, 2), float(it["x"]), dtype=torch.float16)}) for it in batch]


def test_ragged_reads_rows_into_one_flat_tensor_as_the_per_item_tensors_are(tmp_path):
    store = Store(tmp_path)
    cache, _ = run_stage(Rows(), [{"item_key": f"k{i}", "x": i} for i in range(20)], store, batch_size=6)  # 4 parts
    keys = ["k7", None, "k0", "k7", "k19", None, "k12"]  # repeats, gaps, across parts
    flat, off = cache.ragged(keys, "seq")
    assert flat.dtype == torch.float16 and flat.shape[1] == 2 and off.tolist()[0] == 0 and len(off) == len(keys) + 1
    per = cache.tensors([k for k in keys if k], ["seq"])["seq"]
    want = iter(per)
    for i, k in enumerate(keys):
        row = flat[off[i]:off[i + 1]]
        assert torch.equal(row, next(want)) if k else row.shape[0] == 0
    empty, off0 = cache.ragged([None, None], "seq", dim=2)
    assert empty.shape == (0, 2) and off0.tolist() == [0, 0, 0]
    with pytest.raises(PipelineError, match="item k99 is not in the cache"):
        cache.ragged(["k1", "k99"], "seq")
    with pytest.raises(PipelineError, match="no item to read 'seq' from, and no width given"):
        cache.ragged([None], "seq")


def test_uncommitted_files_are_ignored_and_collected(tmp_path):
    store = Store(tmp_path)
    items = [{"item_key": f"k{i}", "x": i} for i in range(5)]
    cache, _ = run_stage(Squares(), items, store, batch_size=5)
    # a killed writer leaves a temp file and a tensor file whose index never landed
    (cache.parts_dir / ".part-000009-abc.parquet.tmp-1").write_bytes(b"junk")
    (cache.parts_dir / "part-000009-abc.safetensors").write_bytes(b"junk")
    cache._index = None
    assert cache.index().num_rows == 5
    assert len(cache.orphans()) == 2


def test_cache_ls_and_gc_cli(tmp_path, small_source):
    env_cache = str(tmp_path / "cache")
    _run(tmp_path, small_source, "imported:qwen,imported:blip2")
    cli = [sys.executable, "-m", "camim.cli"]
    ls = subprocess.run(cli + ["cache", "ls", "--cache-dir", env_cache], capture_output=True, text=True, check=True)
    assert "imported:qwen" in ls.stdout and "text_features" in ls.stdout and "total" in ls.stdout
    # keep only qwen: blip2's captions become unreachable
    gc = subprocess.run(cli + ["cache", "gc", "--cache-dir", env_cache, "--source", str(small_source), "--mllm", "imported:qwen", "--yes"],
                        capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr
    assert "removed captions/" in gc.stdout and "imported:blip2" in gc.stdout
    ls2 = subprocess.run(cli + ["cache", "ls", "--cache-dir", env_cache], capture_output=True, text=True, check=True)
    assert "imported:blip2" not in ls2.stdout and "imported:qwen" in ls2.stdout and "text_features" in ls2.stdout


def _fake_run(runs_dir, run_id, stage, key):
    import json

    d = runs_dir / run_id
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"cache_keys": {stage: key}}))


def test_gc_keeps_runs_of_the_runs_folder_in_effect_and_of_keep_runs(tmp_path, small_source):
    """gc reads one runs folder (--runs-dir / RUNS_DIR) plus each --keep-runs folder, nothing else."""
    from camim.gc import collect, live_keys

    _, caps, _ = _run(tmp_path, small_source, "imported:qwen,imported:blip2")
    blip_key = caps[1].cache.key
    runs, other = tmp_path / "runs", tmp_path / "elsewhere"
    _fake_run(other, "r1", "captions", blip_key)
    s = Settings(cache_dir=tmp_path / "cache", source=str(small_source), mllm="imported:qwen", runs_dir=runs)
    assert ("captions", blip_key) not in live_keys(s, True)
    assert ("captions", blip_key) in live_keys(s, True, [other])
    s_other = Settings(cache_dir=tmp_path / "cache", source=str(small_source), mllm="imported:qwen", runs_dir=other)
    assert ("captions", blip_key) in live_keys(s_other, True)
    collect(s, True, yes=True, extra_runs=[other])
    assert (tmp_path / "cache" / "captions" / blip_key).is_dir()
    with pytest.raises(Exception, match="no such folder"):
        collect(s, True, yes=False, extra_runs=[tmp_path / "nope"])


def test_a_run_id_with_a_path_is_an_error(tmp_path):
    from typer.testing import CliRunner

    from camim.cli import app

    r = CliRunner().invoke(app, ["train", "--run", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2 and "is a run id, not a path" in r.output


def test_suite_env_is_hermetic(hermetic):
    """The shell's CLI variables are cleared and the default folders are this test's own."""
    import os

    from pipeline.config import Settings as S
    from tests.helpers import cli_env_vars

    assert "MLLM" in cli_env_vars() and "MNRE_SOURCE" in cli_env_vars()
    assert not any(os.environ.get(v) for v in cli_env_vars() - {"CACHE_DIR", "RUNS_DIR", "REPORTS_DIR"})
    s = S()
    assert s.cache_dir == hermetic / "cache" and s.runs_dir == hermetic / "runs" and s.reports_dir == hermetic / "reports"
