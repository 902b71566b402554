"""VEC-MNER and REMOTE heads on synthetic batches: shapes, masks, losses, learning."""

import pytest
import torch

from stages.train import HEADS
from stages.train.vecmner import CA

D, B = 24, 5


def ner_batch(cap=True, seed=0, W=6, P=10):
    g = torch.Generator().manual_seed(seed)
    nw = torch.tensor([6, 3, 5, 1, 4])
    first = torch.arange(W)[None].expand(B, W) + 1
    fm = torch.arange(W)[None] < nw[:, None]
    b = {
        "sent_word": torch.randn(B, P, 2 * D, generator=g),
        "sent_mask": torch.arange(P)[None] < (nw + 2)[:, None],
        "first": first, "first_mask": fm,
        "shape": torch.randint(1, 5, (B, W), generator=g),
        "label": torch.randint(0, 9, (B, W), generator=g).masked_fill(~fm, -100),
    }
    if cap:
        cl = torch.tensor([4, 0, 2, 7, 1])
        b["cap_word"] = torch.randn(B, 7, 2 * D, generator=g)
        b["cap_mask"] = torch.arange(7)[None] < cl[:, None]
    return b


def vec(b, **o):
    torch.manual_seed(0)
    dims = {"sent_word": 2 * D, "text_levels": 2}
    if "cap_word" in b:
        dims["cap_word"] = 2 * D
    return HEADS.get("vecmner")(dims, 9, {"d": 32, "heads": 2, "n_vis": 8, **o})


@pytest.mark.parametrize("cap,opts", [
    (True, {}), (False, {"encoder": "bilstm"}), (True, {"encoder": "bilstm", "ca_gate": "softmax"}),
    (True, {"shape_dim": 0, "n_cadf": 0, "levels": [-1]}),
])
def test_vecmner_forward_backward_predict(cap, opts):
    b = ner_batch(cap)
    h = vec(b, **opts)
    out = h(b)
    assert out["logits"].shape == (B, 6, 9) and torch.isfinite(out["loss"])
    assert ("contrastive" in out["aux"]) == cap
    out["loss"].backward()
    grads = [p.grad for p in h.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    h.eval()
    p = h.predict({k: v for k, v in b.items() if k != "label"})
    assert p.shape == (B, 6)
    assert ((p >= 0) == b["first_mask"]).all()


def test_vecmner_padding_does_not_change_outputs():
    b = ner_batch(True)
    h = vec(b).eval()
    a = h(b)["logits"]
    b2 = dict(b)
    b2["sent_word"] = b["sent_word"].masked_fill(~b["sent_mask"][..., None], 7.0)
    b2["cap_word"] = b["cap_word"].masked_fill(~b["cap_mask"][..., None], -3.0)
    m = b["first_mask"]  # the logits of real words; padding words are never scored
    assert torch.allclose(a[m], h(b2)["logits"][m], atol=1e-5)
    assert torch.equal(h.predict(b), h.predict(b2))


def test_ca_gates_only_real_tokens():
    ca = CA(8, 2, "softmax")
    k = torch.randn(2, 5, 16)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = ca(k, m)
    assert (out[0, 3:] == 0).all()
    w = out[..., 0] / k[..., 0]
    assert torch.allclose(w[0, :3].sum(), torch.tensor(1.0), atol=1e-5)  # softmax over real tokens


def test_contrastive_loss_is_symmetric_and_prefers_matching_pairs():
    b = ner_batch(True)
    h = vec(b)
    t = torch.randn(4, 3, 32)
    tm = torch.ones(4, 3, dtype=torch.bool)
    same = h.contrastive(t, tm, t.clone(), tm)
    other = h.contrastive(t, tm, t[torch.tensor([1, 2, 3, 0])], tm)
    assert same < other
    assert torch.allclose(h.contrastive(t, tm, t.flip(0), tm), h.contrastive(t.flip(0), tm, t, tm), atol=1e-6)
    assert not h.scale.requires_grad and abs(float(h.scale) - 2.6593) < 1e-3


def test_vecmner_learns_a_tagging_rule():
    """A rule readable from the features: tag = argmax of the first 9 dims of the word's piece."""
    torch.manual_seed(3)
    b = ner_batch(False, W=6)
    x = torch.randn(B, 10, 2 * D)
    b["sent_word"] = x
    b["sent_mask"] = torch.ones(B, 10, dtype=torch.bool)
    lab = x[:, 1:7, D : D + 9].argmax(-1)
    b["label"] = lab.masked_fill(~b["first_mask"], -100)
    h = vec(b, encoder="none", n_cadf=0, shape_dim=0, neftune=0, dropout=0.0)
    opt = torch.optim.Adam(h.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        h(b)["loss"].backward()
        opt.step()
    h.eval()
    p = h.predict(b)
    assert (p[b["first_mask"]] == lab[b["first_mask"]]).float().mean() > 0.95


def re_batch(cap=True, obj=True, L=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = 9
    b = {
        "sent_word": torch.randn(B, P, L * D, generator=g),
        "sent_mask": torch.arange(P)[None] < torch.tensor([9, 5, 7, 6, 4])[:, None],
        "h_idx": torch.tensor([1, 1, 2, 1, 0]), "t_idx": torch.tensor([4, 3, 5, 4, 2]),
        "label": torch.tensor([0, 1, 2, 3, 1]),
    }
    if cap:
        b["cap_word"] = torch.randn(B, 6, L * D, generator=g)
        b["cap_mask"] = torch.arange(6)[None] < torch.tensor([6, 0, 3, 2, 0])[:, None]
    if obj:
        b["obj_vec"] = torch.randn(B, 4, 16, generator=g)
        b["obj_box"] = torch.rand(B, 4, 4, generator=g)
        b["obj_mask"] = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
        b["h_obj"] = torch.tensor([-1, 0, -1, 3, -1])
        b["t_obj"] = torch.tensor([1, -1, -1, 2, -1])
    return b


def remote(b, L=2, **o):
    torch.manual_seed(0)
    dims = {k: v.shape[-1] for k, v in b.items() if v.is_floating_point()}
    dims["text_levels"] = L
    return HEADS.get("remote")(dims, 5, {"d": 32, "heads": 2, **o})


@pytest.mark.parametrize("cap,obj,opts", [
    (True, True, {}), (True, False, {}), (False, True, {}), (False, False, {}),
    (True, True, {"ot": False}), (True, True, {"moe_balance": 0.1}), (True, True, {"levels": [-1]}),
])
def test_remote_every_stream_combination(cap, obj, opts):
    b = re_batch(cap, obj)
    h = remote(b, **opts)
    out = h(b)
    assert out["logits"].shape == (B, 5) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in h.parameters() if p.grad is not None)
    assert h.predict(b).shape == (B,)


def test_remote_object_argument_reads_its_slot():
    b = re_batch(False, True)
    h = remote(b).eval()
    base = h(b)["logits"]
    b2 = dict(b)
    b2["obj_vec"] = b["obj_vec"].clone()
    b2["obj_vec"][1, 0] += 5.0  # the head object of sample 1
    changed = (h(b2)["logits"] - base).abs().sum(1) > 1e-4
    assert changed[1]
    b3 = dict(b)
    b3["obj_vec"] = b["obj_vec"].clone()
    b3["obj_vec"][2] += 5.0  # sample 2 has no objects (all masked): nothing changes
    assert torch.allclose(h(b3)["logits"][2], base[2], atol=1e-5)


def test_remote_router_uses_identity_without_visual_tokens():
    b = re_batch(True, False)
    h = remote(b).eval()
    x = torch.randn(B, 9, 32)
    kv = [torch.randn(B, 6, 32)] * 2
    y, bal, g = h.v2t(x, b["sent_mask"], kv, b["cap_mask"])
    none = ~b["cap_mask"].any(1)
    assert torch.allclose(g[none][..., 0], torch.ones_like(g[none][..., 0]))
    assert torch.allclose(y[none], x[none])
    assert torch.allclose(g.sum(-1), torch.ones(B, 9), atol=1e-5)
    assert torch.isfinite(bal) and float(bal.detach()) > 0


def test_remote_learns_from_levels():
    torch.manual_seed(1)
    b = re_batch(True, False, L=2)
    n = 40
    x = torch.randn(n, 9, 2 * D)
    y = (x[:, 1, D] > 0).long() + 2 * (x[:, 4, D + 1] > 0).long()
    b = {"sent_word": x, "sent_mask": torch.ones(n, 9, dtype=torch.bool), "h_idx": torch.ones(n, dtype=torch.long),
         "t_idx": torch.full((n,), 4), "label": y}
    h = remote(b, dropout=0.0)
    opt = torch.optim.Adam(h.parameters(), lr=3e-3)
    for _ in range(120):
        opt.zero_grad()
        h(b)["loss"].backward()
        opt.step()
    assert (h.eval().predict(b) == y).float().mean() > 0.95


def test_cam_caption_dropout_hides_whole_captions_in_training_only():
    from pipeline.errors import PipelineError
    from stages.train.cam import CamHead

    n, lc = 400, 6
    dims = {"sent_word": D, "sent_vec": D, "cap_word": D, "cap_vec": D}
    head = CamHead(dims, 3, {"hidden": 16, "heads": 2, "cap_drop": 0.5})
    g = torch.Generator().manual_seed(0)
    has = torch.arange(n) % 4 != 0  # a quarter of the samples have no caption at all
    batch = {"sent_word": torch.randn(n, 5, D, generator=g), "sent_mask": torch.ones(n, 5, dtype=torch.bool),
             "sent_vec": torch.randn(n, D, generator=g), "cap_word": torch.randn(n, lc, D, generator=g),
             "cap_mask": has[:, None] & (torch.arange(lc)[None] < 4), "cap_vec": torch.randn(n, D, generator=g), "has_cap": has,
             "h_idx": torch.zeros(n, dtype=torch.long), "h_end": torch.ones(n, dtype=torch.long),
             "t_idx": torch.full((n,), 2), "t_end": torch.full((n,), 3), "label": torch.randint(0, 3, (n,), generator=g)}
    head.eval()
    assert head.drop_captions(batch) is batch
    head.train()
    torch.manual_seed(1)
    out = head.drop_captions(batch)
    kept = out["has_cap"]
    assert not kept[~has].any()  # no caption appears
    assert torch.equal(out["cap_mask"].any(1), kept)  # a caption goes whole, with its vector flag
    assert torch.equal(out["cap_mask"][kept], batch["cap_mask"][kept])
    share = 1 - kept[has].float().mean().item()
    assert 0.4 < share < 0.6, share
    loss = head(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(PipelineError, match="cap_drop"):
        CamHead(dims, 3, {"cap_drop": 1.0})


def test_cam_caption_ensemble_averages_the_two_views_and_leaves_captionless_samples_alone():
    from stages.train.cam import CamHead

    n, lc = 512, 6
    dims = {"sent_word": D, "sent_vec": D, "cap_word": D, "cap_vec": D}
    g = torch.Generator().manual_seed(3)
    has = torch.arange(n) % 3 != 0
    batch = {"sent_word": torch.randn(n, 5, D, generator=g), "sent_mask": torch.ones(n, 5, dtype=torch.bool),
             "sent_vec": torch.randn(n, D, generator=g), "cap_word": 3 * torch.randn(n, lc, D, generator=g),
             "cap_mask": has[:, None] & (torch.arange(lc)[None] < 4), "cap_vec": 3 * torch.randn(n, D, generator=g), "has_cap": has,
             "h_idx": torch.zeros(n, dtype=torch.long), "h_end": torch.ones(n, dtype=torch.long),
             "t_idx": torch.full((n,), 2), "t_end": torch.full((n,), 3)}
    torch.manual_seed(0)
    head = CamHead(dims, 9, {"hidden": 16, "heads": 2, "cap_ens": True}).eval()
    with torch.no_grad():
        p_cap = head(batch)["logits"].softmax(-1)
        bare = {**batch, "cap_mask": torch.zeros_like(batch["cap_mask"]), "has_cap": torch.zeros_like(has)}
        p_bare = head(bare)["logits"].softmax(-1)
    assert torch.equal(head.predict(batch), (p_cap + p_bare).argmax(-1))
    assert torch.equal(p_cap[~has], p_bare[~has])  # no caption: the two views are one
    head.cap_ens = False
    assert torch.equal(head.predict(batch), p_cap.argmax(-1))
    assert not torch.equal(p_cap[has].argmax(-1), (p_cap + p_bare)[has].argmax(-1))  # the views disagree somewhere
