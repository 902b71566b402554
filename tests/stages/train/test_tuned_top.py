"""Tuned top layers over cached cut-level states (text.cut = k)."""

import pytest
import torch

from pipeline.config import Settings, extend, load_profile, merge
from stages.train.tuned_top import BERT_NAMES
from tests.helpers import save_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert3(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert3"), layers=3)


def _settings(tmp_path, source, model, cut, train=None, text=None):
    conf = merge(load_profile("offline"), {"text": {"model": str(model), "cut": cut, "compute_dtype": "fp32", **(text or {})},
                                           "train": {"epochs": 2, "hidden": 16, "heads": 2, "lr": 3e-3, **(train or {})}})
    return Settings(cache_dir=tmp_path / "cache", source=str(source), conf=conf, mllm="imported:qwen")


def test_cut_zero_keeps_the_old_key_and_a_cut_changes_it(tiny_bert3):
    from stages.features.text import TextFeatureStage

    base = {"model": str(tiny_bert3), "compute_dtype": "fp32"}
    assert TextFeatureStage(base, "cpu").key == TextFeatureStage({**base, "cut": 0}, "cpu").key
    assert TextFeatureStage({**base, "cut": 2}, "cpu").key != TextFeatureStage(base, "cpu").key
    with pytest.raises(Exception, match="layers"):
        TextFeatureStage({**base, "cut": 1, "layers": [-1, -2]}, "cpu")
    # memory off keeps the cut's key; on, it is a key of its own; without a cut it does nothing
    cut2 = TextFeatureStage({**base, "cut": 2}, "cpu").key
    assert TextFeatureStage({**base, "cut": 2, "memory": False}, "cpu").key == cut2
    assert TextFeatureStage({**base, "cut": 2, "memory": True}, "cpu").key != cut2
    assert TextFeatureStage({**base, "memory": True}, "cpu").key == TextFeatureStage(base, "cpu").key


def test_cached_states_through_the_cached_layers_give_the_encoder_output(tmp_path, small_source, tiny_bert3):
    """cut-level states (from the cache) + the cached top layers == the frozen encoder's last layer."""
    from camim import chain
    from stages.features.text import TextFeatureStage, mark_tokens, sentence_item_key
    from stages.train.tuned_top import TunedTop, load_top, top_dims

    s = _settings(tmp_path, small_source, tiny_bert3, cut=2)
    ds, _, feats = chain.features(s)
    meta, state = load_top(feats.cache.files_dir)
    assert meta["layers"] == 2 and meta["first_layer"] == 1 and "0.attention.self.query.weight" in state
    rec = ds.records.to_pylist()[0]
    cached = feats.cache.tensors([sentence_item_key(rec)], ["word"])["word"][0].float()
    top = TunedTop({"sent_word": 16, **top_dims(meta)})
    top.load_cached(state)
    top.eval()
    with torch.no_grad():
        y, _ = top(cached[None], torch.ones(1, cached.shape[0], dtype=torch.bool), None, None)
    st = TextFeatureStage({"model": str(tiny_bert3), "compute_dtype": "fp32"}, "cpu")
    st.setup()
    words, _ = mark_tokens(rec["tokens"], (rec["h_start"], rec["h_end"]), (rec["t_start"], rec["t_end"]), "punct")
    enc = st.tok([words], is_split_into_words=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        full = st.model(**enc).last_hidden_state[0]
    assert y.shape[1] == full.shape[0]
    assert torch.allclose(y[0], full, atol=2e-2), (y[0] - full).abs().max()


def test_joint_reading_lets_the_sentence_read_the_caption():
    from stages.train.tuned_top import TunedTop

    dims = {"sent_word": 8, "top_layers": 1, "top_heads": 2, "top_ffn": 16, "top_eps": 1e-12}
    torch.manual_seed(0)
    s, c = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    sm, cm = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    for joint in (True, False):
        top = TunedTop(dims, joint=joint).eval()
        a, _ = top(s, sm, c, cm)
        b, _ = top(s, sm, c + 1.0, cm)
        assert (not torch.allclose(a, b)) is joint
    # a masked-out caption changes nothing in joint reading
    top = TunedTop(dims, joint=True).eval()
    none = torch.zeros(2, 4, dtype=torch.bool)
    a, _ = top(s, sm, c, none)
    b, _ = top(s, sm, c * 5, none)
    assert torch.allclose(a, b)


def test_train_with_the_tuned_top_reads_only_the_cache(tmp_path, small_source, tiny_bert3, monkeypatch):
    import transformers

    import camim
    from camim import chain
    from stages.train.trainer import param_groups, train_one

    s = _settings(tmp_path, small_source, tiny_bert3, cut=2, train={"top_lr": 1e-4})
    chain.features(s)

    def boom(*a, **k):
        raise AssertionError("the train stage must never load an encoder")

    for name in ("AutoModel", "AutoTokenizer", "BertModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", boom)
    data = camim.load(s, "imported:qwen", "cam")
    assert data.dims["top_layers"] == 2 and "cap_word" in data.dims
    res = train_one(s, "imported:qwen", 1, data=data, quiet=True)
    assert res.config["dims"]["top_layers"] == 2 and 0.0 <= res.metrics["test"]["f1"] <= 1.0
    # the tuned layers started from the cached weights and then moved, at their own learning rate
    from safetensors.torch import load_file

    from stages.train.cam import CamHead

    trained = load_file(str(res.dir / "model.safetensors"))
    cached = data.pretrained["text_top"][1]
    assert not torch.equal(trained["top.layers.0.q.weight"], cached["0.attention.self.query.weight"])
    head = CamHead(data.dims, len(data.labels), {"hidden": 16, "heads": 2, "top_lr": 1e-4})
    lrs = sorted({g.get("lr", 3e-3) for g in param_groups(head, 0.01, 3e-3)})
    assert lrs == [1e-4, 3e-3]


def test_vecmner_trains_with_the_tuned_top(tmp_path, tiny_bert3):
    from camim.graph import inputs_for
    from stages.train.ner import build_ner_data
    from stages.train.trainer import train_one
    from tests.stages.train.test_ner_train import small_twitter

    conf = extend(load_profile("offline"), {"text": {"model": str(tiny_bert3), "cut": 1, "compute_dtype": "fp32"},
                                            "train": {"epochs": 1, "d": 16, "heads": 2, "ffn": 32}})
    s = Settings(task="twitter17", source=str(small_twitter(tmp_path)), cache_dir=tmp_path / "c", mllm="none", conf=conf)
    data = build_ner_data(s, "none", inputs_for(s, "none"))
    assert data.dims["top_layers"] == 1 and data.dims["text_levels"] == 1
    res = train_one(s, "none", 1, {"head": "vecmner"}, data=data, quiet=True)
    assert res.config["dims"]["top_layers"] == 1 and 0.0 <= res.metrics["test"]["f1"] <= 1.0


def test_remote_reads_through_the_tuned_top():
    """REMOTE with a cut: the tuned copies run first (joint with the caption), load the cached
    weights, learn at top_lr, and get gradients from the REMOTE loss."""
    from stages.train.remote import RemoteHead
    from stages.train.trainer import param_groups

    torch.manual_seed(0)
    dims = {"sent_word": 16, "cap_word": 16, "text_levels": 1, "top_layers": 1, "top_heads": 2, "top_ffn": 32, "top_eps": 1e-12}
    head = RemoteHead(dims, 5, {"d": 16, "heads": 2, "top_lr": 1e-4})
    assert head.top is not None and len(head.top.layers) == 1
    cached = {f"0.{name}.{kind}": torch.randn_like(p) for name, short in BERT_NAMES.items()
              for kind, p in getattr(head.top.layers[0], short).named_parameters()}
    head.load_pretrained({"text_top": ({}, cached)})
    assert torch.equal(head.top.layers[0].q.weight, cached["0.attention.self.query.weight"])
    b, n, m = 3, 6, 4
    batch = {"sent_word": torch.randn(b, n, 16), "sent_mask": torch.ones(b, n, dtype=torch.bool),
             "cap_word": torch.randn(b, m, 16), "cap_mask": torch.ones(b, m, dtype=torch.bool),
             "h_idx": torch.tensor([0, 1, 2]), "t_idx": torch.tensor([3, 4, 5]), "label": torch.tensor([0, 1, 4])}
    batch["cap_mask"][0, 2:] = False
    out = head(batch)
    out["loss"].backward()
    assert head.top.layers[0].q.weight.grad.abs().sum() > 0 and head.top.segment.grad.abs().sum() > 0
    lrs = sorted({g.get("lr", 1e-3) for g in param_groups(head, 0.01, 1e-3)})
    assert lrs == [1e-4, 1e-3]
    frozen = RemoteHead(dims, 5, {"d": 16, "heads": 2, "tune_top": False})
    assert frozen.top is None


def test_memory_reading_reads_the_frozen_caption_and_never_updates_it():
    """joint = "memory": the sentence attends to the caption's frozen states (keys and values only);
    the caption output is the frozen pretrained top's, and precomputed levels give the same result."""
    from stages.train.tuned_top import TunedTop

    dims = {"sent_word": 8, "top_layers": 2, "top_heads": 2, "top_ffn": 16, "top_eps": 1e-12}
    torch.manual_seed(0)
    ref = TunedTop(dims, joint=False)
    cached = {f"{i}.{name}.{kind}": p.detach().clone() for i in range(2) for name, short in BERT_NAMES.items()
              for kind, p in getattr(ref.layers[i], short).named_parameters()}
    top = TunedTop(dims, joint="memory")
    top.load_cached(cached)
    ref.load_cached(cached)
    top.train()
    assert not top.frozen.training and not any(p.requires_grad for p in top.frozen.parameters())
    top.eval()
    ref.eval()
    s, c = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    sm, cm = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    sm[1, 3:] = False
    cm[0, 2:] = False
    a, ca = top(s, sm, c, cm)
    b, _ = top(s, sm, c + 1.0, cm)
    assert not torch.allclose(a, b)  # the sentence reads the caption
    # the caption side is the pretrained layers' output on the caption alone
    assert torch.allclose(ca, ref.run(c, cm), atol=1e-5)
    # no caption keys: exactly the text-only pass
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.allclose(top(s, sm, c, none)[0], ref.run(s, sm), atol=1e-5)
    # precomputed levels (what prepare_data stores) == computed on the fly
    lv = top.caption_levels(c, cm)
    assert lv.shape == (2, 4, 16)
    assert torch.allclose(top(s, sm, c, cm, lv)[0], a)
    # training moves the tuned layers, never the frozen ones
    top.train()
    out, _ = top(s, sm, c, cm)
    out.sum().backward()
    assert top.layers[0].k.weight.grad.abs().sum() > 0 and top.segment.grad.abs().sum() > 0
    assert all(p.grad is None for p in top.frozen.parameters())
    with pytest.raises(Exception, match="joint"):
        TunedTop(dims, joint="both")


def test_gated_memory_starts_as_the_text_only_encoder_and_learns_its_gates():
    """mem_gate: tanh(0) = 0, so at the start the sentence reads nothing of the caption (exactly the
    text-only pass); the gates get a gradient, a moved gate lets the caption in, a captionless row stays finite."""
    from stages.train.tuned_top import TunedTop

    dims = {"sent_word": 8, "top_layers": 2, "top_heads": 2, "top_ffn": 16, "top_eps": 1e-12}
    torch.manual_seed(0)
    top = TunedTop(dims, joint="memory", mem_gate=True)
    cached = {f"{i}.{name}.{kind}": p.detach().clone() for i in range(2) for name, short in BERT_NAMES.items()
              for kind, p in getattr(top.layers[i], short).named_parameters()}
    top.load_cached(cached)
    s, c = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    sm, cm = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    cm[1] = False  # the second sample has no caption
    top.eval()
    text_only = top.run(s, sm)
    assert torch.equal(top(s, sm, c, cm)[0], text_only)
    top.train()
    top.layers.requires_grad_(False)  # no dropout noise in the check below: read the gates' gradient only
    for layer in top.layers:
        layer.p = layer.pa = 0.0
    top(s, sm, c, cm)[0].square().sum().backward()
    assert top.gates.grad.abs().sum() > 0
    with torch.no_grad():
        top.gates.fill_(1.0)
    top.eval()
    out = top(s, sm, c, cm)[0]
    assert torch.isfinite(out).all() and not torch.allclose(out[0], text_only[0])
    assert torch.allclose(out[1], text_only[1], atol=1e-6)  # no caption: nothing read
    assert TunedTop(dims, joint=True, mem_gate=True).gates is None  # gates memory reading only


def test_train_with_memory_reading_precomputes_the_caption_states(tmp_path, small_source, tiny_bert3):
    import camim
    from stages.train.trainer import train_one

    s = _settings(tmp_path, small_source, tiny_bert3, cut=2, text={"memory": False}, train={"joint": "memory"})
    data = camim.load(s, "imported:qwen", "cam")
    assert data.cap_levels is None  # text.memory off: the head computes them, once per run
    res = train_one(s, "imported:qwen", 1, data=data, quiet=True)
    # one stored row per distinct caption (records of one image share it), then an empty one
    n_distinct = int(data.cap_id.max()) + 1
    assert data.cap_levels is not None and data.cap_levels.off.shape == (n_distinct + 2,)
    first = {int(u): r for r, u in reversed(list(enumerate(data.cap_id.tolist()))) if u >= 0}
    lens = data.cap.off[1:] - data.cap.off[:-1]
    assert data.cap_levels.flat.shape == (int(sum(lens[r] for r in first.values())), 2 * 16)
    assert res.config["options"]["joint"] == "memory" and 0.0 <= res.metrics["test"]["f1"] <= 1.0
    b = data.batch(data.splits["train"][:4])
    assert b["cap_levels"].shape[:2] == b["cap_word"].shape[:2]
    from safetensors.torch import load_file

    trained = load_file(str(res.dir / "model.safetensors"))
    cached = data.pretrained["text_top"][1]
    assert torch.equal(trained["top.frozen.1.fc2.weight"], cached["1.output.dense.weight"])
    assert not torch.equal(trained["top.layers.0.k.weight"], cached["0.attention.self.key.weight"])


def test_prepare_data_computes_each_distinct_caption_once_and_spreads_it():
    from types import SimpleNamespace

    from stages.train.data import Ragged
    from stages.train.tuned_top import TopHead, TunedTop

    dims = {"sent_word": 8, "top_layers": 2, "top_heads": 2, "top_ffn": 16, "top_eps": 1e-12, "cap_word": 8}
    torch.manual_seed(0)
    head = TopHead()
    head.top = TunedTop(dims, joint="memory").eval()
    a, b = torch.randn(3, 8), torch.randn(2, 8)
    # records: caption A, no caption, A again (same image), B
    data = SimpleNamespace(cap=Ragged.from_list([a, torch.zeros(0, 8), a, b], 8), cap_id=torch.tensor([0, -1, 0, 1]),
                           dims=dims)
    calls = []
    real = head.top.caption_levels
    head.top.caption_levels = lambda c, m: calls.append(int(m.shape[0])) or real(c, m)
    head.prepare_data(data)
    assert calls == [2]  # A and B, once each
    one = lambda x: real(x[None], torch.ones(1, x.shape[0], dtype=torch.bool))[0]  # noqa: E731
    # stored once per distinct caption (A, B, then the empty row); read per record through the index
    assert data.cap_levels.flat.shape == (5, 16) and data.cap_levels.off.tolist() == [0, 3, 5, 5]
    assert data.cap_levels.index.tolist() == [0, 2, 0, 1]
    got, mask = data.cap_levels.pad(torch.arange(4))
    assert torch.equal(mask, data.cap.pad(torch.arange(4))[1])
    for r, x in enumerate([one(a), None, one(a), one(b)]):
        if x is None:
            assert not mask[r].any() and not got[r].any()
        else:
            assert torch.allclose(got[r, : x.shape[0]], x, atol=1e-5)


def test_cached_caption_memory_matches_the_frozen_pass_and_skips_it(tmp_path, small_source, tiny_bert3):
    """text.memory = true: the features store each caption's top-layer states; the trainer reads them
    instead of running the frozen copy, and they agree with that copy's output."""
    import camim
    from stages.train.tuned_top import TopHead

    s_mem = _settings(tmp_path / "m", small_source, tiny_bert3, cut=2, text={"memory": True}, train={"joint": "memory"})
    s_run = _settings(tmp_path / "r", small_source, tiny_bert3, cut=2, text={"memory": False}, train={"joint": "memory"})
    cached = camim.load(s_mem, "imported:qwen", "cam")
    assert cached.cap_levels is not None  # from the cache, before any head exists
    ran = camim.load(s_run, "imported:qwen", "cam")
    assert ran.cap_levels is None
    from stages.train import HEADS

    head = HEADS.get("cam")(ran.dims, len(ran.labels), {"joint": "memory"})
    head.load_pretrained(ran.pretrained)
    head.prepare_data(ran)
    rows = ran.splits["train"][:8]
    a, am = cached.cap_levels.pad(rows)
    b, bm = ran.cap_levels.pad(rows)
    assert torch.equal(am, bm) and am.any()
    # the encoder's own layers (features, stored float16) against the copy over float16 cut states
    assert torch.allclose(a.float(), b.float(), atol=2e-2), float((a.float() - b.float()).abs().max())
    calls = []
    head2 = HEADS.get("cam")(cached.dims, len(cached.labels), {"joint": "memory"})
    head2.load_pretrained(cached.pretrained)
    head2.top.caption_levels = lambda *x: calls.append(1)
    before = cached.cap_levels
    TopHead.prepare_data(head2, cached)
    assert calls == [] and cached.cap_levels is before


def test_dropout_mask_keeps_one_minus_p_unbiased_and_follows_the_torch_seed():
    from stages.train.tuned_top import dropout, keep_mask

    torch.manual_seed(3)
    keep, scale = keep_mask((1001, 999), 0.1, "cpu")  # an odd count: the last 64-bit draw is split
    assert keep.shape == (1001, 999) and keep.dtype == torch.bool
    rate = keep.double().mean().item()
    assert abs(rate - 0.9) < 0.002  # 1e6 draws: the std of the rate is 3e-4
    assert scale == pytest.approx(1 / (1 - 6554 / 65536))  # p rounded to 16 bits
    x = torch.ones(1000, 1000)
    assert dropout(x, 0.1, True).mean().item() == pytest.approx(1.0, abs=0.003)  # unbiased in expectation
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    torch.manual_seed(3)
    again, _ = keep_mask((1001, 999), 0.1, "cpu")
    assert torch.equal(keep, again)  # seed_all and the checkpoint's RNG state fix it
    assert not torch.equal(keep, keep_mask((1001, 999), 0.1, "cpu")[0])
    # rows are not copies of each other (the 16-bit slices of one draw are independent bits)
    assert (keep[0] != keep[1]).any() and (keep[:, 0] != keep[:, 1]).any()


def test_written_out_attention_is_sdpa_without_dropout_and_drops_with_it():
    import torch.nn.functional as F

    from stages.train.tuned_top import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 5, 8, generator=g) for _ in range(3))
    keep = torch.rand(3, 5, generator=g) < 0.6
    keep[:, 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    assert torch.allclose(attention(q, k, v, keep, 0.0), ref, atol=1e-5)
    torch.manual_seed(1)
    dropped = attention(q, k, v, keep, 0.5)
    assert not torch.allclose(dropped, ref, atol=1e-3)
    # masked keys get no weight, with or without dropout: changing their values changes nothing
    v2 = v.clone()
    v2[~keep[:, None, :, None].expand_as(v2)] = 100.0
    torch.manual_seed(1)
    assert torch.allclose(attention(q, k, v2, keep, 0.5), dropped)
