"""LTCE and GTCE (mdmf.context): shapes, variants, causality, receptive fields, precision, gradients."""

import pytest
import torch
from torch import nn

from mdmf.context import GTCE, LTCE, TCN, frame_dependency, receptive_field

D = 16


@pytest.mark.parametrize('B,T', [(1, 8), (3, 8), (2, 5), (4, 16)])
@pytest.mark.parametrize('make', [lambda: LTCE(D), lambda: LTCE(D, 'released'), lambda: GTCE(D)])
def test_shapes(make, B, T):
    m = make()
    assert m(torch.randn(B, T, D)).shape == (B, T, D)
    m.eval()
    assert m(torch.randn(B, T, D)).shape == (B, T, D)


def test_bad_variant():
    with pytest.raises(ValueError, match='variant'):
        LTCE(D, 'both')


def test_variant_layers():
    kinds = lambda m: {type(x) for x in m.modules()}
    assert {nn.ReLU, nn.BatchNorm1d} <= kinds(LTCE(D, 'paper'))
    assert not kinds(LTCE(D, 'released')) & {nn.ReLU, nn.BatchNorm1d}
    assert sum(isinstance(x, nn.Conv1d) for x in LTCE(D, 'released').modules()) == 2


def _linearity_gap(f, x, y, a, b):
    g = lambda z: f(z) - f(torch.zeros_like(z))  # remove the bias term
    return (g(a * x + b * y) - a * g(x) - b * g(y)).abs().max().item()


@torch.no_grad()
def test_released_is_linear_paper_is_not():
    torch.manual_seed(1)
    x, y = torch.randn(2, 8, D), torch.randn(2, 8, D)
    assert _linearity_gap(LTCE(D, 'released').eval(), x, y, 0.7, -1.3) < 1e-5
    assert _linearity_gap(LTCE(D, 'released').eval(), x, y, 2.0, 0.5) < 1e-5
    assert _linearity_gap(LTCE(D, 'paper').eval(), x, y, 0.7, -1.3) > 1e-2
    # with the biases zeroed the released variant is linear without the correction
    m = LTCE(D, 'released').eval()
    for conv in m.net:
        conv.bias.zero_()
    torch.testing.assert_close(m(0.7 * x - 1.3 * y), 0.7 * m(x) - 1.3 * m(y), atol=1e-5, rtol=1e-5)


def test_no_residual_in_ltce():
    m = LTCE(D, 'released').eval()
    for conv in m.net:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    assert m(torch.randn(2, 8, D)).abs().max() == 0  # Eq. 3 has no skip connection


@torch.no_grad()
@pytest.mark.parametrize('T', [8, 12])
def test_tcn_causal_exactly(T):
    torch.manual_seed(2)
    tcn = GTCE(D).tcn.eval()
    x = torch.randn(3, T, D)
    base = tcn(x)
    for j in range(T):
        x2 = x.clone()
        x2[:, j] = torch.randn(3, D)
        out = tcn(x2)
        assert torch.equal(out[:, :j], base[:, :j])
        assert not torch.equal(out[:, j:], base[:, j:])


def test_tcn_left_padding_only():
    tcn = TCN(D)
    assert [b.net[0].conv.dilation[0] for b in tcn.blocks] == [1, 2, 4]
    assert [b.net[0].pad for b in tcn.blocks] == [2, 4, 8]
    assert all(c.conv.padding[0] == 0 for b in tcn.blocks for c in (b.net[0], b.net[3]))


def test_weight_norm_used():
    from torch.nn.utils import parametrize

    convs = [m for m in GTCE(D).modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 6 and all(parametrize.is_parametrized(c, 'weight') for c in convs)


def test_receptive_field_and_dependency():
    assert receptive_field(3, 3) == 29 and receptive_field(2, 3) == 13 and receptive_field(1, 2) == 3
    T = 8
    tri = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(frame_dependency(GTCE(D).tcn, T, D), tri)
    assert frame_dependency(GTCE(D), T, D).all()  # every GTCE output frame sees the whole clip
    idx = torch.arange(T)
    local = (idx[:, None] - idx[None, :]).abs() <= 2
    assert torch.equal(frame_dependency(LTCE(D), T, D), local)
    assert torch.equal(frame_dependency(LTCE(D, 'released'), T, D), local)
    # a single level (receptive field 5) cannot see the whole of 8 frames
    dep1 = frame_dependency(TCN(D, levels=1), T, D)
    assert dep1[-1].sum() == 5 and not dep1[-1, :3].any()


def test_gtce_adds_the_last_frame_summary():
    torch.manual_seed(3)
    m = GTCE(D).eval()
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        delta = m(x) - x
        torch.testing.assert_close(delta, m.tcn(x)[:, -1:].expand_as(x))


@pytest.mark.parametrize('make', [lambda: LTCE(D), lambda: LTCE(D, 'released'), lambda: GTCE(D)])
def test_autocast_and_float32(make):
    m = make()
    x = torch.randn(2, 8, D)
    y32 = m(x)
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    assert y.shape == (2, 8, D) and torch.isfinite(y.float()).all()
    y.float().sum().backward()


@pytest.mark.parametrize('make', [lambda: LTCE(D), lambda: LTCE(D, 'released'), lambda: GTCE(D)])
def test_gradients_reach_every_parameter(make):
    torch.manual_seed(4)
    m = make()
    m(torch.randn(2, 8, D)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
