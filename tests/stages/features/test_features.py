"""The text features stage on the real packaged MiniLM (bert-base-uncased vocabulary)."""

import pytest
import torch

from pipeline.config import Settings
from stages.features.text import (
    TextFeatureStage,
    caption_item,
    mark_tokens,
    sentence_item,
)


def rec(tokens, h, t):
    return {"tokens": tokens, "h_start": h[0], "h_end": h[1], "t_start": t[0], "t_end": t[1]}


@pytest.fixture(scope="module")
def stage():
    conf = Settings().section("text")
    s = TextFeatureStage(conf, device="cpu")
    s.setup()
    return s


def test_markers():
    words, pos = mark_tokens(["a", "b", "c", "d"], (2, 4), (0, 1), "punct")
    assert words == ["#", "a", "#", "b", "@", "c", "d", "@"]
    assert [words[p] for p in pos] == ["@", "@", "#", "#"] and pos == [4, 7, 0, 2]
    words, pos = mark_tokens(["a", "b"], (0, 1), (1, 2), "unused")
    assert words == ["[unused0]", "a", "[unused1]", "[unused2]", "b", "[unused3]"]


def test_sentence_features_real_minilm(stage):
    items = [
        sentence_item(rec("Bill Cosby 's star on Hollywood Walk of Fame vandalized".split(), (0, 2), (5, 9))),
        sentence_item(rec("RT @user : New breed of Crocodile discovered in South Wales".split(), (6, 7), (9, 11))),
        caption_item("A star on the Hollywood Walk of Fame, damaged."),
    ]
    out = stage.run(items)
    assert all(r.error is None for r in out)
    s0, s1, c = out
    assert s0.tensors["word"].shape == (s0.row["n_pieces"], 384)
    assert s0.tensors["word"].dtype == torch.float16 and s0.tensors["sent"].shape == (384,)
    ids = stage.tok(mark_tokens(items[0]["tokens"], items[0]["h"], items[0]["t"], "punct")[0], is_split_into_words=True)["input_ids"]
    at, hash_ = stage.tok.convert_tokens_to_ids(["@", "#"])
    assert ids[s0.row["h_start"]] == at and ids[s0.row["h_end"]] == at
    assert ids[s0.row["t_start"]] == hash_ and ids[s0.row["t_end"]] == hash_
    assert s0.row["h_start"] == 1  # "@" right after [CLS]
    # a real encoder: the caption about the same scene is closer to its sentence
    cos = torch.nn.functional.cosine_similarity
    sim_same = cos(c.tensors["sent"].float(), s0.tensors["sent"].float(), dim=0)
    sim_other = cos(c.tensors["sent"].float(), s1.tensors["sent"].float(), dim=0)
    assert sim_same > sim_other + 0.1
    assert c.row["n_pieces"] <= 40


def test_bf16_matches_fp32(stage):
    conf = dict(Settings().section("text"), compute_dtype="fp32")
    fp32 = TextFeatureStage(conf, device="cpu")
    fp32.setup()
    items = [sentence_item(rec("The latest Arkham Horror LCG deluxe expansion the Circle Undone has been released :".split(), (8, 10), (2, 5)))]
    a = stage.run(items)[0].tensors["word"].float()
    b = fp32.run(items)[0].tensors["word"].float()
    assert fp32.key != stage.key or stage.compute_dtype == "fp32"
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99


def test_unknown_marker_scheme_is_a_clear_error():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="markers"):
        TextFeatureStage({"markers": "stars"})
