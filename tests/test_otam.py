"""OTAM: the fast row-parallel solver equals a cell-by-cell reference; distances, paths, prototypes."""
import pytest
import torch
import torch.nn.functional as F

from mdmf.otam import frame_cost, otam, otam_distance, otam_path, prototypes


def _softmin(xs, lam):
    return -lam * torch.logsumexp(torch.stack(xs, -1) / -lam, -1)


def _reference(cost, lam=0.5):
    d = F.pad(cost, (1, 1))
    T, M = d.shape[-2:]
    g = [[None] * M for _ in range(T)]
    g[0][0] = d[..., 0, 0]
    for m in range(1, M):
        g[0][m] = g[0][m - 1] + d[..., 0, m]
    for l in range(1, T):
        g[l][0] = g[l - 1][0] + d[..., l, 0]
        for m in range(1, M):
            prev = [g[l - 1][m - 1], g[l][m - 1]] + ([g[l - 1][m]] if m in (1, M - 1) else [])
            g[l][m] = d[..., l, m] + _softmin(prev, lam)
    return g[-1][-1]


@pytest.mark.parametrize('T,batch,lam', [(2, (), 0.5), (3, (2,), 0.5), (5, (3, 4), 0.1), (8, (5, 5), 0.5), (8, (1,), 2.0)])
def test_fast_equals_reference(T, batch, lam):
    torch.manual_seed(T)
    c1 = (2 * torch.rand(*batch, T, T, dtype=torch.float64)).requires_grad_()
    c2 = c1.detach().clone().requires_grad_()
    a, b = otam(c1, lam), _reference(c2, lam)
    assert a.shape == torch.Size(batch)
    torch.testing.assert_close(a, b)
    w = torch.randn(batch, dtype=torch.float64)
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(c1.grad, c2.grad)


def test_non_square_matches_reference():
    c = torch.rand(3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(otam(c), _reference(c))


def test_hard_limit_diagonal_is_free():
    cost = 1 - torch.eye(6)
    assert abs(otam(cost, lam=1e-3).item()) < 1e-2
    assert otam(cost.flip(-1), lam=1e-3).item() > 1.5


def test_large_costs_finite_and_float32_under_autocast():
    big = 50 * torch.rand(4, 8, 8)
    assert torch.isfinite(otam(big)).all()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        q = torch.randn(3, 8, 16, requires_grad=True)
        d = otam_distance(q, torch.randn(5, 8, 16))
    assert d.dtype == torch.float32 and d.shape == (3, 5)
    d.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_distance_bidirectional_and_order():
    torch.manual_seed(0)
    p = torch.randn(2, 8, 32)
    p[1] = p[0].flip(0)
    q = p[:1] + 0.05 * torch.randn(1, 8, 32)
    d = otam_distance(q, p)
    assert d[0, 0] < d[0, 1]
    cost = frame_cost(q, p)
    torch.testing.assert_close(d, otam(cost) + otam(cost.transpose(-1, -2)))
    torch.testing.assert_close(otam_distance(q, p, bidirectional=False), otam(cost))


def test_path_monotone_and_covers_prototype():
    torch.manual_seed(1)
    cost = torch.rand(8, 8)
    path = otam_path(cost)
    assert all(i2 >= i1 and j2 >= j1 for (i1, j1), (i2, j2) in zip(path, path[1:]))
    assert sorted({j for _, j in path}) == list(range(8))
    assert otam_path(1 - torch.eye(5), lam=0.01) == [(i, i) for i in range(5)]


def test_prototypes_any_order():
    x = torch.randn(6, 9, 4)
    labels = torch.tensor([2, 0, 1, 2, 0, 1])
    U = prototypes(x, labels, 3)
    assert U.shape == (3, 9, 4)
    torch.testing.assert_close(U[2], (x[0] + x[3]) / 2)
    torch.testing.assert_close(U[0], (x[1] + x[4]) / 2)
