"""Fixtures for the visual side (tests/conftest.py registers them for the whole suite): real photos, generated "translation" images, a crop
folder laid out like HVPNeT's ``img_vg``, and tiny random OWLv2 / Grounding DINO models.

The six real photos are scikit-image's sample data, committed (downscaled) under
``tests/fixtures/photos`` (see its README for sources and terms).  If that folder is
absent they are extracted from a scikit-image wheel fetched with ``pip download`` into a
cache folder and downscaled the same way.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
# committed name -> name inside the wheel's skimage/data/
PHOTOS = {"astronaut.jpg": "astronaut.png", "chelsea.jpg": "chelsea.png", "coffee.jpg": "coffee.png",
          "rocket.jpg": "rocket.jpg", "motorcycle_left.jpg": "motorcycle_left.png", "horse.png": "horse.png"}
SAMPLE = REPO / "data" / "sample" / "mnre"


def _photos_from_wheel(dest: Path) -> Path:
    import io

    from PIL import Image

    cache = Path(os.environ.get("CAMIM_TEST_CACHE", Path.home() / ".cache" / "camim-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("scikit_image-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "scikit-image", "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("scikit_image-*.whl"))
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as zf:
        for name, orig in PHOTOS.items():
            im = Image.open(io.BytesIO(zf.read(f"skimage/data/{orig}")))
            im.thumbnail((320, 320))
            if name.endswith(".jpg"):
                im.convert("RGB").save(dest / name, quality=88)
            else:
                im.save(dest / name)
    return dest


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    d = REPO / "tests" / "fixtures" / "photos"
    if not all((d / n).is_file() for n in PHOTOS):
        d = _photos_from_wheel(tmp_path_factory.mktemp("photos"))
    return [d / n for n in PHOTOS]


def sample_records(split: str = "val") -> list[dict]:
    return [ast.literal_eval(line) for line in (SAMPLE / f"mnre_{split}.txt").read_text().splitlines() if line.strip()]


def draw_translation(i: int, size: int = 768):
    """A synthetic 'generated image': coloured shapes at known places."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (20 + 30 * i, 60, 110))
    d = ImageDraw.Draw(im)
    d.rectangle((90, 110, 480, 610), fill=(240, 230, 10))
    d.ellipse((300, 40, 720, 420), fill=(10, 190, 60))
    d.polygon([(600, 700), (760, 500), (700, 760)], fill=(200, 20, 20))
    return im


@pytest.fixture(scope="session")
def visual_source(tmp_path_factory, photos) -> dict:
    """The bundled MNRE sample with images for its first six val images (the real
    photos under their tweet image names), HVPNeT-style crops for samples 0-5 of val
    (one listed crop missing, one corrupt) and translation images for samples 0-3."""
    from PIL import Image

    root = tmp_path_factory.mktemp("visual")
    imgs, crops, trans = root / "images", root / "img_vg" / "val" / "crops", root / "diffusion_pic" / "val"
    for d in (imgs, crops, trans):
        d.mkdir(parents=True)
    recs = sample_records("val")
    ids = list(dict.fromkeys(r["img_id"] for r in recs))
    for p, img_id in zip(photos, ids):
        shutil.copy(p, imgs / img_id)
    vg = json.loads((SAMPLE / "tmr_aux" / "img_vg_crops_val.json").read_text())
    missing, corrupt = vg["2"][1], vg["5"][0]
    for i in range(6):
        src = Image.open(photos[i]).convert("RGB")
        for k, name in enumerate(vg[str(i)]):
            if name == missing:
                continue
            w, h = src.size
            src.crop((k * w // 8, k * h // 8, w // 2 + k * w // 8, h // 2 + k * h // 8)).save(crops / name)
    (crops / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for i in range(4):
        draw_translation(i).save(trans / (Path(recs[i]["img_id"]).stem + ".png"))
    return {"root": root, "images": imgs, "crops": root / "img_vg", "trans": root / "diffusion_pic", "records": recs,
            "vg": vg, "missing": missing, "corrupt": corrupt}


# -- tiny random detectors ---------------------------------------------------------
def _clip_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    corpus = ["a photo of a cat", "a red car", "the person", "David Bowie", "UN Libya", "coffee cup", "rocket launch"] * 4
    tk = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<|dummy|>", "<|startoftext|>", "<|endoftext|>"]  # id 0 must not start a query (OWL masks those)
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=special, end_of_word_suffix="</w>",
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = json.loads(tk.to_str())
    return CLIPTokenizer(vocab=d["model"]["vocab"], merges=[tuple(m.split()) if isinstance(m, str) else tuple(m) for m in d["model"]["merges"]],
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_owlv2(tmp_path_factory) -> Path:
    import torch
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    torch.manual_seed(0)
    tok = _clip_tokenizer()
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=32,
    )
    model = Owlv2ForObjectDetection(cfg).eval()
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok)
    d = tmp_path_factory.mktemp("owlv2")
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_grounding_dino(tmp_path_factory) -> Path:
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "the", "cat", "red", "car", "person", "david", "bowie",
             "un", "libya", "coffee", "rocket", "photo", "of"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = BertTokenizer(vocab=vocab)
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                   window_size=4, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                               max_position_embeddings=64),
        d_model=32, num_queries=30, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=4, max_text_len=32,
    )
    model = GroundingDinoForObjectDetection(cfg).eval()
    proc = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128}), tokenizer=tok)
    d = tmp_path_factory.mktemp("gdino")
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d
