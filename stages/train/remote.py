"""``HEAD=remote``: REMOTE (ACM MM 2025) for unified multimodal RE, as a head over cached
frozen features.

Input batch (all from caches; the RE batch of ``stages.train``):
  * ``sent_word`` ``[B, P, L·D]``: cached word-piece states of the marked sentence at L
    encoder levels (the ``text.layers`` of the profile, concatenated;
    ``dims["text_levels"] = L``), ``sent_mask``;
  * ``h_idx`` / ``t_idx`` ``[B]``: piece index of each argument's opening marker
    (REMOTE reads ``<s1>``/``<s2>``); ignored for an object argument;
  * ``cap_word`` ``[B, C, L·D]`` / ``cap_mask``: word pieces of the image caption (optional):
    with the objects they form the visual stream (MNRE has no objects, so there the
    caption is the whole visual stream, as CAMIM's caption stream);
  * ``obj_vec`` ``[B, O, Dv]`` crop features, ``obj_box`` ``[B, O, 4]`` normalised
    ``x1, y1, x2, y2`` (zeros when absent), ``obj_mask``, and ``h_obj`` / ``t_obj`` ``[B]``: the object slot of
    an argument that is a visual object (``[OBJk]``), -1 for a textual argument;
  * ``h_desc`` / ``t_desc`` ``[B, Dd]`` + ``*_desc_mask``: the pooled feature of each
    argument's description (the entity gloss or object caption; REMOTE's ``<k*>``/``<o*>``
    segment), optional;
  * ``label`` ``[B]``.

Computation (REMOTE section / released code in brackets):
  1. per-level adapters: Linear → d + LayerNorm for every text level and caption level;
     object tokens = LN(W_o · crop + W_box · [x1, y1, x2, y2, area]) (box embedding as
     released), added to every visual level;
  2. **multilevel OT** per modality: level l is the target, levels 0..l-1 the source;
     cosine cost between projected states, log-domain Sinkhorn (``ot.py``), barycentric
     map, ``X_l ← X_l + α_l · T̂ S`` with α_l = 1 at start, sequential over levels
     (post hoc over cached levels rather than inside the encoder);
  3. **multilevel cross-attention + MoE**, both directions: the final text states attend
     to every visual level (one cross-attention per level), a per-token router
     ``softmax(W_r [x; c_0 … c_{L-1}])`` weighs an identity slot and L residual experts
     ``x + W2 GELU(W1 [x; c_l])``; the same from the visual tokens to the text levels.
     ``moe_balance > 0`` adds a Switch-style balancing loss (slots · Σ f_k P_k; the
     release has none, so it defaults to 0);
  4. argument = ``MM([state; description])`` (text: the marker state; object: its final
     visual token), logits = ``Linear([r_h; r_t])``; cross-entropy.  Unlike the release,
     the classifier and MM are trained (the release leaves them at random init).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ot import barycentric, cosine_cost, sinkhorn_log
from .tuned_top import TOP_OPTIONS, TopHead

DEFAULTS = {
    "d": 256,
    "heads": 4,
    "dropout": 0.1,
    "ot": True,
    "ot_eps": 0.1,
    "ot_iters": 50,
    "moe_balance": 0.0,
    "levels": None,  # which cached levels to use (indices; default all)
}


class MOT(nn.Module):
    """Sequential multilevel OT over the levels of one modality."""

    def __init__(self, levels: int, d: int, eps: float, iters: int):
        super().__init__()
        self.q = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d)) for _ in range(levels))
        self.k = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d)) for _ in range(levels))
        self.alpha = nn.Parameter(torch.ones(levels))
        self.eps, self.iters = eps, iters

    def forward(self, xs: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        out = [xs[0]]
        for lvl in range(1, len(xs)):
            src = torch.cat(out, 1)
            smask = mask.repeat(1, lvl)
            cost = cosine_cost(self.q[lvl](xs[lvl]), self.k[lvl](src))
            T = barycentric(sinkhorn_log(cost, mask, smask, self.eps, self.iters), mask, smask)
            out.append(xs[lvl] + self.alpha[lvl] * (T.to(src.dtype) @ src))
        return out


class MultiLevelMoE(nn.Module):
    """Queries attend to each level of the other modality; a router mixes an identity
    slot and one residual expert per level."""

    def __init__(self, levels: int, d: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True) for _ in range(levels))
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(levels))
        self.router = nn.Linear((levels + 1) * d, levels + 1)
        self.w1 = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(levels))
        self.w2 = nn.ModuleList(nn.Linear(d, d) for _ in range(levels))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, xmask, kvs: list[torch.Tensor], kvmask):
        has = kvmask.any(1)  # samples with anything to attend to
        safe = kvmask.clone()
        safe[~has, 0] = True  # keep attention defined; the result is zeroed below
        cs = []
        for lvl, kv in enumerate(kvs):
            c = self.attn[lvl](x, kv, kv, key_padding_mask=~safe, need_weights=False)[0]
            cs.append(self.ln[lvl](c) * has[:, None, None])
        g = F.softmax(self.router(torch.cat([x] + cs, -1)), -1)
        g = torch.where(has[:, None, None], g, F.one_hot(torch.zeros_like(g[..., 0], dtype=torch.long), g.shape[-1]).to(g.dtype))
        y = g[..., :1] * x
        for lvl, c in enumerate(cs):
            e = x + self.w2[lvl](self.drop(F.gelu(self.w1[lvl](torch.cat([x, c], -1)))))
            y = y + g[..., lvl + 1 : lvl + 2] * e
        # Switch-style balance over the tokens that had something to route
        tok = xmask & has[:, None]
        if tok.any():
            gp = g[tok]
            f = F.one_hot(gp.argmax(-1), gp.shape[-1]).float().mean(0)
            bal = gp.shape[-1] * (f * gp.mean(0)).sum()
        else:
            bal = x.new_zeros(())
        return y, bal, g


class RemoteHead(TopHead, nn.Module):
    """REMOTE-lite; the batch comes from the task's dataset (``re`` for MNRE, ``umre``).  With
    ``text.cut = k`` > 0, copies of the encoder's last k layers read sentence and caption jointly
    first (``TOP_OPTIONS``), and the head runs on their output (one level)."""

    OPTIONS = {**DEFAULTS, **TOP_OPTIONS}

    def __init__(self, dims: dict, n_labels: int, options: dict | None = None):
        super().__init__()
        o = {**self.OPTIONS, **(options or {})}
        self.o = o
        self.init_top(dims, o)
        d = int(o["d"])
        L = int(dims.get("text_levels", 1))
        if int(dims["sent_word"]) % L:
            raise ValueError(f"word width {dims['sent_word']} is not a multiple of {L} levels")
        self.L_all = L
        self.use = list(range(L)) if o["levels"] is None else [int(i) % L for i in o["levels"]]
        L = len(self.use)
        self.L = L
        D = int(dims["sent_word"]) // self.L_all
        self.t_in = nn.ModuleList(nn.Sequential(nn.Linear(D, d), nn.LayerNorm(d)) for _ in range(L))
        self.cap_in = None
        if dims.get("cap_word"):
            self.cap_in = nn.ModuleList(nn.Sequential(nn.Linear(int(dims["cap_word"]) // self.L_all, d), nn.LayerNorm(d)) for _ in range(L))
        self.obj_in = None
        if dims.get("obj_vec"):
            self.obj_in = nn.Linear(int(dims["obj_vec"]), d)
            self.box_in = nn.Linear(5, d)
            self.obj_ln = nn.LayerNorm(d)
        self.desc_in = nn.Linear(int(dims["desc"]), d) if dims.get("desc") else None
        self.t_ot = MOT(L, d, float(o["ot_eps"]), int(o["ot_iters"])) if o["ot"] and L > 1 else None
        self.v_ot = MOT(L, d, float(o["ot_eps"]), int(o["ot_iters"])) if o["ot"] and L > 1 else None
        self.v2t = MultiLevelMoE(L, d, int(o["heads"]), float(o["dropout"]))
        self.t2v = MultiLevelMoE(L, d, int(o["heads"]), float(o["dropout"]))
        self.mm = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(float(o["dropout"]))
        self.cls = nn.Linear(2 * d, n_labels)
        self.d = d

    def _levels(self, x, proj):
        xs = x.view(*x.shape[:-1], self.L_all, -1)
        return [proj[i](xs[..., lvl, :].float()) for i, lvl in enumerate(self.use)]

    def _visual(self, batch, B, device):
        """Visual tokens per level ``[B, V, d]`` and their mask (V may be 0)."""
        parts, masks = [[] for _ in range(self.L)], []
        n_obj = 0
        if self.obj_in is not None and "obj_vec" in batch:
            box = batch["obj_box"].float() if "obj_box" in batch else batch["obj_vec"].new_zeros(*batch["obj_vec"].shape[:2], 4)
            area = ((box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)).unsqueeze(-1)
            ob = self.obj_ln(self.obj_in(batch["obj_vec"].float()) + self.box_in(torch.cat([box, area], -1)))
            for lvl in range(self.L):
                parts[lvl].append(ob)
            masks.append(batch["obj_mask"].bool())
            n_obj = ob.shape[1]
        if self.cap_in is not None and "cap_word" in batch:
            for lvl, c in enumerate(self._levels(batch["cap_word"], self.cap_in)):
                parts[lvl].append(c)
            masks.append(batch["cap_mask"].bool())
        if not masks:
            z = torch.zeros(B, 0, self.d, device=device)
            return [z] * self.L, torch.zeros(B, 0, dtype=torch.bool, device=device), 0
        return [torch.cat(p, 1) for p in parts], torch.cat(masks, 1), n_obj

    def forward(self, batch: dict) -> dict:
        batch = self.tuned(batch, with_caption=self.cap_in is not None)
        tm = batch["sent_mask"].bool()
        B, device = tm.shape[0], tm.device
        xs = self._levels(batch["sent_word"], self.t_in)
        vs, vm, n_obj = self._visual(batch, B, device)
        if self.t_ot is not None:
            xs = self.t_ot(xs, tm)
        bal = xs[0].new_zeros(())
        if vm.shape[1]:
            if self.v_ot is not None:
                vs = self.v_ot(vs, vm)
            yt, b1, _ = self.v2t(xs[-1], tm, vs, vm)
            yv, b2, _ = self.t2v(vs[-1], vm, xs, tm)
            bal = b1 + b2
        else:
            yt, yv = xs[-1], vs[-1]
        ar = torch.arange(B, device=device)
        reps = []
        for role in ("h", "t"):
            r = yt[ar, batch[f"{role}_idx"].long().clamp(min=0)]
            slot = batch.get(f"{role}_obj")
            if slot is not None and n_obj:
                is_obj = slot >= 0
                rv = yv[ar, slot.long().clamp(min=0, max=n_obj - 1)]
                r = torch.where(is_obj[:, None], rv, r)
            desc = torch.zeros_like(r)
            if self.desc_in is not None and f"{role}_desc" in batch:
                desc = self.desc_in(batch[f"{role}_desc"].float()) * batch[f"{role}_desc_mask"].float()[:, None]
            reps.append(self.mm(torch.cat([r, desc], -1)))
        logits = self.cls(self.drop(torch.cat(reps, -1)))
        out = {"logits": logits, "aux": {"moe_balance": bal.detach()}}
        if "label" in batch:
            ce = F.cross_entropy(logits, batch["label"].long())
            out["aux"]["ce"] = ce.detach()
            out["loss"] = ce + float(self.o["moe_balance"]) * bal
        return out

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        return self.forward({k: v for k, v in batch.items() if k != "label"})["logits"].argmax(-1)

