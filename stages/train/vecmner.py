"""``HEAD=vecmner``: VEC-MNER (ICMR 2024) rebuilt as a head over cached frozen features.

Input batch (the NER batch of ``stages.train.ner``):
  * ``sent_word`` ``[B, P, L·D]`` cached word-piece states (L cached encoder levels,
    concatenated; ``dims["text_levels"] = L``), ``sent_mask`` ``[B, P]``;
  * ``first`` / ``first_mask`` ``[B, W]``: each word's first piece (first-piece labelling);
  * ``shape`` ``[B, W]`` word-shape ids (optional feature, ``options["shape_dim"]``);
  * ``cap_word`` ``[B, V, L·D]`` / ``cap_mask``: the visual token sequence, optional.
    Here the word pieces of the image caption (no Twitter images are reachable); image
    or crop tokens of the same width fit the same slot.  Without it the head is
    text-only (the CAA block and the contrastive loss switch off, CADF blocks reduce to
    self-attention);
  * ``label`` ``[B, W]`` tag ids (-100 = padding).

Blocks, after the paper (section numbers of the released code in brackets):
  * level mix: a learned softmax-weighted sum of the L cached levels (ELMo-style), then
    Linear → d, LayerNorm;
  * NEFTune-style uniform noise ±alpha/sqrt(P·d) on both input sequences in training;
  * optional BiLSTM over the pieces (``encoder="bilstm"``), our addition for frozen
    features;
  * **CA** (correlation-aware) re-weighting of visual keys: per-token mean, max and
    SoftPool over channels → shared ``W1: V→r`` + ReLU → ``W2: r→V`` → a gate per
    visual token (``ca_gate = sigmoid`` as in the paper's figure, or ``softmax`` over
    tokens as in the released code);
  * **CAA** block: text attends only to the CA-weighted visual keys (used as keys and
    values, as released); vision attends only to text;
  * ``n_cadf`` **CADF** blocks: text keys/values = [CA(visual keys); own], vision
    keys/values = [text; own], padding masked everywhere (the release masks neither);
  * emissions ``Linear(d → tags)`` on first pieces, a CRF (pytorch-crf) over words;
  * symmetric contrastive loss on masked max-pooled text and vision states,
    ``s · v tᵀ`` with ``s = log(1/0.07)`` as a fixed linear scale (as released;
    ``learn_scale=True`` trains it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ner import SHAPES, WordCRF
from .tuned_top import TOP_OPTIONS, TopHead

DEFAULTS = {
    "d": 256,
    "heads": 4,
    "n_cadf": 2,
    "ffn": 4,
    "dropout": 0.1,
    "encoder": "none",     # none | bilstm (slow on CPU; our addition for frozen features)
    "lstm_layers": 1,
    "n_vis": 64,           # visual tokens kept for the CA module (VEC-MNER: 110)
    "ca_reduction": 6,     # W1: n_vis → n_vis/ca_reduction... at least 2 (release: 110 → 6)
    "ca_gate": "sigmoid",  # sigmoid | softmax
    "neftune": 5.0,        # 0 turns the noise off
    "shape_dim": 16,       # 0 turns word-shape features off
    "contrastive": 1.0,    # weight of the symmetric contrastive loss
    "learn_scale": False,
    "levels": None,        # which cached text levels to mix (indices; default all)
    "fast_lr_scale": 10.0,  # CRF + emission layer learning rate = lr × this
}


class CA(nn.Module):
    """Correlation-aware re-weighting of up to ``n`` visual tokens."""

    def __init__(self, n: int, reduction: int, gate: str):
        super().__init__()
        r = max(2, n // reduction) if reduction > 0 else 2
        self.n = n
        self.w1 = nn.Linear(n, r)
        self.w2 = nn.Linear(r, n)
        self.gate = gate

    def forward(self, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # k: [B, V, d] (V <= n), mask [B, V]
        B, V, _ = k.shape
        km = k.masked_fill(~mask.unsqueeze(-1), 0.0)
        a = km.mean(-1)
        m = km.amax(-1)
        s = (F.softmax(km, -1) * km).sum(-1)  # SoftPool over channels
        pad = self.n - V
        a, m, s = (F.pad(x, (0, pad)) for x in (a, m, s))
        e = lambda x: F.relu(self.w1(x))  # noqa: E731 - shared W1
        z = self.w2((e(a) + e(m)) * e(s))[:, :V]
        if self.gate == "softmax":
            w = F.softmax(z.masked_fill(~mask, float("-inf")), -1)
            w = torch.nan_to_num(w, nan=0.0)
        else:
            w = torch.sigmoid(z) * mask
        return k * w.unsqueeze(-1)


class Attn(nn.Module):
    """Multi-head attention over given keys/values with a key padding mask."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.h = heads
        self.out = nn.Linear(d, d)
        self.drop = dropout

    def forward(self, q, k, v, kmask):
        B, Nq, d = q.shape
        split = lambda x: x.view(B, x.shape[1], self.h, d // self.h).transpose(1, 2)  # noqa: E731
        am = kmask[:, None, None, :]
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=am, dropout_p=self.drop if self.training else 0.0)
        o = torch.nan_to_num(o)  # a query with no valid key (never for real text)
        return self.out(o.transpose(1, 2).reshape(B, Nq, d))


class Stream(nn.Module):
    """One stream of a block: q/k/v projections, attention, post-LN FFN (BERT-style)."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn = Attn(d, heads, dropout)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ffn * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn * d, d))
        self.drop = nn.Dropout(dropout)

    def finish(self, x, a):
        x = self.ln1(x + self.drop(a))
        return self.ln2(x + self.drop(self.ff(x)))


class Block(nn.Module):
    """A CAA (``own=False``: each stream attends only to the other) or CADF block
    (``own=True``: [other; own] keys and values)."""

    def __init__(self, d, heads, ffn, dropout, ca: CA, own: bool):
        super().__init__()
        self.t = Stream(d, heads, ffn, dropout)
        self.v = Stream(d, heads, ffn, dropout)
        self.ca = ca
        self.own = own

    def forward(self, t, tm, v=None, vm=None):
        kt, vt = self.t.k(t), self.t.v(t)
        if v is None:  # text only: plain self-attention
            return self.t.finish(t, self.t.attn(self.t.q(t), kt, vt, tm)), None
        kv, vv = self.v.k(v), self.v.v(v)
        kca = self.ca(kv, vm)
        if self.own:
            t_keys, t_vals, t_mask = torch.cat([kca, kt], 1), torch.cat([kca, vt], 1), torch.cat([vm, tm], 1)
            v_keys, v_vals, v_mask = torch.cat([kt, kv], 1), torch.cat([vt, vv], 1), torch.cat([tm, vm], 1)
        else:
            t_keys, t_vals, t_mask = kca, kca, vm
            v_keys, v_vals, v_mask = kt, vt, tm
        t2 = self.t.finish(t, self.t.attn(self.t.q(t), t_keys, t_vals, t_mask))
        v2 = self.v.finish(v, self.v.attn(self.v.q(v), v_keys, v_vals, v_mask))
        return t2, v2


class LevelMix(nn.Module):
    """Softmax-weighted sum of L concatenated levels, then Linear → d and LayerNorm."""

    def __init__(self, dim_in: int, levels: int, d: int, dropout: float, use: list[int] | None = None):
        super().__init__()
        if dim_in % levels:
            raise ValueError(f"feature width {dim_in} is not a multiple of {levels} levels")
        self.levels = levels
        self.use = list(range(levels)) if use is None else [int(i) % levels for i in use]
        self.w = nn.Parameter(torch.zeros(len(self.use)))
        self.gamma = nn.Parameter(torch.ones(()))
        self.proj = nn.Linear(dim_in // levels, d)
        self.ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x.view(*x.shape[:-1], self.levels, -1)
        if len(self.use) != self.levels:
            x = x[..., self.use, :]
        x = self.gamma * (F.softmax(self.w, 0)[:, None] * x).sum(-2)
        return self.drop(self.ln(self.proj(x)))


class VecMnerHead(TopHead, nn.Module):
    dataset = "ner"
    OPTIONS = {**DEFAULTS, **TOP_OPTIONS}
    metrics = "stages.train.ner:ner_metrics"

    def __init__(self, dims: dict, n_labels: int, options: dict | None = None):
        super().__init__()
        o = {**self.OPTIONS, **(options or {})}
        self.o = o
        d = int(o["d"])
        # tuned top (text.cut = k > 0): copies of the encoder's last k layers over the cached cut-level states
        self.init_top(dims, o)
        self.text_in = LevelMix(int(dims["sent_word"]), int(dims.get("text_levels", 1)), d, o["dropout"], o["levels"])
        self.vis_in = None
        if dims.get("cap_word"):
            self.vis_in = LevelMix(int(dims["cap_word"]), int(dims.get("text_levels", 1)), d, o["dropout"], o["levels"])
        self.lstm = None
        if o["encoder"] == "bilstm":
            self.lstm = nn.LSTM(d, d // 2, num_layers=int(o["lstm_layers"]), batch_first=True, bidirectional=True)
        elif o["encoder"] != "none":
            raise ValueError(f"vecmner: encoder must be none or bilstm, not {o['encoder']!r}")
        ca = CA(int(o["n_vis"]), int(o["ca_reduction"]), o["ca_gate"])
        self.ca = ca
        args = (d, int(o["heads"]), int(o["ffn"]), float(o["dropout"]), ca)
        self.caa = Block(*args, own=False)
        self.cadf = nn.ModuleList(Block(*args, own=True) for _ in range(int(o["n_cadf"])))
        sd = int(o["shape_dim"])
        self.shape_emb = nn.Embedding(len(SHAPES), sd, padding_idx=0) if sd else None
        self.drop = nn.Dropout(o["dropout"])
        self.fc = nn.Linear(d + sd, n_labels)
        self.crf = WordCRF(n_labels)
        self.scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=bool(o["learn_scale"]))
        self.fast_lr_scale = float(o["fast_lr_scale"])

    # the CRF and the emission layer learn faster (VEC-MNER: 5e-2 against 3e-5 for the
    # rest); the trainer gives them lr × fast_lr_scale
    def fast_params(self) -> list[nn.Parameter]:
        return list(self.crf.parameters()) + list(self.fc.parameters())

    def _noise(self, x, mask):
        a = float(self.o["neftune"])
        if not self.training or a <= 0:
            return x
        n = mask.sum(1).clamp(min=1).float() * x.shape[-1]
        return x + (torch.rand_like(x) * 2 - 1) * (a / n.sqrt())[:, None, None]

    def encode(self, batch: dict):
        tm = batch["sent_mask"].bool()
        batch = self.tuned(batch, with_caption=self.vis_in is not None)
        sw = batch["sent_word"]
        t = self._noise(self.text_in(sw), tm)
        if self.lstm is not None:
            lens = tm.sum(1).clamp(min=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(t, lens, batch_first=True, enforce_sorted=False)
            t = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=t.shape[1])[0]
        v = vm = None
        if self.vis_in is not None and "cap_word" in batch and batch["cap_mask"].any():
            n = int(self.o["n_vis"])
            v, vm = batch["cap_word"][:, :n], batch["cap_mask"][:, :n].bool()
            v = self._noise(self.vis_in(v), vm)
            t, v = self.caa(t, tm, v, vm)
        for blk in self.cadf:
            t, v = blk(t, tm, v, vm)
        return t, tm, v, vm

    def emissions(self, t, batch):
        idx = batch["first"].clamp(min=0)
        words = t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        feats = [self.drop(words)]
        if self.shape_emb is not None:
            feats.append(self.shape_emb(batch["shape"]))
        return self.fc(torch.cat(feats, -1))

    def contrastive(self, t, tm, v, vm):
        tp = F.normalize(t.masked_fill(~tm.unsqueeze(-1), float("-inf")).amax(1), dim=-1)
        vp = F.normalize(v.masked_fill(~vm.unsqueeze(-1), float("-inf")).amax(1), dim=-1)
        ok = vm.any(1)
        tp, vp = tp[ok], vp[ok]
        if tp.shape[0] < 2:
            return t.new_zeros(())
        logits = self.scale * vp @ tp.T
        target = torch.arange(tp.shape[0], device=t.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def forward(self, batch: dict) -> dict:
        t, tm, v, vm = self.encode(batch)
        em = self.emissions(t, batch)
        out = {"logits": em}
        if "label" in batch:
            mask = batch["first_mask"].bool()
            crf = self.crf.nll(em, batch["label"], mask)
            out["aux"] = {"crf": crf.detach()}
            loss = crf
            if v is not None and float(self.o["contrastive"]) > 0:
                cl = self.contrastive(t, tm, v, vm)
                out["aux"]["contrastive"] = cl.detach()
                loss = loss + float(self.o["contrastive"]) * cl
            out["loss"] = loss
        return out

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        """Tag ids ``[B, W]`` (Viterbi), -1 where there is no word."""
        t, _, _, _ = self.encode(batch)
        return self.crf.decode(self.emissions(t, batch), batch["first_mask"].bool())
