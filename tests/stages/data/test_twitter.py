"""Twitter-2015/2017 CoNLL reader and the token-level text features."""

import pytest

from pipeline.config import Settings
from pipeline.errors import InputError
from stages.data import TASKS, prepare
from stages.data.twitter import TAGS, read_conll


def write(tmp_path, text, name="train.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_bundled_samples_read_with_one_tag_set(tmp_path):
    for task, year in (("twitter15", "2015"), ("twitter17", "2017")):
        ds = prepare(Settings(task=task, cache_dir=tmp_path / "c"))
        recs = ds.records.to_pylist()
        assert [sum(r["split"] == s for r in recs) for s in ("train", "val", "test")] == [300, 100, 100]
        tags = {t for r in recs for t in r["tags"]}
        assert tags <= set(TAGS) and "B-MISC" in tags and not any("OTHER" in t for t in tags)
        assert all(len(r["tokens"]) == len(r["tags"]) == len(r["tag_ids"]) for r in recs)
        assert all(TAGS[i] == t for r in recs for i, t in zip(r["tag_ids"], r["tags"]))
        assert recs[0]["img_id"].endswith(".jpg")
        assert TASKS.create(task).labels() == list(TAGS)


def test_other_is_mapped_to_misc_and_orphan_i_kept(tmp_path):
    p = write(tmp_path, "IMGID:1\nGo\tO\nSuper\tB-OTHER\nBowl\tI-OTHER\nnow\tO\nYork\tI-LOC\n\nIMGID:2\n\xa0\tO\nhi\tO\n")
    rows = read_conll(p, "train").rows
    assert rows[0]["tags"] == ["O", "B-MISC", "I-MISC", "O", "I-LOC"]
    assert rows[0]["line"] == 1 and rows[1]["line"] == 8 and rows[1]["img_id"] == "2.jpg"
    assert rows[1]["tokens"] == ["\xa0", "hi"]  # a lone NBSP is a token in the real files


@pytest.mark.parametrize("text,line,what", [
    ("IMGID:1\nfoo\tB-XYZ\n", 2, "unknown tag"),
    ("IMGID:1\nfoo O\n", 2, "token<TAB>tag"),
    ("foo\tO\n", 1, "before any IMGID"),
    ("IMGID:1\n\nIMGID:2\na\tO\n", 1, "no tokens"),
    ("IMGID:../x\na\tO\n", 1, "leaves the image folder"),
])
def test_bad_lines_name_file_and_line(tmp_path, text, line, what):
    p = write(tmp_path, text)
    with pytest.raises(InputError) as e:
        read_conll(p, "train")
    assert f"{p}:{line}" in str(e.value) and what in str(e.value)


def test_skip_mode_keeps_good_tweets(tmp_path):
    p = write(tmp_path, "IMGID:1\na\tO\nb\tB-BAD\n\nIMGID:2\nc\tB-PER\n")
    res = read_conll(p, "train", on_error="skip")
    assert [r["tokens"] for r in res.rows] == [["c"]] and res.rows[0]["idx"] == 1
    assert res.skipped[0]["line"] == 3


def test_token_items_keep_all_pieces_and_first_piece_index():
    from stages.features.text import TextFeatureStage, tokens_item

    stage = TextFeatureStage(Settings().section("text"), device="cpu")
    stage.setup()
    words = ["RT", "@JayKenMinaj", "George", "Zimmerman", "\xa0", "unbelievableness"]
    long = ["word"] * 200
    out = stage.run([tokens_item({"tokens": words}), tokens_item({"tokens": long})])
    r = out[0]
    first = r.row["word_first"]
    assert len(first) == len(words) and first[0] == 1  # after [CLS]
    assert all(b > a for a, b in zip(first, first[1:]))
    assert r.tensors["word"].shape[0] == r.row["n_pieces"] > len(words)  # sub-word pieces kept
    ids = stage.tok(words[:4] + [stage.tok.unk_token] + words[5:], is_split_into_words=True)["input_ids"]
    assert [ids[p] for p in first[2:4]] == stage.tok.convert_tokens_to_ids(["george", "zimmerman"])
    assert ids[first[4]] == stage.tok.unk_token_id  # a word with no piece is [UNK], not lost
    # 128 pieces at most; the words past it are marked -1 and the row says truncated
    r2 = out[1]
    assert r2.row["n_pieces"] == 128 and r2.row["truncated"]
    assert r2.row["word_first"][125] == 126 and r2.row["word_first"][126] == -1


def test_bad_bytes_spoil_one_tweet_not_the_file(tmp_path):
    p = tmp_path / "bytes.txt"
    p.write_bytes(b"\xef\xbb\xbfIMGID:1\na\tO\n\nIMGID:2\ncaf\xe9\tO\nb\tO\n\nIMGID:3\nc\tB-PER\n")
    with pytest.raises(InputError) as e:
        read_conll(p, "train")
    assert f"{p}:5" in str(e.value) and "not UTF-8" in str(e.value)
    res = read_conll(p, "train", on_error="skip")
    assert [r["img_id"] for r in res.rows] == ["1.jpg", "3.jpg"] and res.skipped[0]["line"] == 5


def test_folded_links_are_one_piece_and_keep_word_positions():
    from pipeline.errors import PipelineError
    from stages.features.text import TextFeatureStage, fold_links, tokens_item

    assert fold_links(["see", "http://t.co/Z3neVBQ7vF", "HTTPS://x.y", "www.bbc.co.uk", "http", "httpx"]) == \
        ["see", "http", "http", "http", "http", "httpx"]
    words = ["Swan", "upping", ":", "http://t.co/Z3neVBQ7vF", "Windsor", "http://t.co/pQdOHx3s"]
    keep = TextFeatureStage(Settings().section("text"), device="cpu")
    fold = TextFeatureStage(dict(Settings().section("text"), links="fold"), device="cpu")
    assert "links" not in keep.key_config() and keep.key != fold.key  # "keep" leaves older keys as they were
    keep.setup()
    fold.setup()
    a, b = keep.run([tokens_item({"tokens": words})])[0], fold.run([tokens_item({"tokens": words})])[0]
    assert b.row["n_pieces"] == a.row["n_pieces"] - 15 - 14  # the two links: 16 and 15 pieces, now 1 each
    fb = b.row["word_first"]
    assert len(fb) == len(words) and fb[:4] == a.row["word_first"][:4] and fb[4] == fb[3] + 1 and fb[5] == fb[4] + 1
    ids = fold.tok(fold_links(words), is_split_into_words=True)["input_ids"]
    assert ids[fb[3]] == ids[fb[5]] == fold.tok.convert_tokens_to_ids("http")
    with pytest.raises(PipelineError, match="links"):
        TextFeatureStage(dict(Settings().section("text"), links="drop"))
