"""UMRE reader (text entities and [OBJk] objects) and the object streams of its batch."""

import shutil

import pytest
import torch

from pipeline.config import Settings
from pipeline.errors import InputError
from stages.data import prepare
from stages.data.umre import SAMPLE, read_boxes


def test_sample_reads_every_pair_type(tmp_path):
    ds = prepare(Settings(task="umre", cache_dir=tmp_path / "c"))
    recs = ds.records.to_pylist()
    assert {r["pair"] for r in recs} == {"text-text", "text-object", "object-text", "object-object"}
    for r in recs:
        for role in ("h", "t"):
            k = r[f"{role}_obj"]
            if k >= 0:
                assert r["obj_names"][k] == r[f"{role}_name"] and r[f"{role}_start"] == r[f"{role}_end"] == 0
            else:
                assert " ".join(r["tokens"][r[f"{role}_start"]:r[f"{role}_end"]]) == r[f"{role}_name"]
        assert len(r["obj_boxes"]) == len(r["obj_names"]) <= 12
        assert r["image_path"] and r["image_path"].endswith(r["img_id"])  # the sample's images are the default


def copy_sample(tmp_path):
    dst = tmp_path / "umre"
    shutil.copytree(SAMPLE, dst, ignore=shutil.ignore_patterns("images"))
    return dst


@pytest.mark.parametrize("line,what", [
    ("{'token': ['a', 'b'], 'h': {'name': '[OBJ9]', 'pos': [0, 0, 1, 1]}, 't': {'name': 'a', 'pos': [0, 1]}"
     ", 'img_id': 'horse.jpg', 'relation': 'none'}", "no box"),
    ("{'token': ['a', 'b'], 'h': {'name': 'x', 'pos': [0, 0, 1, 1]}, 't': {'name': 'a', 'pos': [0, 1]}"
     ", 'img_id': 'horse.jpg', 'relation': 'none'}", "not [OBJk]"),
    ("{'token': ['a', 'b'], 'h': {'name': 'b', 'pos': [0, 1]}, 't': {'name': 'a', 'pos': [0, 1]}"
     ", 'img_id': 'horse.jpg', 'relation': 'none'}", "does not match"),
    ("{'token': ['a', 'b'], 'h': {'name': 'a', 'pos': [0, 1]}, 't': {'name': 'b', 'pos': [1, 2]}"
     ", 'img_id': 'horse.jpg', 'relation': 'couple'}", "unknown relation"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, what):
    src = copy_sample(tmp_path)
    lines = (src / "val_set.json").read_text().splitlines()
    lines[2] = line
    (src / "val_set.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        prepare(Settings(task="umre", source=str(src), cache_dir=tmp_path / "c"))
    assert "val_set.json:3" in str(e.value) and what in str(e.value)


def test_box_file_is_validated(tmp_path):
    p = tmp_path / "pos_umke.json"
    p.write_text('{"a.jpg": {"[OBJ1]": [0.1, 0.2, 0.5, 0.6], "[OBJ0]": [-0.01, 0, 0.3, 1.02]}}')
    boxes = read_boxes(p)
    assert list(boxes["a.jpg"]) == ["[OBJ0]", "[OBJ1]"] and boxes["a.jpg"]["[OBJ0]"] == [0.0, 0.0, 0.3, 1.0]
    p.write_text('{"a.jpg": {"[OBJ0]": [0.5, 0.2, 0.5, 0.6]}}')
    with pytest.raises(InputError, match="empty box"):
        read_boxes(p)


def test_object_streams_from_crops_and_boxes(tmp_path):
    from camim.graph import inputs_for
    from stages.train.umre import SLOTS, build_umre_data

    src = tmp_path / "small"
    shutil.copytree(SAMPLE, src)
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        lines = (src / f"{split}_set.json").read_text().splitlines()
        keep = [ln for ln in lines if "'[OBJ" in ln.split("'t'")[0]][:2] + lines[:n]  # an object head is among them
        (src / f"{split}_set.json").write_text("\n".join(keep) + "\n")
    s = Settings(task="umre", source=str(src), cache_dir=tmp_path / "c", mllm="none")
    data = build_umre_data(s, "none", inputs_for(s, "none"))
    assert data.modalities["objects"]["object_crops"] == data.modalities["objects"]["objects"] > 0
    assert data.dims["obj_vec"] == 1280  # EfficientNet-Lite0 pooled crop features
    i = next(i for i, r in enumerate(data.records) if r["pair"] == "object-text")
    b = data.batch(torch.tensor([i]))
    r = data.records[i]
    k = r["h_obj"]
    assert b["h_obj"].tolist() == [k] and b["t_obj"].tolist() == [-1]
    assert b["obj_mask"][0].sum() == len(r["obj_boxes"]) and b["obj_vec"].shape == (1, SLOTS, 1280)
    assert torch.allclose(b["obj_box"][0, k], torch.tensor(r["obj_boxes"][k]))
    assert b["obj_vec"][0, k].abs().sum() > 0 and (b["obj_vec"][0, len(r["obj_boxes"]):] == 0).all()
    # two different boxes of one image give different crop features
    assert not torch.allclose(b["obj_vec"][0, 0], b["obj_vec"][0, 1])
    from stages.train import HEADS

    head = HEADS.get("remote")(data.dims, len(data.labels), {"d": 32, "heads": 2})
    out = head(data.batch(data.splits["train"][:8]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
