"""Tuned top layers over cached states (``text.cut = k``).

The text-features stage caches, for every sentence and caption, the hidden states
that ENTER the encoder's last ``k`` layers, and once per encoder key the pretrained
weights of those ``k`` layers (``files/top_layers.safetensors`` + ``.json``).  A head
builds :class:`TunedTop` from them: a copy of the pretrained layers, trained with
its own learning rate (``top_lr``).  Running ``k`` layers forward and backward costs
about ``k / n_layers`` of fine-tuning the whole encoder, and nothing below the cut
is ever recomputed.

Joint reading (``joint = true``): the sentence and its caption are read together,
``[sentence pieces ; caption pieces]`` with a learned segment embedding added to the
caption's states, under one padding mask, so every sentence piece attends to the
caption (and back) in every tuned layer.  ``joint = false`` runs the two through the
same layers separately.

Memory reading (``joint = "memory"``): the sentence reads the caption as the pretrained
encoder wrote it.  Each tuned layer's queries are the sentence's pieces only; its keys and
values are ``[sentence ; caption]``, the caption's taken from the states ENTERING that layer
in the frozen pretrained top (plus the segment embedding).  Those frozen caption states come from
the cache: the text features store them with ``text.memory = true`` (the encoder computes them
anyway); without it they are computed once per run (:meth:`TopHead.prepare_data`, from the cached
cut-level states and the cached pretrained weights).  The caption never runs through
the tuned layers: per caption piece a step costs the K and V projections, about a ninth of
reading it jointly.  The caption stream of a head (C_W, its vector) is the frozen top's output.

Gated memory (``mem_gate = true``; it applies to memory reading only): the sentence attends to itself and to the
caption in two separate softmaxes, and the caption's part is added through ``tanh(g)``, one gate
``g`` per layer and head, 0 at the start (Flamingo's gated cross-attention).  The pretrained layers
thus start exactly as the text-only encoder and let the caption in only as far as training pays;
the gates learn at the head's ``lr``, not ``top_lr``.

The layer is BERT's post-LayerNorm block, written out here so that it loads the
cached weights by name without any ``transformers`` code:
``x = LN(x + O(SelfAttn(x)))``, ``x = LN(x + W2 gelu(W1 x))``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError

#: head options of the tuned top (every head that can take one declares these too)
TOP_OPTIONS = {"tune_top": True, "joint": True, "top_lr": 1e-4, "top_dropout": 0.1, "top_attn_dropout": 0.1,
               "mem_gate": False}

# cached name (relative to one BERT layer) -> our name
BERT_NAMES = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "attention.output.LayerNorm": "ln1",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "ln2",
}


#: resolution of the dropout keep mask: one 16-bit slice of a 64-bit draw per element
_MASK_BITS = 16


def keep_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """A Bernoulli(1 - p') keep mask of ``shape`` and its scale 1 / (1 - p'), where p' is ``p``
    rounded to a multiple of 2^-16 (0.1 -> 0.1000061).  The bits are 16-bit slices of 64-bit draws of
    the torch generator: four elements per draw, where ``Tensor.bernoulli_`` on a CPU pays about
    four times as much per element (RESULTS.md "The tuned top's own dropout masks": it was a sixth of a step).
    The generator is torch's own, so ``seed_all`` and the checkpoint's RNG state still fix it."""
    n = math.prod(shape)
    cut = round(p * (1 << _MASK_BITS))
    draws = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    bits = draws.view(torch.int16)[:n].view(shape)
    return bits >= cut - (1 << (_MASK_BITS - 1)), (1 << _MASK_BITS) / ((1 << _MASK_BITS) - cut)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` with the mask of :func:`keep_mask` on a CPU; elsewhere ``F.dropout`` itself (a
    GPU draws Bernoulli masks at no real cost)."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return x * (keep.to(x.dtype) * scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v, with dropout ``p`` on the probabilities; ``keep``: ``[B, Nk]`` key mask
    (every row keeps at least one key).  Written out rather than ``F.scaled_dot_product_attention``:
    with dropout a CPU runs SDPA's unfused path anyway, drawing its mask by ``bernoulli_``, and at
    these sizes (12 heads of 32, a few dozen keys) its fused kernel was no faster.  Off the
    CPU, SDPA itself: a GPU's fused kernels take dropout."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=p)
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    a = torch.softmax(s, -1, dtype=torch.float32)
    return torch.matmul(dropout(a, p, True).to(v.dtype), v)


class BertBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, eps: float, dropout: float, attn_dropout: float):
        super().__init__()
        if d % heads:
            raise PipelineError(f"tuned top: hidden {d} is not a multiple of {heads} heads")
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.p = dropout
        # dropout on the attention probabilities [B, heads, N, N]: see attention()
        self.pa = attn_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor, mem: tuple | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the real pieces only, flat ``[T, d]``; ``idx``: their places in the padded
        ``[B·N]`` grid of ``mask`` (``[B, N]``).  Every linear layer runs on real pieces alone:
        padding costs nothing but inside the attention product.  ``mem`` = ``(m, m_mask, m_idx)``
        in the same flat form: extra keys and values only (memory reading), never updated.
        ``gate`` (``[heads]``): the memory is read in its own softmax, added as ``tanh(gate)`` times it."""
        b, n = mask.shape
        d = x.shape[-1]

        def grid(t, idx=idx, n=n):  # flat real pieces -> [B, heads, N, d/heads], zeros at padding
            g = t.new_zeros(b * n, d).index_copy(0, idx, t)
            return g.view(b, n, self.h, d // self.h).transpose(1, 2)

        def attend(q, k, v, keep):
            return attention(q, k, v, keep, self.pa if self.training else 0.0)

        def kv(t, idx=idx, n=n):
            return grid(self.k(t), idx, n), grid(self.v(t), idx, n)

        # The order of the projections fixes the order in which backward sums their input gradients,
        # hence the floats of a run: each path keeps the order its measured runs were trained with.
        m, m_mask, m_idx = mem if mem is not None else (None, None, None)
        if mem is not None and gate is not None:  # gated memory: its own softmax, through tanh(gate)
            q = grid(self.q(x))
            (k, v), (mk, mv) = kv(x), kv(m, m_idx, m_mask.shape[1])
            att = attend(q, k, v, mask)  # before the caption's read: dropout draws in this order
            has = m_mask.any(1)  # a row without a caption would give NaN: it reads its first slot, weighted 0
            safe = m_mask.clone()
            safe[:, 0] |= ~has
            read = attend(q, mk, mv, safe) * has[:, None, None, None].to(q.dtype)
            att = att + torch.tanh(gate).to(q.dtype)[None, :, None, None] * read
        else:
            (k, v), keep = kv(x), mask
            if mem is not None:  # memory reading: the caption's keys and values beside the sentence's
                mk, mv = kv(m, m_idx, m_mask.shape[1])
                k, v, keep = torch.cat([k, mk], 2), torch.cat([v, mv], 2), torch.cat([mask, m_mask], 1)
            att = attend(grid(self.q(x)), k, v, keep)
        att = att.transpose(1, 2).reshape(b * n, d).index_select(0, idx)
        x = self.ln1(x + dropout(self.o(att), self.p, self.training))
        y = self.fc2(F.gelu(self.fc1(x)))
        return self.ln2(x + dropout(y, self.p, self.training))


JOINT = (True, False, "memory")


class TunedTop(nn.Module):
    """``k`` pretrained layers over cut-level states; see the module doc."""

    def __init__(self, dims: dict, joint: bool | str = True, dropout: float = TOP_OPTIONS["top_dropout"],
                 attn_dropout: float = TOP_OPTIONS["top_attn_dropout"], mem_gate: bool = False):
        super().__init__()
        if joint not in JOINT:
            raise PipelineError(f"train.joint must be true, false or \"memory\", not {joint!r}")
        d = int(dims["sent_word"])
        self.n = int(dims["top_layers"])
        shape = (d, int(dims["top_heads"]), int(dims["top_ffn"]), float(dims["top_eps"]))
        self.layers = nn.ModuleList(BertBlock(*shape, dropout, attn_dropout) for _ in range(self.n))
        self.joint = joint
        self.segment = nn.Parameter(torch.zeros(d))  # added to caption states in joint and memory reading
        # memory reading: the pretrained layers, never trained, that write the caption's states
        self.frozen = nn.ModuleList(BertBlock(*shape, 0.0, 0.0) for _ in range(self.n)) if joint == "memory" else None
        if self.frozen is not None:
            self.frozen.requires_grad_(False)
        # gated memory: one gate per layer and head, 0 at the start (the text-only encoder); it gates
        # memory reading only (joint and separate reading ignore it)
        self.gates = nn.Parameter(torch.zeros(self.n, shape[1])) if mem_gate and joint == "memory" else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()
        return self

    def load_cached(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the cached pretrained weights (``"<i>.<bert name>.weight"``) into the layers."""
        own = {}
        for name, t in state.items():
            i, rest = name.split(".", 1)
            mod, _, kind = rest.rpartition(".")
            if mod not in BERT_NAMES:
                continue
            own[f"layers.{i}.{BERT_NAMES[mod]}.{kind}"] = t
            if self.frozen is not None:
                own[f"frozen.{i}.{BERT_NAMES[mod]}.{kind}"] = t
        missing = [k for k in self.state_dict() if k.startswith(("layers.", "frozen.")) and k not in own]
        if missing:
            raise PipelineError(f"cached top layers lack {len(missing)} weight(s), e.g. {missing[0]}; re-run features")
        self.load_state_dict(own, strict=False)

    def run(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        idx = mask.reshape(-1).nonzero().squeeze(1)
        flat = x.reshape(b * n, d).index_select(0, idx)
        for layer in self.layers:
            flat = layer(flat, mask, idx)
        return flat.new_zeros(b * n, d).index_copy(0, idx, flat).view(b, n, d)

    @torch.no_grad()
    def caption_levels(self, c: torch.Tensor, c_mask: torch.Tensor) -> torch.Tensor:
        """Memory reading: the caption's states leaving each frozen pretrained layer, ``[B, Lc, k·D]``
        (zeros at padding)."""
        b, n, d = c.shape
        idx = c_mask.reshape(-1).nonzero().squeeze(1)
        flat = c.reshape(b * n, d).index_select(0, idx)
        out = []
        for layer in self.frozen:
            flat = layer(flat, c_mask, idx)
            out.append(flat.new_zeros(b * n, d).index_copy(0, idx, flat).view(b, n, d))
        return torch.cat(out, -1)

    def read_memory(self, s, s_mask, c, c_mask, c_levels=None):
        """Memory reading (module doc): the sentence through the tuned layers, every layer's keys and
        values extended by the frozen caption states entering it; returns the sentence and the frozen
        top's caption output."""
        if c_levels is None:
            c_levels = self.caption_levels(c, c_mask)
        b, n, d = s.shape
        levels = [c, *c_levels.to(c.dtype).split(d, -1)]
        idx = s_mask.reshape(-1).nonzero().squeeze(1)
        m_idx = c_mask.reshape(-1).nonzero().squeeze(1)
        flat = s.reshape(b * n, d).index_select(0, idx)
        seg = self.segment.to(c.dtype)
        for i, (layer, mem) in enumerate(zip(self.layers, levels)):
            m = mem.reshape(-1, d).index_select(0, m_idx) + seg
            flat = layer(flat, s_mask, idx, (m, c_mask, m_idx), None if self.gates is None else self.gates[i])
        return flat.new_zeros(b * n, d).index_copy(0, idx, flat).view(b, n, d), levels[-1]

    def forward(self, s: torch.Tensor, s_mask: torch.Tensor, c: torch.Tensor | None, c_mask: torch.Tensor | None,
                c_levels: torch.Tensor | None = None):
        """Sentence states ``[B, L, D]`` (and caption ``[B, Lc, D]``) → the same shapes after the tuned layers.
        ``c_levels``: memory reading's frozen caption states, when precomputed (:meth:`TopHead.prepare_data`)."""
        if c is None:
            return self.run(s, s_mask), None
        if self.joint == "memory":
            return self.read_memory(s, s_mask, c, c_mask, c_levels)
        if self.joint:
            n = s.shape[1]
            x = torch.cat([s, c + self.segment.to(c.dtype)], 1)
            m = torch.cat([s_mask, c_mask], 1)
            y = self.run(x, m)
            return y[:, :n], y[:, n:]
        # separately; an all-masked caption row would give NaN attention: let it see itself
        safe = c_mask.clone()
        safe[:, 0] |= ~c_mask.any(1)
        return self.run(s, s_mask), self.run(c, safe)


class TopHead:
    """What a head needs for a tuned top (mixed into CAM+MI, REMOTE and VEC-MNER): built from the
    cached dims and the ``TOP_OPTIONS``, started from the cached weights, trained at ``top_lr``."""

    # no class-level ``top = None``: nn.Module keeps a submodule in ``_modules``, which a class
    # attribute would shadow
    def init_top(self, dims: dict, o: dict) -> None:
        self.top = None
        o = {**TOP_OPTIONS, **o}  # the defaults live in TOP_OPTIONS only
        if "top_layers" in dims and bool(o["tune_top"]):
            self.top = TunedTop(dims, joint=o["joint"], dropout=float(o["top_dropout"]),
                                attn_dropout=float(o["top_attn_dropout"]), mem_gate=bool(o["mem_gate"]))
            self.top_lr = float(o["top_lr"])

    def load_pretrained(self, pretrained: dict) -> None:
        """Start the tuned top from the cached pretrained layers (the trainer calls this once)."""
        if self.top is not None:
            self.top.load_cached(pretrained["text_top"][1])

    def prepare_data(self, data) -> None:
        """Memory reading: every distinct caption's frozen states into ``data.cap_levels`` (the batches
        then carry them as ``cap_levels``); the trainer calls this after :meth:`load_pretrained`.
        Features cached with ``text.memory = true`` already hold them (the encoder's own top layers
        wrote them), so nothing runs; otherwise the frozen copy runs once per run over each distinct
        caption.  Anything else needs nothing."""
        if self.top is None or self.top.joint != "memory" or "cap_word" not in data.dims:
            return
        if getattr(data, "cap_levels", None) is not None:
            return
        w = next(self.top.parameters())
        n = data.cap.off.shape[0] - 1
        cap_id = getattr(data, "cap_id", None)
        if cap_id is None:  # no caption identities: every record's caption on its own
            rows, inverse = torch.arange(n), torch.arange(n)
        else:  # each distinct caption once (records of one image share it)
            ids, first = {}, []
            for r, u in enumerate(cap_id.tolist()):
                if u >= 0 and u not in ids:
                    ids[u] = len(first)
                    first.append(r)
            rows = torch.tensor(first, dtype=torch.int64)
            inverse = torch.tensor([ids.get(u, -1) for u in cap_id.tolist()], dtype=torch.int64)
        parts = []
        for i in range(0, len(rows), 256):
            c, m = data.cap.pad(rows[i : i + 256])
            m = m.to(w.device)
            parts.append(self.top.caption_levels(c.to(w.device, w.dtype), m)[m].cpu())
        flat = torch.cat(parts, 0) if parts else torch.zeros(0, self.top.n * data.cap.flat.shape[-1])
        off = torch.zeros(len(rows) + 1, dtype=torch.int64)  # one row per distinct caption
        off[1:] = (data.cap.off[rows + 1] - data.cap.off[rows]).cumsum(0)
        # a Ragged (without importing .data, which imports us): record r reads row inverse[r]
        data.cap_levels = type(data.cap)(flat, off).shared(inverse)

    def lr_scales(self, lr: float) -> list[tuple[list, float]]:
        """The tuned top learns at ``top_lr``, the rest of the head at the trainer's ``lr``."""
        return [(list(self.top.layers.parameters()) + [self.top.segment], self.top_lr / lr)] if self.top is not None else []

    def tuned(self, batch: dict, with_caption: bool = True) -> dict:
        """``batch`` with ``sent_word`` (and ``cap_word``) replaced by the tuned layers' output."""
        if self.top is None:
            return batch
        has_cap = with_caption and "cap_word" in batch
        sw, cw = self.top(batch["sent_word"], batch["sent_mask"].bool(), batch["cap_word"] if has_cap else None,
                          batch["cap_mask"].bool() if has_cap else None, batch.get("cap_levels") if has_cap else None)
        return {**batch, "sent_word": sw, **({"cap_word": cw} if has_cap else {})}


def top_dims(meta: dict) -> dict:
    return {"top_layers": int(meta["layers"]), "top_heads": int(meta["heads"]), "top_ffn": int(meta["ffn"]),
            "top_eps": float(meta["eps"])}


def load_top(files_dir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The cached top layers of one text-features key, or None when the key has none."""
    from safetensors.torch import load_file

    meta_path, w_path = files_dir / "top_layers.json", files_dir / "top_layers.safetensors"
    if not meta_path.exists() or not w_path.exists():
        return None
    try:
        return json.loads(meta_path.read_text()), load_file(str(w_path))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{w_path}: cannot read the cached top layers ({exc}); delete it and re-run features") from None
