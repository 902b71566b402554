"""The CAM+MI head (CAMIM, ACM MM 2024, sections 3.2-3.4) over cached features.

Streams (``d`` = ``hidden``; every input is projected from its cached width):

* T_W: sentence word pieces, contextualised by ``text_layers`` trainable
  Transformer layers (the text encoder itself is frozen and cached);
* O stream (caption-aware image): sentence level O_s = C_s ⊕ MLP(F_I), where F_I
  is the global image and its object crops; word level: the cross-attention
  module over (O_s tokens, caption words C_W);
* G stream (text-aware translation image): G_s = T_s ⊕ MLP(F_T); word level over
  (G_s tokens, sentence words T_W).

Cross-attention module (one per call, weights shared by the O and G streams as in
the CAMIM code): with S the sentence-level tokens and W the words,
H¹_S = SelfAtt(S), H²_S = CrossAtt(S, W), H¹_W = SelfAtt(W), H²_W = CrossAtt(W, S);
O_F = MLP_O[LN(S + H¹_S + H²_S) ; LN(W + H¹_W + H²_W)] (a sequence).
Fusion: O_final = pool(CrossAtt(O_F, T_W)), G_final likewise, F_final =
MLP_final(O_final ⊕ G_final).  Classifier over [h_start ⊕ h_end ⊕ t_start ⊕
t_end ⊕ F_final] (entity states at the marker pieces of T_W).
Loss = CE + alpha · InfoNCE over the pair chosen by ``mi``.

Every modality may be absent: a missing image/object/translation stream drops its
tokens; a missing caption masks all of C_W.  Attention always has a learned
"null" key, so a query whose keys are all masked attends to it instead of
producing NaN.

Tuned top (``text.cut = k`` > 0 in the profile, see :mod:`stages.train.tuned_top`): the
cached states are those entering the encoder's last ``k`` layers; copies of those
pretrained layers read the sentence and its caption (``joint``: the head's default ``true`` runs
them as one sequence; ``"memory"``, which the offline and paper profiles ship, lets the sentence
read the frozen encoder's caption states, and C_W is those states),
learn at ``top_lr`` (1e-4), and T_W / C_W / the sentence vectors are taken from their
output; the classifier reads the tuned entity-marker states directly.  ``tune_top =
false`` uses the cut-level states frozen.

Options (``[train]``): ``hidden`` (256), ``heads`` (4),
``text_layers`` (1), ``dropout`` (0.1), ``cls_dropout`` (0.5), ``align``
(``W&S`` | ``W`` | ``S``), ``mi`` (``O&G`` | ``(O+G)&F`` | ``T&F`` | ``(O+G)&T`` |
``off``), ``alpha`` (0.1), ``tau`` (1.0, InfoNCE temperature), ``cap_drop`` (0.0: the share of
training samples whose caption is hidden, per batch), ``cap_ens`` (false: predict from the mean of
the class probabilities with the caption and without it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError

from .tuned_top import TOP_OPTIONS, TopHead

ALIGN = ("W&S", "W", "S")
MI_PAIRS = ("O&G", "(O+G)&F", "T&F", "(O+G)&T", "off")


def mlp(d_in: int, d_out: int, d_hidden: int | None = None, dropout: float = 0.0) -> nn.Sequential:
    d_hidden = d_hidden or 2 * d_out
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


class Attention(nn.Module):
    """Multi-head attention with a key padding mask and a learned null key/value."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.att = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.null = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.null, std=0.02)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor) -> torch.Tensor:
        b = kv.shape[0]
        kv = torch.cat([self.null.expand(b, 1, -1).to(kv.dtype), kv], 1)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=kv_mask.device), kv_mask], 1)
        out, _ = self.att(q, kv, kv, key_padding_mask=~valid, need_weights=False)
        return out


class CrossAttentionModule(nn.Module):
    """The CAM word-level module over (S tokens, W words); returns the sequence [S'; W']."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ss, self.sw, self.ws, self.ww = (Attention(d, heads, dropout) for _ in range(4))
        self.ln_s = nn.LayerNorm(d)
        self.ln_w = nn.LayerNorm(d)
        self.out = mlp(d, d, 2 * d, dropout)

    def forward(self, s, s_mask, w, w_mask):
        a = self.ln_s(s + self.ss(s, s, s_mask) + self.sw(s, w, w_mask))
        b = self.ln_w(w + self.ws(w, s, s_mask) + self.ww(w, w, w_mask))
        seq = torch.cat([a, b], 1)
        return seq + self.out(seq), torch.cat([s_mask, w_mask], 1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def info_nce(x: torch.Tensor, y: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """InfoNCE between L2-normalised ``x`` and ``y`` with in-batch negatives (y_i → x)."""
    x = F.normalize(x.float(), dim=-1)
    y = F.normalize(y.float(), dim=-1)
    sim = y @ x.t() / tau
    return F.cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))


def hide_captions(batch: dict, keep: torch.Tensor) -> dict:
    """``batch`` with the caption of every sample where ``keep`` is false hidden whole (mask and
    has-caption flag), as if its MLLM had written none."""
    return {**batch, "cap_mask": batch["cap_mask"] & keep[:, None], "has_cap": batch["has_cap"] & keep}


class CamHead(TopHead, nn.Module):
    dataset = "re"
    #: every option this head reads, with its default (a mistyped --opt key is an error naming these)
    OPTIONS = {"hidden": 128, "heads": 2, "text_layers": 0, "dropout": 0.1, "cls_dropout": 0.5, "align": "W&S",
               "mi": "O&G", "alpha": 0.1, "tau": 1.0, "cap_drop": 0.0, "cap_ens": False, **TOP_OPTIONS}

    def __init__(self, dims: dict, n_labels: int, options: dict | None = None):
        super().__init__()
        o = {**self.OPTIONS, **(options or {})}  # one place for the defaults: OPTIONS
        self.align = str(o["align"])
        self.mi = str(o["mi"])
        if self.align not in ALIGN:
            raise PipelineError(f"train.align must be one of {', '.join(ALIGN)}, not {self.align!r}")
        if self.mi not in MI_PAIRS:
            raise PipelineError(f"train.mi must be one of {', '.join(MI_PAIRS)}, not {self.mi!r}")
        self.alpha = float(o["alpha"])
        self.tau = float(o["tau"])
        self.cap_drop = float(o["cap_drop"])
        if not 0.0 <= self.cap_drop < 1.0:
            raise PipelineError(f"train.cap_drop must be in [0, 1), not {self.cap_drop}")
        self.cap_ens = bool(o["cap_ens"])
        d = int(o["hidden"])
        heads = int(o["heads"])
        p = float(o["dropout"])
        self.dims = dict(dims)
        dt = dims["sent_word"]
        self.text_in = nn.Sequential(nn.Linear(dt, d), nn.LayerNorm(d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, p, batch_first=True, norm_first=True)
        n_layers = int(o["text_layers"])
        self.text_enc = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False) if n_layers else None
        self.sent_in = nn.Linear(dims["sent_vec"], d)
        self.has_cap_stream = "cap_word" in dims
        if self.has_cap_stream:
            self.cap_in = nn.Sequential(nn.Linear(dims["cap_word"], d), nn.LayerNorm(d))
            self.capv_in = nn.Linear(dims["cap_vec"], d)
        # MLP(F_I), MLP(F_T): one per visual stream present (image, objects; translation likewise)
        self.vis = nn.ModuleDict({k: mlp(dims[k], d, 2 * d, p) for k in ("img_vec", "obj_vec", "trans_vec", "trans_obj_vec") if k in dims})
        # sentence-level alignment: fuse the sentence vector into each visual token
        self.fuse_s = nn.Linear(2 * d, d)
        self.null_tok = nn.Parameter(torch.zeros(1, 1, d))
        self.cam = CrossAttentionModule(d, heads, p)
        self.s_only = mlp(d, d, 2 * d, p)
        self.fusion = Attention(d, heads, p)
        self.final = mlp(2 * d, d, 2 * d, p)
        self.drop = nn.Dropout(float(o["cls_dropout"]))
        # tuned top (text.cut = k > 0 and tune_top): copies of the encoder's last k layers read the
        # sentence and the caption jointly; the classifier then sees their entity-marker states as is
        self.init_top(dims, o)
        ent_w = 4 * dt if self.top is not None else 4 * d
        self.cls = nn.Linear(ent_w + d, n_labels)
        self.d = d

    # -- streams --------------------------------------------------------------
    def _visual_tokens(self, batch, vec: str, has: str, objs: str, obj_mask: str):
        toks, masks = [], []
        if vec in self.vis and vec in batch:
            toks.append(self.vis[vec](batch[vec]).unsqueeze(1))
            masks.append(batch[has].unsqueeze(1))
        if objs in self.vis and objs in batch:
            toks.append(self.vis[objs](batch[objs]))
            masks.append(batch[obj_mask])
        return toks, masks

    def _sentence_level(self, sent_vec, toks, masks, b, device, dtype):
        """O_s / G_s as a token sequence: sentence vector ⊕ MLP(visual) per token."""
        use_s = "S" in self.align
        if toks:
            v = torch.cat(toks, 1)
            m = torch.cat(masks, 1)
            if use_s:
                v = self.fuse_s(torch.cat([v, sent_vec.unsqueeze(1).expand_as(v)], -1))
            if use_s:  # the sentence vector itself is a token too (it is all there is without images)
                v = torch.cat([sent_vec.unsqueeze(1), v], 1)
                m = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=device), m], 1)
            return v, m
        if use_s:
            return sent_vec.unsqueeze(1), torch.ones(b, 1, dtype=torch.bool, device=device)
        return self.null_tok.expand(b, 1, -1).to(dtype), torch.ones(b, 1, dtype=torch.bool, device=device)

    def _stream(self, s, s_mask, w, w_mask, text, text_mask):
        if "W" in self.align:
            seq, mask = self.cam(s, s_mask, w, w_mask)
        else:
            seq, mask = s + self.s_only(s), s_mask
        fused = self.fusion(seq, text, text_mask)
        return torch.tanh(masked_mean(fused, mask))

    def encode(self, batch: dict) -> dict:
        sw, sm = batch["sent_word"], batch["sent_mask"]
        b, device = sw.shape[0], sw.device
        has_cap = self.has_cap_stream and "cap_word" in batch
        cw, cvec = (batch["cap_word"], batch["cap_vec"]) if has_cap else (None, None)
        svec = batch["sent_vec"]
        if self.top is not None:  # cut-level states through the tuned layers; vectors from their output
            sw, cw = self.top(sw, sm, cw, batch["cap_mask"] if has_cap else None, batch.get("cap_levels") if has_cap else None)
            svec = masked_mean(sw, sm)
            if has_cap:
                cvec = masked_mean(cw, batch["cap_mask"])
        t = self.text_in(sw)
        if self.text_enc is not None:
            t = self.text_enc(t, src_key_padding_mask=~sm)
        dtype = t.dtype
        t_s = self.sent_in(svec)
        if has_cap:
            c_w, c_m = self.cap_in(cw), batch["cap_mask"]
            c_s = self.capv_in(cvec) * batch["has_cap"].unsqueeze(-1).to(dtype)
        else:
            c_w = torch.zeros(b, 1, self.d, dtype=dtype, device=device)
            c_m = torch.zeros(b, 1, dtype=torch.bool, device=device)
            c_s = torch.zeros(b, self.d, dtype=dtype, device=device)
        o_toks, o_masks = self._visual_tokens(batch, "img_vec", "has_img", "obj_vec", "obj_mask")
        g_toks, g_masks = self._visual_tokens(batch, "trans_vec", "has_trans", "trans_obj_vec", "trans_obj_mask")
        o_s, o_sm = self._sentence_level(c_s, o_toks, o_masks, b, device, dtype)
        g_s, g_sm = self._sentence_level(t_s, g_toks, g_masks, b, device, dtype)
        o_final = self._stream(o_s, o_sm, c_w, c_m, t, sm)
        g_final = self._stream(g_s, g_sm, t, sm, t, sm)
        f_final = self.final(torch.cat([o_final, g_final], -1))
        ar = torch.arange(b, device=device)
        e = sw if self.top is not None else t
        ent = torch.cat([e[ar, batch["h_idx"]], e[ar, batch["h_end"]], e[ar, batch["t_idx"]], e[ar, batch["t_end"]]], -1)
        return {"O": o_final, "G": g_final, "F": f_final, "T": masked_mean(t, sm), "rep": torch.cat([ent, f_final], -1)}

    def drop_captions(self, batch: dict) -> dict:
        """Caption dropout (training only): each sample loses its caption with probability ``cap_drop``,
        as if its MLLM had written none, so the head cannot lean on captions it will find unhelpful."""
        if not (self.training and self.cap_drop > 0 and "cap_mask" in batch):
            return batch
        keep = torch.rand(batch["cap_mask"].shape[0], device=batch["cap_mask"].device) >= self.cap_drop
        return hide_captions(batch, keep)

    def forward(self, batch: dict) -> dict:
        z = self.encode(self.drop_captions(batch))
        logits = self.cls(self.drop(z["rep"]))
        out = {"logits": logits}
        if "label" in batch:
            ce = F.cross_entropy(logits.float(), batch["label"])
            aux = {"ce": ce}
            loss = ce
            if self.mi != "off" and self.alpha and logits.shape[0] > 1:
                a, _, bb = self.mi.partition("&")
                x = z["O"] + z["G"] if a == "(O+G)" else z[a]
                nce = info_nce(x, z[bb], self.tau)
                aux["nce"] = nce
                loss = loss + self.alpha * nce
            out["loss"] = loss
            out["aux"] = aux
        return out

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        """The class of each sample; with ``cap_ens``, of the mean of its class probabilities read with
        its caption and read without it (the two views ``cap_drop`` trains; no caption: one view)."""
        b = {k: v for k, v in batch.items() if k != "label"}
        logits = self.forward(b)["logits"]
        if not (self.cap_ens and "cap_mask" in b):
            return logits.argmax(-1)
        bare = hide_captions(b, torch.zeros_like(b["has_cap"]))
        return (logits.float().softmax(-1) + self.forward(bare)["logits"].float().softmax(-1)).argmax(-1)
