"""Caption files as users have them: empty captions, bad lines skipped and listed, huge captions cut."""

from typer.testing import CliRunner

from camim.cli import app


def _caps(small_source, tmp_path, extra_lines: dict[int, str]):
    """A caption folder: the sample's Qwen captions with some lines replaced."""
    d = tmp_path / "mycaps"
    d.mkdir()
    for split in ("train", "val", "test"):
        lines = (small_source / "camim_captions" / f"qwen_{split}.txt").read_text().splitlines()
        if split == "train":
            for i, text in extra_lines.items():
                lines[i] = text
        (d / f"caps_{split}.txt").write_text("\n".join(lines) + "\n")
    return d


def _run(small_source, tmp_path, caps, *more):
    return CliRunner().invoke(app, ["captions", "--source", str(small_source), "--cache-dir", str(tmp_path / "c"),
                                    "--mllm", f"imported:{caps}", *more])


def _img(small_source, i):
    """The caption line index and img_id of the image of the i-th training sample."""
    import ast

    img = ast.literal_eval((small_source / "mnre_train.txt").read_text().splitlines()[i])["img_id"]
    lines = (small_source / "camim_captions" / "qwen_train.txt").read_text().splitlines()
    return next(n for n, line in enumerate(lines) if ast.literal_eval(line)["img_id"] == img), img


def test_empty_caption_is_a_recorded_failure(tmp_path, small_source):
    n, img = _img(small_source, 0)
    caps = _caps(small_source, tmp_path, {n: repr({"img_id": img, "text": "   "})})
    r = _run(small_source, tmp_path, caps)
    assert r.exit_code == 0, r.output
    assert "empty caption" in r.output and img in r.output
    assert "1 failed" in r.output or "failed items (1" in r.output


def test_skipped_caption_lines_are_listed_also_when_served_from_the_cache(tmp_path, small_source):
    caps = _caps(small_source, tmp_path, {1: "{'img_id': 'x.jpg', 'text'", 2: "not a dict at all"})
    stop = _run(small_source, tmp_path, caps)
    assert stop.exit_code == 2 and "caps_train.txt:2" in stop.output
    for _ in range(2):  # the second run is served from the cache and still lists them
        r = _run(small_source, tmp_path, caps, "--on-error", "skip")
        assert r.exit_code == 0, r.output
        assert "skipped input lines (2" in r.output
        assert "caps_train.txt:2:" in r.output and "caps_train.txt:3:" in r.output


def test_a_huge_caption_is_cut_with_a_warning_naming_the_item(tmp_path, small_source, caplog):
    from stages.captions import MAX_CAPTION_CHARS

    n, img = _img(small_source, 0)
    caps = _caps(small_source, tmp_path, {n: repr({"img_id": img, "text": "word " * 200_000})})
    r = _run(small_source, tmp_path, caps)
    assert r.exit_code == 0, r.output
    assert any(img in m and "cut to" in m for m in caplog.messages)
    from pipeline.store import Store

    sc = next(e for e in Store(tmp_path / "c").entries() if e.stage == "captions")
    row = next(x for x in sc.rows() if x.get("img_id") == img)
    assert len(row["caption"]) <= MAX_CAPTION_CHARS and row["caption_cut_from"] > 900_000
