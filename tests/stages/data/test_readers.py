"""The MNRE and caption readers on real sample lines and on a corpus of broken ones."""

import json

import pytest

from pipeline.errors import InputError, PipelineError
from stages.data.readers import check_image_name, read_captions, read_mnre, read_rel2id


@pytest.fixture
def rel2id(sample_dir):
    return read_rel2id(sample_dir / "ours_rel2id.json")


def test_real_sample_parses(sample_dir, rel2id):
    assert len(rel2id) == 23 and rel2id["None"] == 0
    res = read_mnre(sample_dir / "mnre_train.txt", "train", rel2id)
    assert len(res.rows) == 300 and not res.skipped
    first = res.rows[0]
    assert first["tokens"][first["h_start"] : first["h_end"]] == first["h_name"].split(" ")
    assert first["sample_id"] == "train-00000" and first["idx"] == 0
    assert {r["label"] for r in res.rows} >= {"None", "/per/per/peer"}


GOOD = ("{'token': ['Bill', 'Cosby', 'in', 'LA'], 'h': {'name': 'Bill Cosby', 'pos': [0, 2]}, 't': {'name': 'LA', 'pos': [3, 4]}, "
        "'img_id': 'a.jpg', 'relation': '/per/loc/place_of_residence'}")

BROKEN = [
    ("{'token': ['a'", "not a Python dict literal"),
    ("__import__('os').system('true')", "not a Python dict literal"),
    ("['not', 'a', 'dict']", "expected a dict"),
    (GOOD.replace("'relation': '/per/loc/place_of_residence'", "'relation': '/per/per/bestie'"), "unknown relation"),
    (GOOD.replace("'pos': [3, 4]", "'pos': [3, 9]"), "outside the sentence"),
    (GOOD.replace("'pos': [3, 4]", "'pos': [4, 3]"), "is reversed: the start must come before the end"),
    (GOOD.replace("'pos': [3, 4]", "'pos': [3, 3]"), "is an empty span"),
    (GOOD.replace("'name': 'LA'", "'name': 'NYC'"), "does not match"),
    (GOOD.replace("'a.jpg'", "'../../etc/passwd'"), "leaves the image folder"),
    (GOOD.replace("'a.jpg'", "'/etc/passwd'"), "absolute path"),
    (GOOD.replace("'a.jpg'", "''"), "non-empty string"),
    (GOOD.replace(", 'img_id': 'a.jpg'", ""), "missing key(s): img_id"),
    (GOOD.replace("'token': ['Bill', 'Cosby', 'in', 'LA']", "'token': []"), "non-empty list"),
    (GOOD.replace("'pos': [0, 2]", "'pos': [0, 'x']"), "integers"),
]


@pytest.mark.parametrize("line,message", BROKEN)
def test_broken_line_names_file_and_line(tmp_path, rel2id, line, message):
    f = tmp_path / "bad.txt"
    f.write_text(GOOD + "\n\n" + line + "\n" + GOOD + "\n")
    with pytest.raises(InputError) as err:
        read_mnre(f, "train", rel2id)
    assert err.value.where == f"{f}:3"
    assert message in err.value.what


def test_skip_mode_records_skipped_lines(tmp_path, rel2id):
    f = tmp_path / "bad.txt"
    f.write_text("\n".join([GOOD, BROKEN[0][0], GOOD, BROKEN[3][0]]) + "\n")
    res = read_mnre(f, "val", rel2id, on_error="skip")
    assert [r["line"] for r in res.rows] == [1, 3]
    assert [s["line"] for s in res.skipped] == [2, 4]
    assert "unknown relation" in res.skipped[1]["error"]
    # sample indices stay aligned with line positions (the TMR side files' keys)
    assert [r["idx"] for r in res.rows] == [0, 2]


def test_rel2id_errors(tmp_path):
    f = tmp_path / "r.json"
    f.write_text('{"None": 0, "a": 2}')
    with pytest.raises(InputError, match="0..N-1"):
        read_rel2id(f)
    f.write_text('{"None": 0,\n oops}')
    with pytest.raises(InputError, match=r"r.json:2"):
        read_rel2id(f)
    with pytest.raises(PipelineError, match="not found"):
        read_rel2id(tmp_path / "missing.json")


def test_caption_formats(tmp_path, sample_dir):
    real = read_captions(sample_dir / "camim_captions" / "qwen_val.txt")
    assert len(real.rows) == 100 and all(r["caption"] for r in real.rows)
    j = tmp_path / "caps.json"
    j.write_text(json.dumps({"x": "a dog", "y.jpg": "a cat"}))
    rows = read_captions(j).rows
    assert {(r["img_id"], r["caption"]) for r in rows} == {("x", "a dog"), ("y.jpg", "a cat")}
    bad = tmp_path / "caps.txt"
    bad.write_text("{'img_id': 'a.jpg', 'text': 'ok'}\n{'img_id': 'b.jpg'}\n")
    with pytest.raises(InputError, match=r"caps.txt:2: expected keys"):
        read_captions(bad)
    assert len(read_captions(bad, on_error="skip").skipped) == 1


@pytest.mark.parametrize("name,ok", [("x.jpg", True), ("sub/x.jpg", True), ("../x.jpg", False), ("a/../../x", False),
                                     ("/abs.jpg", False), ("C:\\x.jpg", False), ("", False), (3, False)])
def test_image_name_confinement(name, ok):
    assert (check_image_name(name) is None) == ok


def test_a_line_with_bad_bytes_names_its_line_and_can_be_skipped(tmp_path, rel2id):
    f = tmp_path / "bytes.txt"
    f.write_bytes((GOOD + "\n").encode() + b"{'token': ['caf\xe9']}\n" + (GOOD + "\n").encode())
    with pytest.raises(InputError) as err:
        read_mnre(f, "train", rel2id)
    assert err.value.where == f"{f}:2" and "not UTF-8" in err.value.what and "column" in err.value.what
    res = read_mnre(f, "train", rel2id, on_error="skip")
    assert [r["line"] for r in res.rows] == [1, 3] and res.skipped[0]["line"] == 2


def test_a_bom_is_accepted(tmp_path, rel2id):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n" + GOOD + "\n").encode())
    assert len(read_mnre(f, "train", rel2id).rows) == 2
    caps = tmp_path / "caps.txt"
    caps.write_bytes(b"\xef\xbb\xbf{'img_id': 'a.jpg', 'text': 'a man'}\r\n{'img_id': 'b.jpg', 'text': 'a dog'}\r\n")
    assert [r["caption"] for r in read_captions(caps).rows] == ["a man", "a dog"]
    js = tmp_path / "caps.json"
    js.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a.jpg": "a man"}).encode())
    assert read_captions(js).rows[0]["caption"] == "a man"


def test_caption_lines_with_bad_bytes_are_per_line(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_bytes(b"{'img_id': 'a.jpg', 'text': 'a man'}\n{'img_id': 'b.jpg', 'text': 'caf\xe9'}\n")
    with pytest.raises(InputError) as err:
        read_captions(caps)
    assert err.value.where == f"{caps}:2"
    res = read_captions(caps, on_error="skip")
    assert [r["img_id"] for r in res.rows] == ["a.jpg"] and res.skipped[0]["line"] == 2
