"""Behaviour of mdmf.pps: shapes, determinism, the ablation, the draw's distribution, gradients."""

import pytest
import torch
import torch.nn.functional as F

from mdmf.pps import PPS, pps_draw, pps_probs, pps_similarity


def _data(Q=6, T=8, N=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Q, T, D, generator=g), torch.randn(N, D, generator=g)


@pytest.mark.parametrize('mode', ['video', 'top4'])
def test_shapes(mode):
    q, tok = _data()
    tokens, probs, drawn = PPS(similarity=mode)(q, tok, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (6, 16) and probs.shape == (6, 5) and drawn.shape == (6,)
    assert drawn.dtype == torch.long and drawn.device.type == 'cpu'
    assert torch.allclose(probs.sum(-1), torch.ones(6))
    assert torch.equal(tokens, tok[drawn])


def test_similarity_values():
    q, tok = _data(T=3)
    sv = pps_similarity(q, tok, 'video')
    assert torch.allclose(sv, F.cosine_similarity(q.mean(1)[:, None], tok[None], dim=-1), atol=1e-6)
    st = pps_similarity(q, tok, 'top4')  # T=3 < 4: mean of all frames' cosines
    frame = F.cosine_similarity(q[:, :, None], tok[None, None], dim=-1)  # [Q, T, N]
    assert torch.allclose(st, frame.mean(1), atol=1e-6)
    with pytest.raises(ValueError):
        PPS(similarity='bad')


def test_determinism_with_generator():
    q, tok = _data()
    pps = PPS(temperature=1.0)
    a = pps(q, tok, generator=torch.Generator().manual_seed(3))[2]
    b = pps(q, tok, generator=torch.Generator().manual_seed(3))[2]
    assert torch.equal(a, b)
    draws = {tuple(pps(q, tok, generator=torch.Generator().manual_seed(s))[2].tolist()) for s in range(10)}
    assert len(draws) > 1  # the seed matters at t=1


def test_disabled_gives_zeros():
    q, tok = _data()
    tokens, probs, drawn = PPS(enabled=False)(q, tok)
    assert torch.equal(tokens, torch.zeros(6, 16)) and probs is None and drawn is None


def test_draws_follow_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]])
    M = 40_000
    drawn = pps_draw(probs.repeat(M, 1), torch.Generator().manual_seed(0)).view(M, 2)
    counts = F.one_hot(drawn, 4).sum(0).float()  # [2, 4]
    expected = probs * M
    chi2 = ((counts - expected) ** 2 / expected).sum(-1)
    assert (chi2 < 16.27).all(), chi2  # chi-square, 3 degrees of freedom, p = 0.001


def test_temperature_sharpens():
    sim = torch.tensor([[0.26, 0.24, 0.20]])
    assert pps_probs(sim, 0.005).max() > pps_probs(sim, 0.05).max() > pps_probs(sim, 1.0).max()
    assert torch.allclose(pps_probs(sim, 0.01), torch.softmax(sim * 100, -1))


def test_gradients():
    q, tok = _data()
    q.requires_grad_(True)
    tok.requires_grad_(True)
    tokens, probs, drawn = PPS(temperature=0.5)(q, tok, generator=torch.Generator().manual_seed(0))
    assert not tokens.requires_grad and not drawn.requires_grad  # nothing through the draw/tokens
    probs[:, 0].sum().backward()  # documented: probs is differentiable w.r.t. query_feats only
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert tok.grad is None


def test_generator_on_other_device_and_meta_free():
    # a CPU generator with CPU probs; and a draw without generator
    probs = torch.full((3, 4), 0.25)
    assert pps_draw(probs).shape == (3,)
    assert pps_draw(probs, torch.Generator('cpu').manual_seed(0)).device == probs.device


def test_under_autocast():
    q, tok = _data()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        tokens, probs, drawn = PPS()(q.bfloat16(), tok, generator=torch.Generator().manual_seed(0))
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
