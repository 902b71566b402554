"""Every file opened from an index, a record or a link stays inside its configured folder."""

import json
import os
import shutil

from typer.testing import CliRunner

from camim.cli import app
from tests.visual_fixtures import SAMPLE

from .test_ground import ground_rows


def test_crop_index_entries_outside_the_crop_folder_are_refused(visual_source, tmp_path):
    src = visual_source
    index = tmp_path / "index"
    shutil.copytree(SAMPLE / "tmr_aux", index)
    vg = json.loads((index / "img_vg_crops_val.json").read_text())
    (src["root"] / "outside.png").write_bytes((src["crops"] / "val" / "crops" / vg["0"][0]).read_bytes())
    vg["0"] = ["/etc/passwd"]
    vg["1"] = ["../../../outside.png"]
    (index / "img_vg_crops_val.json").write_text(json.dumps(vg))
    cache = tmp_path / "cache"
    res = CliRunner().invoke(app, ["ground", "--cache-dir", str(cache), "--image-dir", str(src["images"]), "--ground", "imported",
                                   "--crop-dir", str(src["crops"]), "--crop-index", str(index)])
    assert res.exit_code == 0, res.output
    rows = {(r["view"], r["sample_id"]): r for r in ground_rows(cache)}
    for sid, entry in (("val-00000", "/etc/passwd"), ("val-00001", "../../../outside.png")):
        r = rows[("image", sid)]
        assert not r["ok"] and "refused" in r["error"] and repr(entry) in r["error"] and "outside the folder" in r["error"]
    assert rows[("image", "val-00002")]["ok"]


def test_a_link_out_of_the_images_folder_is_never_read(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos[0], folder / "a.jpg")
    outside = tmp_path / "secret.jpg"
    shutil.copy(photos[1], outside)
    os.symlink(outside, folder / "b.jpg")
    args = ["data", "--task", "images", "--source", str(folder), "--cache-dir", str(tmp_path / "c")]
    stop = CliRunner().invoke(app, args)
    assert stop.exit_code == 2 and "b.jpg" in stop.output and "outside the folder" in stop.output
    skip = CliRunner().invoke(app, args + ["--on-error", "skip"])
    assert skip.exit_code == 0, skip.output
    assert "1 records" in skip.output


def test_an_image_dir_link_out_is_refused_naming_the_line(tmp_path, small_source, photos):
    import ast

    images = tmp_path / "images"
    images.mkdir()
    first = ast.literal_eval((small_source / "mnre_train.txt").read_text().splitlines()[0])["img_id"]
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(photos[0], outside)
    os.symlink(outside, images / first)
    res = CliRunner().invoke(app, ["data", "--source", str(small_source), "--image-dir", str(images), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2 and "mnre_train.txt:1" in res.output and "outside the folder" in res.output
