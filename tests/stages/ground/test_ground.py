"""Grounding: box hygiene, the imported HVPNeT/TMR index, and tiny OWLv2 / Grounding DINO."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from camim.cli import app
from stages.ground.boxes import clean_boxes, cut


def ground_rows(cache: Path) -> list[dict]:
    entries = sorted((cache / "ground").iterdir())
    assert len(entries) == 1, entries
    rows = []
    for p in sorted((entries[0] / "parts").glob("part-*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def run_cli(*args) -> str:
    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_clean_boxes_clamps_drops_dedups_and_spreads_over_queries():
    cands = [
        {"box": [-48, 64, 48, 64], "score": 0.99, "query": "a"},      # zero height: dropped
        {"box": [10, 10, 50, 50], "score": 0.9, "query": "a"},
        {"box": [11, 10, 50, 51], "score": 0.85, "query": "a"},       # duplicate of the one above
        {"box": [60, -20, 300, 90], "score": 0.5, "query": "b"},      # clamped to 100x80
        {"box": [0, 0, 20, 30], "score": 0.8, "query": "a"},
        {"box": [float("nan"), 0, 5, 5], "score": 0.7, "query": "c"},  # not finite: dropped
        {"box": [70, 70, 10, 10], "score": 0.3, "query": "c"},        # corners swapped: fixed
    ]
    kept, dropped = clean_boxes(cands, width=100, height=80, m=3)
    # best box of each query first (a, b, c), then the rest by score
    assert [k["query"] for k in kept] == ["a", "b", "c"]
    assert kept[1]["box"] == [60.0, 0.0, 100.0, 80.0]
    assert kept[2]["box"] == [10.0, 10.0, 70.0, 70.0]
    assert dropped == 2  # the zero-height and the NaN box; the duplicate was never reached
    kept, dropped = clean_boxes(cands, width=100, height=80, m=5)
    assert len(kept) == 4 and dropped == 3  # now the duplicate is reached and dropped
    assert all(0 <= k["box"][0] < k["box"][2] <= 100 and 0 <= k["box"][1] < k["box"][3] <= 80 for k in kept)


def test_cut_makes_224_png(photos):
    im = Image.open(photos[0]).convert("RGB")
    data, sha = cut(im, [10.2, 20.7, 100.0, 60.0])
    import hashlib
    import io

    assert hashlib.sha256(data).hexdigest() == sha
    crop = Image.open(io.BytesIO(data))
    assert crop.size == (224, 224) and crop.format == "PNG"


def test_imported_grounding_reads_the_real_index(visual_source, tmp_path):
    src = visual_source
    cache = tmp_path / "cache"
    out = run_cli("ground", "--cache-dir", str(cache), "--image-dir", str(src["images"]), "--ground", "imported",
                  "--crop-dir", str(src["crops"]), "--trans-dir", str(src["trans"]))
    assert "trans" in out and "with fewer than 3" in out
    rows = {(r["view"], r["sample_id"]): r for r in ground_rows(cache)}
    vg = src["vg"]
    r0 = rows[("image", "val-00000")]
    assert r0["ok"] and r0["n_crops"] == min(3, len(vg["0"]))
    assert [Path(f).name for f in r0["crop_files"]] == vg["0"][:3]
    assert all(Path(f).is_file() for f in r0["crop_files"])
    assert r0["short"] == (len(vg["0"]) < 3)
    r2 = rows[("image", "val-00002")]
    assert src["missing"] in r2["missing"] and r2["n_crops"] == min(3, len(vg["2"]) - 1)
    r5 = rows[("image", "val-00005")]
    assert src["corrupt"] in r5["missing"]
    # samples whose crops are not in the folder: recorded as having none, never padded
    r9 = rows[("image", "val-00009")]
    assert r9["n_crops"] == 0 and r9["short"] and r9["crop_keys"] == []
    # translation view: boxes of diffusion_boxes_val.json, clamped to the 768x768 image, cut at 224x224
    dif = json.loads((Path(__file__).resolve().parents[3] / "data/sample/mnre/tmr_aux/diffusion_boxes_val.json").read_text())
    trans = [r for r in rows.values() if r["view"] == "trans"]
    assert sorted(r["sample_id"] for r in trans) == [f"val-0000{i}" for i in range(4)]
    for r in trans:
        want = [b for b in dif[str(int(r["sample_id"][-5:]))] if b[2] - b[0] >= 2 and b[3] - b[1] >= 2][:3]
        assert r["n_crops"] == len(want)
        for got, b in zip(r["boxes"], want):
            assert got == pytest.approx([min(max(v, 0), 768) for v in b], abs=1e-3)
        for f in r["crop_files"]:
            assert Image.open(cache / f).size == (224, 224)
    # a second run is fully cached
    out2 = run_cli("ground", "--cache-dir", str(cache), "--image-dir", str(src["images"]), "--ground", "imported",
                   "--crop-dir", str(src["crops"]), "--trans-dir", str(src["trans"]))
    assert " 0 new" in out2


def test_imported_grounding_without_crops_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["ground", "--cache-dir", str(tmp_path), "--ground", "imported"])
    assert res.exit_code == 2
    assert "nothing to read" in res.output


@pytest.mark.parametrize("model", ["tiny_owlv2", "tiny_grounding_dino"])
def test_detector_grounding_tiny_models(model, request, visual_source, tmp_path):
    path = request.getfixturevalue(model)
    src = visual_source
    cache = tmp_path / "cache"
    run_cli("ground", "--cache-dir", str(cache), "--image-dir", str(src["images"]), "--ground", f"detector:{path}",
            "--trans-dir", str(src["trans"]))
    rows = ground_rows(cache)
    ok = [r for r in rows if r["ok"]]
    bad = [r for r in rows if not r["ok"]]
    # 6 real photos and 4 translation images detected on; every other record has no image: recorded, not fatal
    assert len([r for r in ok if r["view"] == "image"]) == 6
    assert len([r for r in ok if r["view"] == "trans"]) == 4
    assert bad and all("missing image" in r["error"] for r in bad)
    for r in ok:
        rec = next(x for x in src["records"] if f"val-{src['records'].index(x):05d}" == r["sample_id"])
        assert r["queries"][:1] == [rec["h"]["name"].lstrip("@#").replace("_", " ")]
        assert 0 <= r["n_crops"] <= 3 and r["short"] == (r["n_crops"] < 3)
        assert len(r["boxes"]) == len(r["scores"]) == len(r["labels"]) == len(r["crop_files"]) == r["n_crops"]
        for (x1, y1, x2, y2) in r["boxes"]:
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
            assert x2 - x1 >= 2 and y2 - y1 >= 2
        for f in r["crop_files"]:
            assert Image.open(cache / f).size == (224, 224)
    assert sum(r["n_crops"] for r in ok) >= 3
    if model == "tiny_owlv2":  # random OWL heads propose degenerate boxes: dropped, the rest become crops
        assert sum(r["dropped"] for r in ok) > 0
