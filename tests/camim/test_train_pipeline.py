"""Trainer, eval and report on the bundled real sample, with a tiny random text encoder.

Features are cached first; training, eval and the report then run with every
transformers model loader made to raise: the train stage never runs an encoder.
"""

import json

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import Settings, load_profile, merge
from tests.helpers import save_tiny_bert

FAST = {"epochs": 2, "hidden": 16, "heads": 2, "text_layers": 1, "lr": 3e-3, "eval_batch_size": 64}


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=1)


@pytest.fixture(scope="module")
def env(tiny_text_model, tmp_path_factory):
    """Settings over a temp cache/runs/reports, with sentence + caption features cached."""
    from camim import chain

    root = tmp_path_factory.mktemp("camim")
    conf = merge(load_profile("offline"), {"text": {"model": str(tiny_text_model), "batch_size": 128, "cut": 0}, "train": FAST})
    s = Settings(cache_dir=root / "cache", conf=conf, runs_dir=root / "runs", reports_dir=root / "reports")
    chain.features(s, ["none", "imported:qwen"])
    return s


@pytest.fixture
def no_encoder(monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("the train stage must never load an encoder")

    for name in ("AutoModel", "AutoTokenizer", "BertModel", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", boom)


def test_train_writes_a_complete_run_without_any_encoder(env, no_encoder):
    from camim.graph import inputs_for
    from stages.train.trainer import eval_run, run_settings
    from tests.helpers import train

    res = train(env, "imported:qwen", 7)
    d = res.dir
    m = json.loads((d / "metrics.json").read_text())
    for split in ("val", "test"):
        for k in ("acc", "precision", "recall", "f1"):
            assert 0.0 <= m[split][k] <= 1.0
        assert m[split]["n"] == 100
    assert m["modalities"]["caption"] == "imported:qwen" and m["modalities"]["image"] is False
    assert 20 < m["modalities"]["caption_len_words"] < 40
    assert 1 <= m["best_epoch"] <= FAST["epochs"] and len(m["history"]) == FAST["epochs"]
    cfg = json.loads((d / "config.json").read_text())
    assert set(cfg["cache_keys"]) >= {"data", "captions", "text_features"}
    preds = pq.read_table(d / "predictions.parquet").to_pylist()
    assert len(preds) == 200 and {p["split"] for p in preds} == {"val", "test"}
    test_preds = [p for p in preds if p["split"] == "test"]
    acc = sum(p["gold"] == p["pred"] for p in test_preds) / len(test_preds)
    assert acc == pytest.approx(m["test"]["acc"])
    # eval re-scores the saved checkpoint to the same numbers
    run_dir, cfg, s2 = run_settings(env, res.run_id)
    again = eval_run(s2, run_dir, cfg, inputs_for(s2, cfg["mllm"]))
    assert again["test"]["f1"] == pytest.approx(m["test"]["f1"]) and again["test"]["acc"] == pytest.approx(m["test"]["acc"])
    # same config again: reused, not retrained
    assert train(env, "imported:qwen", 7).reused


def test_seeded_runs_repeat_and_seeds_differ(env, no_encoder):
    from tests.helpers import train

    over = {"epochs": 1}
    a = train(env, "none", 3, over, run_id="rep-a")
    b = train(env, "none", 3, over, run_id="rep-b")
    c = train(env, "none", 4, over, run_id="rep-c")
    assert a.metrics["history"][0]["loss"] == pytest.approx(b.metrics["history"][0]["loss"], rel=1e-4)
    assert a.metrics["history"][0]["loss"] != pytest.approx(c.metrics["history"][0]["loss"], rel=1e-6)
    assert a.metrics["modalities"]["caption"] is None


def test_a_registered_stream_reaches_the_head(env, no_encoder):
    from stages.train import STREAMS
    from tests.helpers import train

    def fake_images(settings, records, inputs):
        g = torch.Generator().manual_seed(0)
        n = len(records)
        return {"img_vec": torch.randn(n, 8, generator=g), "has_img": torch.arange(n) % 3 != 0,
                "obj_vec": torch.randn(n, 3, 8, generator=g), "obj_mask": torch.rand(n, 3, generator=g) > 0.4,
                "__cache_key__": "fake"}

    STREAMS.add("fake", fake_images)
    try:
        res = train(env, "none", 1, {"epochs": 1}, run_id="with-images")
    finally:
        STREAMS._entries.pop("fake")
    assert res.metrics["modalities"]["image"] is True and res.metrics["modalities"]["objects"] is True
    assert res.config["dims"]["img_vec"] == 8 and res.config["cache_keys"]["stream:fake"] == "fake"


def test_report_writes_table_chart_and_configs(env, no_encoder):
    from camim.graph import resolver
    from stages.report import run_report

    sources = ["none", "imported:qwen"]
    out = run_report(env, sources, resolver(env, sources), [1, 2], {"epochs": 1}, name="t")
    md = out["paths"]["md"].read_text()
    assert "| MLLM | CapLen | Acc | P | R | F1 |" in md and "QwenVL-Plus" in md and "text_features" in md
    assert out["paths"]["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in out["paths"]["html"].read_text()
    rows = {r["source"]: r for r in out["rows"]}
    assert rows["none"]["captions"] == 0 and 20 < rows["imported:qwen"]["caplen"] < 40
    # the HTML page in a real browser: it loads, shows the table and the chart, and logs no error
    from camim.browser import check_page, find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium here (.ci/run installs it: apt-get install chromium)")
    page = check_page(out["paths"]["html"], out["paths"]["html"].with_suffix(".screenshot.png"))
    assert page["errors"] == [], page["errors"]
    assert page["tables"] >= 1 and page["title"] == "t"
    assert [src for src, width in page["images"] if width > 100] == ["t.png"]  # the chart decoded
    shot = out["paths"]["html"].with_suffix(".screenshot.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    assert len(rows["imported:qwen"]["runs"]) == 2
    # the test against none, over both seeds and the test items, fills the significance columns
    sig = rows["imported:qwen"]["significance"]
    assert sig["n_seeds"] == 2 and sig["n_items"] == sum(1 for r in env_records(env) if r["split"] == "test")
    assert sig["ci_low"] <= sig["delta_f1"] <= sig["ci_high"] and 0 < sig["p_value"] <= 1
    assert sig["family"] == 1 and sig["p_holm"] == sig["p_value"]  # one source against none: nothing to adjust
    assert "p (Holm)" in md
    # what a "no" can rule out: the gain this test would find 4 times in 5 (none when nothing varies)
    from stages.report.significance import detectable

    assert sig["mde"] == pytest.approx(detectable(sig["se"], df=sig["df"] or float("inf"))) and "| detectable |" in md
    assert (f"±{sig['mde'] * 100:.2f}" if sig["se"] > 0 else "n/a (no spread)") in md
    assert "95% CI" in md and "pooled over every row of the report" in md
    # what the comparison cost: 4 runs, all trained here, and their summed wall time
    meta = out["meta"]
    assert meta["runs"] == 4 and meta["runs_reused"] == 0
    assert meta["runs_wall_s"] == pytest.approx(sum(json.loads((env.runs_dir / run / "metrics.json").read_text())["wall_s"]
                                                   for r in out["rows"] for run in r["runs"]), rel=1e-6)
    assert "Training: 4 run(s)" in md and "min/run" in md
    tex = out["paths"]["tex"].read_text()
    assert "\\toprule" in tex and "QwenVL-Plus" in tex and "\\pm" in tex


def test_an_unseen_caption_folder_goes_through_the_report_with_no_code_change(env, tmp_path):
    """``imported:<folder of CAMIM-format files>`` from a captioner no one has registered: captions,
    features (the only step that loads the encoder), training and the report's significance columns."""
    from camim.graph import resolver
    from stages.report import run_report
    from tests.conftest import SAMPLE

    shipped = SAMPLE / "camim_captions"
    folder = tmp_path / "my-new-captioner"
    folder.mkdir()
    for split in ("train", "val", "test"):  # another MLLM's captions under a name no code knows
        (folder / f"mymllm_{split}.txt").write_text((shipped / f"blip2_{split}.txt").read_text())
    src = f"imported:{folder}"
    out = run_report(env, ["none", src], resolver(env, ["none", src]), [1], {"epochs": 1}, name="unseen")
    rows = {r["source"]: r for r in out["rows"]}
    assert rows[src]["captions"] > 0 and 5 < rows[src]["caplen"] < 30  # BLIP-2 captions are short
    sig = rows[src]["significance"]
    assert sig["n_seeds"] == 1 and sig["ci_low"] <= sig["delta_f1"] <= sig["ci_high"]
    assert "my-new-captioner" in out["paths"]["md"].read_text()


def env_records(s):
    from stages.data import prepare

    return prepare(s).records.to_pylist()


def test_eval_of_a_missing_run_is_a_clear_error(env):
    from typer.testing import CliRunner

    from camim.cli import app

    r = CliRunner().invoke(app, ["eval", "--run", "no-such-run", "--cache-dir", str(env.cache_dir)])
    assert r.exit_code == 2 and "not a finished run" in r.output
