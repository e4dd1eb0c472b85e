"""Distillation: posteriors, reliable sets per condition, weighted KL, detaching, released switches."""

import math

import pytest
import torch

from mdmf.distill import (
    CONDITIONS,
    DIRECTIONS,
    RELEASED_DIRECTIONS,
    TABLE5_CONDITIONS,
    TABLE5_DIRECTIONS,
    ViewPosterior,
    mutual_distillation,
    read_token,
    reliable_sets,
    view_posterior,
    weighted_kl,
)


def _episode(seed=0, Q=25, N=5, D=16):
    g = torch.Generator().manual_seed(seed)
    dg = (4 * torch.rand(Q, N, generator=g)).requires_grad_()
    dl = (4 * torch.rand(Q, N, generator=g)).requires_grad_()
    tg = (torch.randn(Q, D, generator=g), torch.randn(N, D, generator=g))
    tl = (torch.randn(Q, D, generator=g), torch.randn(N, D, generator=g))
    return dg, dl, tg, tl


def _grad(x):
    return 0.0 if x.grad is None else x.grad.abs().sum().item()


def test_posterior_values():
    dist = torch.tensor([[0.0, math.log(3)]])
    qt, pt = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = view_posterior(dist, qt, pt)
    torch.testing.assert_close(p.visual, torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(p.t, torch.tensor([math.e / (math.e + 1)]))
    torch.testing.assert_close(p.v, torch.tensor([0.75]))


def test_read_token_positions():
    seq = torch.randn(3, 9, 4)
    assert torch.equal(read_token(seq), seq[:, 0])
    assert torch.equal(read_token(seq, 'released'), seq[:, 1])
    with pytest.raises(ValueError):
        read_token(seq, 'frame')


def _scores(v, t):
    return ViewPosterior(None, None, None, torch.tensor(v), torch.tensor(t))


@pytest.mark.parametrize(
    'condition,ties,exp_g,exp_l',
    [
        ('both', 'skip', [1, 0, 0, 0], [0, 1, 0, 0]),
        ('t', 'skip', [1, 0, 0, 0], [0, 1, 1, 0]),
        ('v', 'skip', [1, 0, 1, 1], [0, 1, 0, 0]),
        ('none', 'skip', [1, 1, 1, 1], [1, 1, 1, 1]),
        ('t', 'ltc', [1, 0, 0, 0], [0, 1, 1, 1]),
        ('both', 'ltc', [1, 0, 0, 0], [0, 1, 0, 0]),
    ],
)
def test_reliable_sets(condition, ties, exp_g, exp_l):
    g = _scores([0.9, 0.4, 0.8, 0.7], [0.6, 0.3, 0.2, 0.5])
    l = _scores([0.5, 0.6, 0.6, 0.6], [0.4, 0.5, 0.7, 0.5])
    og, ol = reliable_sets(g, l, condition, ties)
    assert og.int().tolist() == exp_g and ol.int().tolist() == exp_l


def test_bad_names_raise():
    dg, dl, tg, tl = _episode()
    with pytest.raises(ValueError):
        mutual_distillation(dg, dl, tg, tl, condition='either')
    with pytest.raises(ValueError):
        mutual_distillation(dg, dl, tg, tl, direction='up2down')


def test_weighted_kl_by_hand():
    dg = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]])
    dl = torch.zeros(2, 2)
    toks = (torch.randn(2, 4), torch.randn(2, 4))
    pg, pl = view_posterior(dg, *toks), view_posterior(dl, *toks)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    both = torch.tensor([True, True])
    torch.testing.assert_close(weighted_kl(pg, pl, both), torch.tensor(kl))  # same KL, any weights
    w = pg.v + pg.t
    manual = (w * torch.tensor([kl, kl])).sum() / w.sum()
    torch.testing.assert_close(weighted_kl(pg, pl, both), manual)
    torch.testing.assert_close(
        weighted_kl(pl, pg, torch.tensor([True, False]), weighted=False),
        torch.tensor(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)),
    )


def test_empty_sets_zero_no_nan():
    dg, dl, tg, tl = _episode()
    with torch.no_grad():
        dl.copy_(dg)
    tl = tg  # identical views: every score ties
    out = mutual_distillation(dg, dl, tg, tl, condition='both')
    assert not out.omega_g.any() and not out.omega_l.any()
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(dl.grad).all() if dl.grad is not None else True
    rel = mutual_distillation(dg, dl, tg, tl, condition='both', released=True)
    assert rel.omega_l.all() and not rel.omega_g.any()  # released: ties go to LTC


@pytest.mark.parametrize('condition', CONDITIONS)
@pytest.mark.parametrize('direction', DIRECTIONS)
def test_directions_and_detach(condition, direction):
    dg, dl, tg, tl = _episode(seed=3)
    out = mutual_distillation(dg, dl, tg, tl, condition, direction)
    if condition != 'none':
        assert not (out.omega_g & out.omega_l).any()
    parts = {
        'both': out.gtc_teaches_ltc + out.ltc_teaches_gtc,
        'gtc_teaches_ltc': out.gtc_teaches_ltc,
        'ltc_teaches_gtc': out.ltc_teaches_gtc,
    }
    torch.testing.assert_close(out.loss, parts[direction])
    out.loss.backward()
    if direction == 'gtc_teaches_ltc':
        assert _grad(dg) == 0.0 and _grad(dl) > 0
    if direction == 'ltc_teaches_gtc':
        assert _grad(dl) == 0.0 and _grad(dg) > 0


def test_student_gradient_only_on_members():
    dg, dl, tg, tl = _episode(seed=5)
    out = mutual_distillation(dg, dl, tg, tl, 'both', 'gtc_teaches_ltc')
    out.loss.backward()
    assert out.omega_g.any()
    assert dl.grad[~out.omega_g].abs().sum() == 0 and dl.grad[out.omega_g].abs().sum() > 0


def test_released_does_not_detach():
    dg, dl, tg, tl = _episode(seed=7)
    mutual_distillation(dg, dl, tg, tl, 't', 'gtc_teaches_ltc', released=True).loss.backward()
    assert _grad(dg) > 0
    dg.grad = dl.grad = None
    mutual_distillation(dg, dl, tg, tl, 't', 'gtc_teaches_ltc', detach_teacher=False).loss.backward()
    assert _grad(dg) > 0


def test_none_is_unweighted_mean():
    dg, dl, tg, tl = _episode(seed=9)
    out = mutual_distillation(dg, dl, tg, tl, 'none')
    g, l = out.gtc, out.ltc
    torch.testing.assert_close(out.gtc_teaches_ltc, (g.visual * (g.log_visual - l.log_visual)).sum(-1).mean())
    torch.testing.assert_close(out.ltc_teaches_gtc, (l.visual * (l.log_visual - g.log_visual)).sum(-1).mean())


def test_released_no_condition_sums_over_queries():
    dg, dl, tg, tl = _episode(seed=11, Q=25)
    mean = mutual_distillation(dg, dl, tg, tl, 'none')
    for summed in (
        mutual_distillation(dg, dl, tg, tl, 'none', released=True),
        mutual_distillation(dg, dl, tg, tl, 'none', none_reduction='sum'),
    ):
        torch.testing.assert_close(summed.gtc_teaches_ltc, 25 * mean.gtc_teaches_ltc)
        torch.testing.assert_close(summed.ltc_teaches_gtc, 25 * mean.ltc_teaches_gtc)
    # only the no-condition branch sums
    cond = mutual_distillation(dg, dl, tg, tl, 'both', none_reduction='sum')
    torch.testing.assert_close(cond.loss, mutual_distillation(dg, dl, tg, tl, 'both').loss)
    with pytest.raises(ValueError, match='reduction'):
        weighted_kl(mean.gtc, mean.ltc, mean.omega_g, reduction='max')


def test_direction_tables_agree():
    assert TABLE5_DIRECTIONS['up->down'] == RELEASED_DIRECTIONS['up2down'] == 'gtc_teaches_ltc'
    assert TABLE5_DIRECTIONS['down->up'] == RELEASED_DIRECTIONS['down2up'] == 'ltc_teaches_gtc'
    assert set(TABLE5_DIRECTIONS.values()) == set(RELEASED_DIRECTIONS.values()) == set(DIRECTIONS)
    assert set(TABLE5_CONDITIONS.values()) == set(CONDITIONS)
