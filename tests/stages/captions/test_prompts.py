import pytest
from caption_helpers import settings

from pipeline.errors import PipelineError
from stages.captions.prompts import load_prompt, names

REC = {"image_key": "k1", "img_id": "a.jpg", "tokens": ["Rihanna", "for", "Vogue", "Brasil"], "h_name": "Rihanna",
       "t_name": "Vogue Brasil", "sample_id": "test:0"}


def test_shipped_prompts():
    assert {"camim", "short", "entity"} <= set(names())
    assert load_prompt("camim").render(REC) == "Please give me a detailed description of the picture"
    assert not load_prompt("short").per_sample


def test_entity_prompt_renders_sentence_and_entities():
    p = load_prompt("entity")
    assert p.per_sample
    text = p.render(REC)
    assert "Rihanna for Vogue Brasil" in text and '"Rihanna"' in text and '"Vogue Brasil"' in text
    assert "$" not in text


def test_entity_prompt_without_sentence_is_a_clear_error():
    with pytest.raises(PipelineError, match="needs"):
        load_prompt("entity").render({"img_id": "x.jpg", "image_key": "k"})


def test_unknown_prompt_and_unknown_field(tmp_path):
    with pytest.raises(PipelineError, match="unknown prompt"):
        load_prompt("nope")
    bad = tmp_path / "bad.txt"
    bad.write_text("describe $object")
    with pytest.raises(PipelineError, match=r"\$object"):
        load_prompt(str(bad))


def test_cache_key_holds_the_text_not_the_file_name(tmp_path):
    from stages.captions import make_captioner

    a = tmp_path / "mine.txt"
    a.write_text("Please give me a detailed description of the picture\n")
    k_shipped = make_captioner("openai:m", settings(tmp_path, prompt="camim")).key_config()
    k_copy = make_captioner("openai:m", settings(tmp_path, prompt=str(a))).key_config()
    assert k_shipped == k_copy
    a.write_text("Describe the colours.")
    assert make_captioner("openai:m", settings(tmp_path, prompt=str(a))).key_config() != k_shipped


def test_per_sample_items_and_lookup(tmp_path):
    from stages.captions import make_captioner

    cap = make_captioner("openai:m", settings(tmp_path, prompt="entity"))
    r2 = dict(REC, sample_id="test:1", h_name="Vogue Brasil", t_name="Rihanna")
    items = cap.items([REC, r2, dict(REC)])
    assert len(items) == 2  # two different rendered prompts for one image; the duplicate shares
    assert {it["prompt"] for it in items} == {load_prompt("entity").render(REC), load_prompt("entity").render(r2)}
    assert cap.item_key(REC) != cap.item_key(r2)
    plain = make_captioner("openai:m", settings(tmp_path, prompt="camim"))
    assert len(plain.items([REC, r2])) == 1 and plain.item_key(REC) == "k1"
