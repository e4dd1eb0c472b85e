"""OTAM: the fast row-parallel solver equals a cell-by-cell reference; distances, paths, prototypes."""

import pytest
import torch

from mdmf.otam import (
    _otam_table,
    frame_cost,
    otam,
    otam_bidirectional,
    otam_distance,
    otam_path,
    otam_reference,
    prototypes,
    softmin,
)


@pytest.mark.parametrize(
    'T,batch,lam', [(2, (), 0.5), (3, (2,), 0.5), (5, (3, 4), 0.1), (8, (5, 5), 0.5), (8, (1,), 2.0)]
)
def test_fast_equals_reference(T, batch, lam):
    torch.manual_seed(T)
    c1 = (2 * torch.rand(*batch, T, T, dtype=torch.float64)).requires_grad_()
    c2 = c1.detach().clone().requires_grad_()
    a, b = otam(c1, lam), otam_reference(c2, lam)
    assert a.shape == torch.Size(batch)
    torch.testing.assert_close(a, b)
    w = torch.randn(batch, dtype=torch.float64)
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(c1.grad, c2.grad)


def test_non_square_matchesotam_reference():
    c = torch.rand(3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(otam(c), otam_reference(c))


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


def test_softmin_limits_and_large_values():
    x = torch.tensor([3.0, 1.0, 2.0])
    torch.testing.assert_close(softmin(x, lam=1e-4), torch.tensor(1.0))
    assert softmin(x, lam=0.5) < 1.0  # below the hard minimum
    assert torch.isfinite(softmin(torch.tensor([400.0, 500.0]), lam=0.5))  # no underflow to log(0)


def test_table_rows_share_the_solver():
    c = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    table = _otam_table(c)
    assert table.shape == (2, 3, 6, 9)
    torch.testing.assert_close(table[..., -1, -1], otam(c))
    torch.testing.assert_close(table[..., 0, :], torch.nn.functional.pad(c[..., 0, :], (1, 1)).cumsum(-1))


def test_bidirectional_stacked_equals_two_solves():
    c = torch.rand(4, 5, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(otam_bidirectional(c), otam_reference(c) + otam_reference(c.transpose(-1, -2)))
