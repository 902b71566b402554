"""The CAM+MI head on synthetic batches: every optional stream, every ablation option."""

import pytest
import torch

from stages.train import HEADS
from stages.train.cam import ALIGN, MI_PAIRS, info_nce
from stages.train.metrics import re_metrics

D, DI, B, N_LABELS = 24, 16, 6, 5


def synth_batch(cap=True, img=False, obj=False, trans=False, tobj=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, Lc = 9, 7
    lens = torch.tensor([9, 5, 7, 6, 9, 4])
    b = {
        "sent_word": torch.randn(B, L, D, generator=g),
        "sent_mask": torch.arange(L)[None] < lens[:, None],
        "sent_vec": torch.randn(B, D, generator=g),
        "h_idx": torch.tensor([1, 1, 2, 1, 3, 1]),
        "h_end": torch.tensor([2, 2, 3, 2, 4, 2]),
        "t_idx": torch.tensor([4, 3, 5, 4, 6, 3]),
        "t_end": torch.tensor([5, 3, 6, 5, 7, 3]),
        "label": torch.tensor([0, 1, 2, 3, 4, 1]),
    }
    if cap:
        has = torch.tensor([True, True, False, True, True, False])
        clens = torch.tensor([7, 3, 0, 5, 2, 0])
        b.update(cap_word=torch.randn(B, Lc, D, generator=g), cap_mask=torch.arange(Lc)[None] < clens[:, None],
                 cap_vec=torch.randn(B, D, generator=g) * has[:, None], has_cap=has)
    if img:
        b.update(img_vec=torch.randn(B, DI, generator=g), has_img=torch.tensor([True, False, True, True, True, True]))
    if obj:
        b.update(obj_vec=torch.randn(B, 3, DI, generator=g),
                 obj_mask=torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool))
    if trans:
        b.update(trans_vec=torch.randn(B, DI, generator=g), has_trans=torch.tensor([True] * 5 + [False]))
    if tobj:
        b.update(trans_obj_vec=torch.randn(B, 3, DI, generator=g), trans_obj_mask=torch.rand(B, 3, generator=g) > 0.5)
    return b


def dims_of(batch):
    return {k: v.shape[-1] for k, v in batch.items() if v.is_floating_point()}


def build(batch, **opts):
    torch.manual_seed(0)
    return HEADS.get("cam")(dims_of(batch), N_LABELS, {"hidden": 32, "heads": 2, **opts})


@pytest.mark.parametrize("streams", [
    dict(cap=False), dict(cap=True), dict(img=True), dict(img=True, obj=True),
    dict(cap=False, trans=True, tobj=True), dict(img=True, obj=True, trans=True, tobj=True),
])
def test_every_stream_combination_trains(streams):
    batch = synth_batch(**streams)
    head = build(batch)
    out = head(batch)
    assert out["logits"].shape == (B, N_LABELS)
    assert torch.isfinite(out["loss"]) and set(out["aux"]) == {"ce", "nce"}
    out["loss"].backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # visual MLPs exist exactly for the streams present, and get gradient
    for k in ("img_vec", "obj_vec", "trans_vec", "trans_obj_vec"):
        assert (k in head.vis) == (k in batch)
        if k in batch:
            assert head.vis[k][0].weight.grad is not None and head.vis[k][0].weight.grad.abs().sum() > 0
    pred = head.eval().predict(batch)
    assert pred.shape == (B,) and pred.dtype == torch.int64


@pytest.mark.parametrize("align,mi", [(a, "O&G") for a in ALIGN] + [("W&S", m) for m in MI_PAIRS[1:]])
def test_ablation_options(align, mi):
    batch = synth_batch(img=True, obj=True, trans=True)
    out = build(batch, align=align, mi=mi)(batch)
    assert torch.isfinite(out["loss"])
    assert ("nce" in out["aux"]) == (mi != "off")


def test_alpha_weights_the_mi_term():
    batch = synth_batch()
    a = build(batch, alpha=0.0, dropout=0.0, cls_dropout=0.0).eval()(batch)
    b = build(batch, alpha=0.5, dropout=0.0, cls_dropout=0.0).eval()(batch)
    assert torch.allclose(a["aux"]["ce"], b["aux"]["ce"])
    assert torch.allclose(b["loss"], b["aux"]["ce"] + 0.5 * b["aux"]["nce"])


def test_masked_caption_words_do_not_matter():
    """Padding positions of captions and sentences never change the output."""
    batch = synth_batch(img=True, obj=True)
    head = build(batch).eval()
    ref = head(batch)["logits"]
    noisy = dict(batch)
    noisy["cap_word"] = torch.where(batch["cap_mask"][..., None], batch["cap_word"], torch.randn_like(batch["cap_word"]) * 100)
    noisy["sent_word"] = torch.where(batch["sent_mask"][..., None], batch["sent_word"], torch.randn_like(batch["sent_word"]) * 100)
    noisy["obj_vec"] = torch.where(batch["obj_mask"][..., None], batch["obj_vec"], torch.randn_like(batch["obj_vec"]) * 100)
    assert torch.allclose(ref, head(noisy)["logits"], atol=1e-5)


def test_bad_option_is_a_clear_error():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="align"):
        build(synth_batch(), align="X")


def test_info_nce_prefers_aligned_pairs():
    x = torch.randn(8, 16)
    assert info_nce(x, x, 0.1) < info_nce(x, torch.randn(8, 16), 0.1)


def test_re_metrics_follow_the_mnre_definition():
    labels = ["None", "a", "b"]
    gold = [0, 1, 1, 2, 0, 2]
    pred = [0, 1, 2, 2, 1, 0]
    m = re_metrics(gold, pred, labels)
    assert m["acc"] == pytest.approx(3 / 6)
    # tp = 2 (idx 1, 3); predicted non-None = 4; gold non-None = 4
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(0.5)
    assert m["per_label"]["a"]["precision"] == pytest.approx(1 / 2) and m["per_label"]["b"]["recall"] == pytest.approx(1 / 2)
    assert "None" not in m["per_label"]
    assert re_metrics([0, 0], [0, 0], labels)["f1"] == 0.0


def test_opts_parse_as_toml_values():
    from pipeline.errors import PipelineError
    from stages.train.trainer import parse_opts

    assert parse_opts(["lr=3e-4", "align=W&S", "text_layers=2", "seeds=[1, 2]", "amp=\"off\""]) == {
        "lr": 3e-4, "align": "W&S", "text_layers": 2, "seeds": [1, 2], "amp": "off"}
    with pytest.raises(PipelineError, match="KEY=VALUE"):
        parse_opts(["lr"])


def test_bucketed_batches_cover_every_row_once():
    from stages.train.trainer import epoch_batches

    rows = torch.arange(100, 197)
    lengths = torch.randint(3, 120, (200,))
    batches = epoch_batches(rows, lengths, 8, 4, torch.Generator().manual_seed(0))
    flat = torch.cat(batches)
    assert sorted(flat.tolist()) == rows.tolist() and max(len(b) for b in batches) == 8
    # inside a batch, lengths are sorted (drawn from one bucket)
    assert all(bool((lengths[b][1:] >= lengths[b][:-1]).all()) for b in batches)


def test_schedule_warms_up_then_decays_to_zero():
    from stages.train.trainer import linear_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = linear_schedule(opt, 100, 0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_no_weight_decay_on_biases_and_layernorm():
    from stages.train.trainer import param_groups

    head = build(synth_batch())
    decay, no_decay = param_groups(head, 0.01)
    names = {id(p): n for n, p in head.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and p.ndim >= 2 for p in decay["params"])
    assert any("ln" in names[id(p)] or "norm" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


def test_a_mistyped_option_is_an_error_naming_the_known_ones():
    import pytest

    from pipeline.config import Settings
    from pipeline.errors import PipelineError
    from stages.train.trainer import train_options

    s = Settings()
    assert train_options(s, {"top_lr": 1e-4, "epochs": 2})["top_lr"] == 1e-4
    with pytest.raises(PipelineError, match="'hiden'.*known:.*hidden"):
        train_options(s, {"hiden": 64})
    with pytest.raises(PipelineError, match="for head 'vecmner'"):
        train_options(s, {"head": "vecmner", "hidden": 64})  # VEC-MNER's width is `d`


def test_an_unknown_curve_sink_is_an_error(tmp_path):
    import pytest

    from pipeline.errors import PipelineError
    from stages.train.curves import Curves

    with pytest.raises(PipelineError, match="unknown sink"):
        Curves(tmp_path, "jsonl,wandb")
    c = Curves(tmp_path, "jsonl")
    c.step(1, 1, {"loss": 0.5}, 1e-3)
    c.epoch(1, 1, {"val_f1": 0.4})
    c.close()
    assert (tmp_path / "curves.jsonl").read_text().count("\n") == 2


def test_tensorboard_curves(tmp_path):
    import pytest

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stages.train.curves import Curves

    c = Curves(tmp_path, "jsonl,tensorboard")
    for s in range(1, 4):
        c.step(s, 1, {"loss": 1.0 / s, "ce": 0.5}, 1e-3)
    c.epoch(1, 3, {"val_f1": 0.4, "val_acc": 0.7})
    c.close()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert {"train/loss", "train/ce", "train/lr", "val/val_f1"} <= set(ea.Tags()["scalars"])
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
