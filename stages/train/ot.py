"""Entropic optimal transport for REMOTE's multilevel OT (MOT), in the log domain.

``sinkhorn_log(C, a_mask, b_mask, eps, iters)`` returns ``log T`` of the entropic plan
between uniform distributions on the valid rows and columns of a batched cost matrix.
It works on dual potentials with ``logsumexp``, so nothing underflows however large
``C / eps`` gets; padded rows/columns get zero mass, and a row or column set that is
entirely padding gives an all-zero plan (never NaN).

Where and why this departs from the released REMOTE code (``modeling_unimo_moe_opt``):
  * the release iterates ``u = a / (K v)``, ``v = b / (Kᵀ u)`` on ``K = exp(-C/ε) + 1e-12``
    with ε = 0.5 and a Euclidean cost between LayerNorm-ed 768-d vectors (distances of
    about 30–40), so ``exp(-C/ε)`` is far below the 1e-12 floor and the plan is
    floor-dominated and close to uniform.  Log-domain iterations give the actual
    entropic plan at any ε;
  * the release uses uniform marginals over padded tokens too; here padding has no mass;
  * ``barycentric(logT, a_mask)`` renormalises each row by its marginal (``T / a``), so
    the transported update is an average of source states; the release adds ``T S``,
    whose rows sum to ``1/|Q|`` and thus shrink the update by about 1/256 for text;
  * the cost used by the REMOTE head is the cosine distance (in [0, 2]) between
    projected states, which keeps one ε meaningful at every level and width.
"""

from __future__ import annotations

import torch


def sinkhorn_log(C: torch.Tensor, a_mask: torch.Tensor | None = None, b_mask: torch.Tensor | None = None,
                 eps: float = 0.1, iters: int = 50) -> torch.Tensor:
    """``log T`` ``[B, n, m]`` of the entropic OT plan for cost ``C`` ``[B, n, m]``.

    Entries outside the valid block hold the most negative finite float (not -inf), so
    ``exp`` gives 0 and gradients stay finite."""
    B, n, m = C.shape
    C = C.float()
    am = torch.ones(B, n, dtype=torch.bool, device=C.device) if a_mask is None else a_mask.bool()
    bm = torch.ones(B, m, dtype=torch.bool, device=C.device) if b_mask is None else b_mask.bool()
    ninf = torch.finfo(C.dtype).min
    log_a = torch.where(am, -torch.log(am.sum(1, keepdim=True).clamp(min=1).float()), torch.full_like(am, ninf, dtype=C.dtype))
    log_b = torch.where(bm, -torch.log(bm.sum(1, keepdim=True).clamp(min=1).float()), torch.full_like(bm, ninf, dtype=C.dtype))
    valid = am.unsqueeze(2) & bm.unsqueeze(1)
    M = torch.where(valid, -C / eps, torch.full_like(C, ninf))  # log kernel, -inf off the valid block
    f = torch.zeros(B, n, dtype=C.dtype, device=C.device)  # potentials divided by eps
    g = torch.zeros(B, m, dtype=C.dtype, device=C.device)
    for _ in range(iters):
        f = log_a - torch.logsumexp(M + g.unsqueeze(1), dim=2)
        f = torch.where(am, f, torch.zeros_like(f))
        g = log_b - torch.logsumexp(M + f.unsqueeze(2), dim=1)
        g = torch.where(bm, g, torch.zeros_like(g))
    logT = M + f.unsqueeze(2) + g.unsqueeze(1)
    return torch.where(valid, logT, torch.full_like(logT, ninf))


def barycentric(logT: torch.Tensor, a_mask: torch.Tensor | None = None, b_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row-normalised plan ``T / a``: each valid row a distribution over the valid source
    columns; rows that are padding, or that have no valid column, are all zero."""
    T = torch.softmax(logT, dim=2)
    keep = torch.ones(logT.shape[:2], dtype=torch.bool, device=logT.device) if a_mask is None else a_mask.bool()
    if b_mask is not None:
        keep = keep & b_mask.bool().any(1, keepdim=True)
        T = T * b_mask.unsqueeze(1)
    return T * keep.unsqueeze(2)


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between every row of ``x`` ``[B, n, d]`` and of ``y`` ``[B, m, d]``."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    yn = torch.nn.functional.normalize(y.float(), dim=-1)
    return 1.0 - xn @ yn.transpose(1, 2)
