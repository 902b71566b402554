"""CUDA paths. Skipped without a GPU (CI has none); run on a GPU machine with
`python -m pytest tests/gpu`."""

import pytest
import torch

from pipeline.runner import run_stage
from pipeline.stage import Stage
from pipeline.store import ItemResult, Store

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class Hog(Stage):
    """Allocates ``per_item_gib`` of device memory per item: a real CUDA OOM for big batches."""

    name = "hog"

    def __init__(self, per_item_gib):
        self.per_item = int(per_item_gib * (1 << 30))
        self.sizes = []

    def key_config(self):
        return {"hog": 1}

    def run(self, batch):
        x = torch.empty(self.per_item * len(batch), dtype=torch.uint8, device="cuda")
        del x
        self.sizes.append(len(batch))
        return [ItemResult(it["item_key"], row={"n": len(batch)}) for it in batch]


def test_real_cuda_oom_halves_batch(tmp_path):
    total = torch.cuda.get_device_properties(0).total_memory / (1 << 30)
    stage = Hog(per_item_gib=total / 6)  # a batch of 8 cannot fit, 4 can
    items = [{"item_key": f"k{i}", "x": i} for i in range(12)]
    _, summary = run_stage(stage, items, Store(tmp_path), batch_size=8)
    assert summary.done == 12 and max(stage.sizes) <= 5


def test_text_features_on_cuda_match_cpu(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from stages.features.text import TextFeatureStage, sentence_item

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "@", "#", "bill", "cosby", "star", "on", "hollywood", "walk", "of", "fame"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "m" / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rec = {"tokens": "Bill Cosby star on Hollywood Walk of Fame".split(), "h_start": 0, "h_end": 2, "t_start": 4, "t_end": 8}
    gpu = TextFeatureStage({"model": str(tmp_path / "m")}, device="cuda")
    cpu = TextFeatureStage({"model": str(tmp_path / "m"), "compute_dtype": "fp32"}, device="cpu")
    assert gpu.compute_dtype in ("bf16", "fp16")
    out = []
    for st in (gpu, cpu):
        st.setup()
        out.append(st.run([sentence_item(rec)])[0])
    a, b = (o.tensors["word"].float() for o in out)
    assert a.shape == b.shape
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert out[0].row["h_start"] == out[1].row["h_start"] == 1


def test_tuned_top_trains_on_cuda_with_sdpa_and_matches_the_cpu_without_dropout():
    from stages.train.tuned_top import TunedTop

    dims = {"sent_word": 64, "top_layers": 2, "top_heads": 4, "top_ffn": 128, "top_eps": 1e-12}
    torch.manual_seed(0)
    top = TunedTop(dims, joint="memory", mem_gate=True)
    with torch.no_grad():
        top.gates.fill_(0.5)
    s, c, lv = torch.randn(3, 7, 64), torch.randn(3, 5, 64), torch.randn(3, 5, 2 * 64)
    sm, cm = torch.ones(3, 7, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool)
    sm[0, 4:] = False
    cm[1, 2:] = False
    top.eval()
    with torch.no_grad():
        ref, _ = top(s, sm, c, cm, lv)
        out, _ = top.cuda()(s.cuda(), sm.cuda(), c.cuda(), cm.cuda(), lv.cuda())
    assert torch.allclose(out.cpu(), ref, atol=1e-4)
    top.train()
    y, _ = top(s.cuda(), sm.cuda(), c.cuda(), cm.cuda(), lv.cuda())
    y.pow(2).mean().backward()
    assert top.layers[0].q.weight.grad is not None and torch.isfinite(top.layers[0].q.weight.grad).all()
