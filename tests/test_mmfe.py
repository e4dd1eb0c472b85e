"""MMFE (mdmf.mmfe): shapes, attention, permutation property, gradients, precision, errors."""

import pytest
import torch
from torch import nn

from mdmf.mmfe import MMFE, fuse_token

D, H = 32, 8


def test_fuse_token():
    tok, x = torch.randn(3, D), torch.randn(3, 8, D)
    out = fuse_token(tok, x)
    assert out.shape == (3, 9, D)
    assert torch.equal(out[:, 0], tok) and torch.equal(out[:, 1:], x)


@pytest.mark.parametrize('B,T', [(1, 8), (5, 8), (3, 4), (2, 16)])
@pytest.mark.parametrize('pos_emb', [True, False])
def test_shapes(B, T, pos_emb):
    m = MMFE(D, heads=H, seq_len=T + 1, pos_emb=pos_emb, ffn_dim=64)
    ctx, vis = torch.randn(B, T + 1, D), torch.randn(B, T + 1, D)
    out, attn = m(ctx, vis)
    assert out.shape == (B, T + 1, D) and attn.shape == (B, T + 1, T + 1)
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, T + 1))
    out2, none = m.eval()(ctx, vis, return_attn=False)
    assert none is None and out2.shape == out.shape


def test_fused_path_matches():
    m = MMFE(D, heads=H).eval()
    ctx, vis = torch.randn(2, 9, D), torch.randn(2, 9, D)
    with torch.no_grad():
        torch.testing.assert_close(m(ctx, vis)[0], m(ctx, vis, return_attn=False)[0], atol=1e-5, rtol=1e-5)


def test_structure():
    m = MMFE(D, heads=H, pos_emb=False)
    assert m.pos is None
    assert m.to_q.bias is None and m.to_k.bias is None and m.to_v.bias is None
    assert sum(isinstance(x, nn.LayerNorm) for x in m.modules()) == 1
    assert any(isinstance(x, nn.GELU) for x in m.ffn)
    assert m.ffn[0].out_features == 2048
    drops = [x.p for x in m.modules() if isinstance(x, nn.Dropout)]
    assert sorted(drops) == [0.05, 0.2]
    assert MMFE(D, heads=H).pos.shape == (9, D)


@torch.no_grad()
def test_permutation_property():
    torch.manual_seed(0)
    B, T = 3, 8
    ctx, vis = torch.randn(B, T + 1, D), torch.randn(B, T + 1, D)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(T)])
    if torch.equal(perm, torch.arange(T + 1)):
        perm = torch.tensor([0] + list(range(T, 0, -1)))
    m = MMFE(D, heads=H, pos_emb=False).eval()
    out, attn = m(ctx, vis)
    out_p, attn_p = m(ctx, vis[:, perm])
    torch.testing.assert_close(out_p, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn_p, attn[:, :, perm])
    # the query stream is permutation-equivariant: permuting the context permutes the output rows
    out_q, _ = m(ctx[:, perm], vis)
    torch.testing.assert_close(out_q, out[:, perm], atol=1e-5, rtol=1e-5)
    # with position embeddings the order of the visual frames matters
    mp = MMFE(D, heads=H, pos_emb=True).eval()
    assert (mp(ctx, vis[:, perm])[0] - mp(ctx, vis)[0]).abs().max() > 1e-4


def test_self_attention_ntc():
    m = MMFE(D, heads=H).eval()
    x = torch.randn(2, 9, D)
    out, attn = m(x, x)
    assert out.shape == (2, 9, D)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 9))


@pytest.mark.parametrize('pos_emb', [True, False])
def test_gradients_reach_every_parameter(pos_emb):
    torch.manual_seed(1)
    m = MMFE(D, heads=H, pos_emb=pos_emb)
    ctx = torch.randn(2, 9, D, requires_grad=True)
    vis = torch.randn(2, 9, D, requires_grad=True)
    out, _ = m(ctx, vis)
    out.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert ctx.grad.abs().sum() > 0 and vis.grad.abs().sum() > 0


@pytest.mark.parametrize('return_attn', [True, False])
def test_autocast_bfloat16_cpu(return_attn):
    m = MMFE(D, heads=H)
    ctx, vis = torch.randn(2, 9, D), torch.randn(2, 9, D)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, attn = m(ctx, vis, return_attn=return_attn)
    assert out.shape == (2, 9, D) and torch.isfinite(out.float()).all()
    if return_attn:
        torch.testing.assert_close(attn.float().sum(-1), torch.ones(2, 9), atol=2e-2, rtol=0)
    out.float().sum().backward()


def test_errors():
    with pytest.raises(ValueError, match='divisible'):
        MMFE(30, heads=8)
    m = MMFE(D, heads=H, seq_len=9, pos_emb=True)
    with pytest.raises(ValueError, match='seq_len'):
        m(torch.randn(1, 12, D), torch.randn(1, 12, D))
    # no limit without f_pos
    MMFE(D, heads=H, seq_len=9, pos_emb=False)(torch.randn(1, 12, D), torch.randn(1, 12, D))
