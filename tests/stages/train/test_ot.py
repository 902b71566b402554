"""Log-domain Sinkhorn: marginals, agreement with the plain algorithm, padding, no underflow."""

import torch

from stages.train.ot import barycentric, cosine_cost, sinkhorn_log


def plain_sinkhorn(C, eps, iters):
    n, m = C.shape
    K = torch.exp(-C / eps)
    a, b = torch.full((n,), 1 / n, dtype=C.dtype), torch.full((m,), 1 / m, dtype=C.dtype)
    v = torch.ones(m, dtype=C.dtype)
    for _ in range(iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return u[:, None] * K * v[None]


def test_matches_plain_sinkhorn_where_it_is_stable():
    torch.manual_seed(0)
    C = torch.rand(1, 5, 7, dtype=torch.float64)
    T = sinkhorn_log(C, eps=0.5, iters=200).exp()
    ref = plain_sinkhorn(C[0].double(), 0.5, 200)
    assert torch.allclose(T[0].double(), ref, atol=1e-6)
    assert torch.allclose(T.sum(2), torch.full((1, 5), 1 / 5, dtype=T.dtype), atol=1e-5)
    assert torch.allclose(T.sum(1), torch.full((1, 7), 1 / 7, dtype=T.dtype), atol=1e-5)


def test_no_underflow_where_the_plain_kernel_vanishes():
    torch.manual_seed(1)
    C = torch.rand(2, 6, 4) * 40 + 60  # Euclidean costs of 60-100 (REMOTE: 30-40 at 768-d) ...
    with torch.no_grad():
        assert (torch.exp(-C / 0.5) == 0).all()  # ... underflow the plain kernel at eps 0.5
    logT = sinkhorn_log(C, eps=0.5, iters=100)
    T = logT.exp()
    assert torch.isfinite(logT).all()
    assert torch.allclose(T.sum(2), torch.full((2, 6), 1 / 6), atol=1e-4)
    # a real transport plan: cheaper than the independent (uniform) coupling by a margin
    uniform = C.mean((1, 2))
    assert ((T * C).sum((1, 2)) < uniform - 5).all()


def test_padding_has_no_mass_and_empty_sets_give_zero_plans():
    torch.manual_seed(2)
    C = torch.rand(2, 4, 5, requires_grad=True)
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    bm = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    logT = sinkhorn_log(C, am, bm, eps=0.1, iters=50)
    T = logT.exp()
    assert T[0, 3].sum() == 0 and T[0, :, 2:].sum() == 0
    assert torch.allclose(T[0, :3].sum(1), torch.full((3,), 1 / 3), atol=1e-4)
    assert T[1].sum() == 0  # no valid column: an all-zero plan, never NaN
    B = barycentric(logT, am, bm)
    assert torch.allclose(B[0, :3].sum(1), torch.ones(3), atol=1e-5) and B[0, 3].sum() == 0 and B[1].sum() == 0
    B.sum().backward()
    assert torch.isfinite(C.grad).all()


def test_cosine_cost_range():
    x = torch.randn(1, 3, 8)
    c = cosine_cost(x, torch.cat([x, -x], 1))
    assert torch.allclose(c[0, :, :3].diagonal(), torch.zeros(3), atol=1e-5)
    assert torch.allclose(c[0, :, 3:].diagonal(), torch.full((3,), 2.0), atol=1e-5)
