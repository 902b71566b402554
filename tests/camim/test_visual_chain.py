"""The whole chain on real photos and generated images:
data → captions → ground → features (text + image) → the train stage's batches and
the CAM head with every image stream present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from camim.cli import app
from pipeline.config import Settings
from tests.visual_fixtures import SAMPLE

N = 6  # records per split: the first six val lines of the bundled sample, in every split


@pytest.fixture(scope="module")
def tiny_source(visual_source, tmp_path_factory) -> Path:
    """An MNRE-format source whose three splits each hold the sample's first six val
    lines, with the matching slice of the real crop index in ``tmr_aux``."""
    src = tmp_path_factory.mktemp("src")
    lines = (SAMPLE / "mnre_val.txt").read_text().splitlines()[:N]
    for split in ("train", "val", "test"):
        (src / f"mnre_{split}.txt").write_text("\n".join(lines) + "\n")
    shutil.copy(SAMPLE / "ours_rel2id.json", src)
    (src / "tmr_aux").mkdir()
    for pre in ("img_vg_crops", "diffusion_boxes", "phrase_text"):
        full = json.loads((SAMPLE / "tmr_aux" / f"{pre}_val.json").read_text())
        part = {str(i): full[str(i)] for i in range(N) if str(i) in full}
        for split in ("train", "val", "test"):
            (src / "tmr_aux" / f"{pre}_{split}.json").write_text(json.dumps(part))
    # translation images for every split (the fixture made them for val)
    for split in ("train", "test"):
        shutil.copytree(visual_source["trans"] / "val", visual_source["trans"] / split, dirs_exist_ok=True)
    return src


def test_features_then_train_batches_carry_every_image_stream(visual_source, tiny_source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    crops_flat = visual_source["crops"] / "val" / "crops"  # a flat crop folder serves every split
    args = ["--cache-dir", str(cache), "--source", str(tiny_source), "--image-dir", str(visual_source["images"]), "--mllm", "none"]
    res = CliRunner().invoke(app, ["ground", *args[:6], "--crop-dir", str(crops_flat), "--trans-dir", str(visual_source["trans"])],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("CROP_DIR", str(crops_flat))
    monkeypatch.setenv("TRANS_DIR", str(visual_source["trans"]))
    res = CliRunner().invoke(app, ["features", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "image streams:" in res.output and "image_features" in res.output

    from camim.graph import inputs_for
    from stages.train import HEADS
    from stages.train.data import build_re_data

    # the environment reaches commands through their options; Python callers name the same settings
    settings = Settings(cache_dir=cache, source=str(tiny_source), image_dir=str(visual_source["images"]), mllm="none",
                        crop_dir=str(crops_flat), trans_dir=str(visual_source["trans"]))
    data = build_re_data(settings, "none", inputs_for(settings, "none"))
    mods = data.modalities
    assert mods["image"] and mods["objects"] and mods["translation_image"] and mods["translation_objects"]
    s = data.streams
    n = 3 * N
    # every record's image is one of the six photos; samples 0-3 have a translation image
    assert s["has_img"].tolist() == [True] * n
    assert s["has_trans"].tolist() == [i % N < 4 for i in range(n)]
    # objects: the real index's first three crops, minus the missing and the corrupt file, never padded
    vg = visual_source["vg"]
    want = []
    for i in range(N):
        names = [x for x in vg[str(i)] if x not in (visual_source["missing"], visual_source["corrupt"])][:3]
        want.append(len(names))
    assert s["obj_mask"].sum(1).tolist() == want * 3
    assert s["obj_vec"].shape == (n, 3, 1280)
    assert bool((s["obj_vec"][~s["obj_mask"]] == 0).all())
    assert bool((s["obj_vec"][s["obj_mask"]].abs().sum(-1) > 0).all())
    assert s["trans_obj_mask"][s["has_trans"]].any(1).all()
    assert not s["trans_obj_mask"][~s["has_trans"]].any()
    # two samples sharing an image get the same vector; different photos differ
    assert not torch.equal(s["img_vec"][0], s["img_vec"][1])
    assert any(k.startswith("stream:image") for k in data.cache_keys)

    # the CAM head takes the batch with all four image streams and trains
    batch = data.batch(data.splits["train"])
    for k in ("img_vec", "obj_vec", "obj_mask", "trans_vec", "trans_obj_vec", "trans_obj_mask"):
        assert k in batch
    dims = {k: v.shape[-1] for k, v in batch.items() if torch.is_tensor(v) and v.is_floating_point()}
    torch.manual_seed(0)
    head = HEADS.get("cam")(dims, len(data.labels), {"hidden": 32, "heads": 2})
    out = head(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert head.vis["obj_vec"][0].weight.grad.abs().sum() > 0
    assert head.vis["trans_vec"][0].weight.grad.abs().sum() > 0

    # the trainer: one epoch on cached features; its metrics file lists the image streams as present
    from stages.train.trainer import train_one

    res = train_one(settings, "none", 1, {"epochs": 1, "hidden": 32, "heads": 2, "batch_size": 4}, data=data, quiet=True)
    metrics = json.loads((res.dir / "metrics.json").read_text())
    m = metrics["modalities"]
    assert m["image"] and m["objects"] and m["translation_image"] and m["translation_objects"]
    assert 0.0 <= metrics["test"]["f1"] <= 1.0

    # cache gc keeps every visual entry that this run recorded or the settings reach
    from camim.gc import live_keys

    live = live_keys(Settings(cache_dir=cache, source=str(tiny_source), mllm="none", runs_dir=settings.runs_dir), explicit_mllm=True)
    for stage in ("ground", "image_features", "image_streams"):
        on_disk = {p.name for p in (cache / stage).iterdir() if p.is_dir()}
        assert on_disk and on_disk <= {k for s_, k in live if s_ == stage}, stage


def test_make_train_sees_the_image_streams(visual_source, tiny_source, tmp_path, monkeypatch):
    """`camim train` with the same IMAGE_DIR / CROP_DIR / TRANS_DIR as `camim features`."""
    monkeypatch.setenv("CROP_DIR", str(visual_source["crops"] / "val" / "crops"))
    monkeypatch.setenv("TRANS_DIR", str(visual_source["trans"]))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    args = ["--cache-dir", str(tmp_path / "cache"), "--source", str(tiny_source), "--image-dir", str(visual_source["images"]), "--mllm", "none"]
    import stages.features.visual as visual
    import stages.ground as ground

    calls = {"ground": 0, "image": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(ground, "run_grounding", counted("ground", ground.run_grounding))
    monkeypatch.setattr(visual, "run_image_features", counted("image", visual.run_image_features))
    res = CliRunner().invoke(app, ["train", *args, "--epochs", "1", "--opt", "hidden=32", "--opt", "heads=2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert calls == {"ground": 1, "image": 1}  # one train runs each visual stage once
    assert res.output.count("image streams:") == 1
    (metrics,) = list((tmp_path / "runs").glob("*/metrics.json"))
    m = json.loads(metrics.read_text())["modalities"]
    assert m["image"] and m["objects"] and m["translation_image"] and m["translation_objects"]
