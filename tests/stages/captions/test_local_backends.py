"""Every local backend against a tiny random model saved with save_pretrained, through
the real processor and ``generate`` (MiniCPM-V 2.x: a toy trust_remote_code folder)."""

import pytest
import tiny_models as tm
from caption_helpers import PHOTOS, mini_mnre, settings

from camim import chain
from stages.features.text import caption_item_key

BACKENDS = {  # backend -> builder
    "blip2": tm.build_blip2,
    "instructblip": tm.build_instructblip,
    "llava-next": tm.build_llava_next,
    "qwen2-vl": tm.build_qwen2_vl,
    "minicpm": tm.build_minicpm_toy,
}
LEFTOVERS = ("<|im_end|>", "<|im_start|>", "<image>", "<|image_pad|>", "<|endoftext|>", "\ufffd")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {name: build(root / name) for name, build in BACKENDS.items()}


def local_conf(backend, **over):
    return {"captions": {backend: {"max_new_tokens": 6, "dtype": "fp32", **over}}}


def assert_clean(text):
    assert text and text == " ".join(text.split())
    assert not any(s in text for s in LEFTOVERS), text
    assert not text.lower().startswith("assistant"), text
    assert all(ch.isprintable() for ch in text), repr(text)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_local_backend_captions_feed_the_features_stage(tmp_path, model_dirs, backend, capsys):
    src, images, missing = mini_mnre(tmp_path)
    s = settings(tmp_path, local_conf(backend), source=str(src), image_dir=str(images), mllm=f"{backend}:{model_dirs[backend]}",
                 batch_size=4)
    ds, caps, feats = chain.features(s)
    (cap,) = caps
    recs = ds.records.to_pylist()
    with_image = [r for r in recs if r["img_id"] not in missing]
    assert with_image and len(with_image) < len(recs)
    for r in with_image:
        assert_clean(cap.for_record(r))
    failed = {f["img_id"]: f["error"] for f in cap.summary.extra["failed_items"]}
    assert set(failed) == set(missing) and all(e.startswith("missing image") for e in failed.values())
    assert cap.summary.extra["output_tokens"] > 0
    # the features stage cached a feature row for every caption
    keys = [caption_item_key(cap.for_record(r)) for r in with_image]
    rows = feats.cache.rows(keys)
    assert all(row is not None and row["ok"] for row in rows)
    # a re-run is served from the cache: nothing is generated again
    ds2, caps2, feats2 = chain.features(s)
    assert caps2[0].summary.done == 0 and caps2[0].summary.cached == len(cap.by_item)
    assert caps2[0].summary.failed == len(missing)
    assert feats2.summary.done == 0
    assert all(caps2[0].for_record(r) == cap.for_record(r) for r in recs)


@pytest.mark.parametrize("backend", ["llava-next", "qwen2-vl", "blip2"])
def test_batched_generation_with_left_padding_matches_one_by_one(tmp_path, model_dirs, backend):
    from stages.captions import run_captions

    def captions(bs, sub):
        s = settings(tmp_path / sub, local_conf(backend), task="images", source=str(PHOTOS),
                     mllm=f"{backend}:{model_dirs[backend]}", batch_size=bs)
        ds = chain.data(s)
        caps = run_captions(s, s.mllm, ds.records.to_pylist())
        return caps.by_item, caps.cache.rows()

    one, _ = captions(1, "a")
    many, rows = captions(6, "b")
    assert len(one) == 6 and one == many
    assert len({r["input_tokens"] for r in rows}) > 1 or backend == "blip2"  # prompts differ in length: padding was used


def test_generation_params_and_model_are_in_the_key_device_and_batch_are_not(tmp_path, model_dirs):
    from stages.captions import make_captioner

    d = model_dirs["qwen2-vl"]
    k = make_captioner(f"qwen2-vl:{d}", settings(tmp_path, local_conf("qwen2-vl"))).key_config()
    assert make_captioner(f"qwen2-vl:{d}", settings(tmp_path, local_conf("qwen2-vl", batch_size=16, device_map="auto"),
                                                      device="cuda")).key_config() == k
    assert make_captioner(f"qwen2-vl:{d}", settings(tmp_path, local_conf("qwen2-vl", num_beams=3))).key_config() != k
    assert make_captioner(f"qwen2-vl:{d}", settings(tmp_path, local_conf("qwen2-vl"), prompt="short")).key_config() != k
    assert make_captioner(f"llava-next:{model_dirs['llava-next']}", settings(tmp_path, local_conf("llava-next"))).key_config() != k


def test_minicpm_2_5_chat_format(tmp_path):
    d = tm.build_minicpm_toy(tmp_path / "m25", version=2.5)
    s = settings(tmp_path, local_conf("minicpm", max_new_tokens=60), task="images", source=str(PHOTOS), mllm=f"minicpm:{d}")
    ds, (cap,) = chain.captions(s)
    assert cap.summary.done == 6
    texts = [cap.for_record(r) for r in ds.records.to_pylist()]
    for t in texts:
        assert_clean(t)
    # the toy answers "<w>x<h> image of ... (<first prompt word>)": image and prompt went through chat()
    assert all("image of" in t and t.endswith("(Please)") for t in texts), texts


def test_missing_offline_model_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline.errors import PipelineError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = settings(tmp_path, local_conf("blip2"), task="images", source=str(PHOTOS), mllm="blip2")
    with pytest.raises(PipelineError, match="local model folder"):
        chain.captions(s)


def test_out_of_memory_halves_the_batch_and_carries_on(tmp_path, model_dirs, monkeypatch, caplog):
    import torch

    from stages.captions import run_captions
    from stages.captions.hf_common import LocalCaptioner

    real = LocalCaptioner.generate
    sizes = []

    def generate(self, images, prompts):
        sizes.append(len(images))
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, prompts)

    monkeypatch.setattr(LocalCaptioner, "generate", generate)
    s = settings(tmp_path, local_conf("qwen2-vl"), task="images", source=str(PHOTOS), mllm=f"qwen2-vl:{model_dirs['qwen2-vl']}",
                 batch_size=6)
    caps = run_captions(s, s.mllm, chain.data(s).records.to_pylist())
    assert caps.summary.done == 6 and caps.summary.failed == 0
    assert sizes[:2] == [6, 3] and max(sizes[2:]) <= 2  # 6 -> 3 -> 1 (halved, floor)
    assert "batch size halved" in caplog.text
