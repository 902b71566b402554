import pytest
from caption_helpers import PHOTOS, mini_mnre, settings

from camim import chain
from pipeline.errors import PipelineError


def test_images_task_lists_a_folder(tmp_path, photos):
    (photos / "sub").mkdir()
    (photos / "sub" / "cat2.jpg").write_bytes((photos / "chelsea.jpg").read_bytes())
    (photos / "notes.txt").write_text("not an image")
    ds = chain.data(settings(tmp_path, task="images", source=str(photos)))
    recs = ds.records.to_pylist()
    assert sorted(r["img_id"] for r in recs) == sorted(["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "horse.png",
                                                         "motorcycle_left.jpg", "rocket.jpg", "sub/cat2.jpg"])
    assert all(r["image_path"] for r in recs)
    by = {r["img_id"]: r["image_key"] for r in recs}
    assert by["sub/cat2.jpg"] == by["chelsea.jpg"]  # same bytes, same caption item


def test_images_task_needs_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MNRE_SOURCE", raising=False)
    with pytest.raises(PipelineError, match="needs a folder"):
        chain.data(settings(tmp_path, task="images"))
    with pytest.raises(PipelineError, match="no image files"):
        chain.data(settings(tmp_path, task="images", source=str(tmp_path)))


def test_entity_prompt_on_images_task_is_refused(tmp_path, fake_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.openai_url)
    s = settings(tmp_path, task="images", source=str(PHOTOS), mllm="openai:m", prompt="entity")
    with pytest.raises(PipelineError, match="needs"):
        chain.captions(s)
    assert fake_server.state.requests == 0


def test_entity_prompt_captions_each_sample(tmp_path, fake_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.openai_url)
    fake_server.state.keep_bodies = True
    src, images, missing = mini_mnre(tmp_path)
    s = settings(tmp_path, {"captions": {"openai": {"backoff_base": 0.01}}}, source=str(src), image_dir=str(images),
                 mllm="openai:m", prompt="entity")
    ds, caps, feats = chain.features(s)
    (cap,) = caps
    recs = [r for r in ds.records.to_pylist() if r["img_id"] not in missing]
    sent = [b["messages"][0]["content"][1]["text"] for b in fake_server.state.bodies]
    for r in recs:
        assert cap.for_record(r)
        assert any(r["h_name"] in t and r["t_name"] in t and " ".join(r["tokens"]) in t for t in sent)
    assert cap.summary.done == len({cap.captioner.item_key(r) for r in recs})
