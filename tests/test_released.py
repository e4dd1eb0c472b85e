"""The project's components equal the released code's, on the same weights and inputs.

Each `_released_*` function below is a small transcription written for these tests: our own code that computes
what a function of the released code computes, step by step as it does it (plain loops, its exp/log soft-min,
its order of operations), so that a later change to the package cannot break the match silently. The sources:

- CLIP-MDMF, github.com/cofly2014/CLIP-MDMF: `models/base/few_shot_clip_two_trans.py` (`fliter_target_feature`,
  `Transformer_v1`, `get_context_feats`, `get_context_feats_g`, `text_eh_temporal_transformer`,
  `OTAM_cum_dist_v2`, the distillation loop of `forward`), `models/base/tcn.py` (`TemporalConvNet`),
  `run_clip_fsar_decison_now.py` and `utils.py` (the loss: summed cross-entropy + distillation term).
- CLIP-FSAR, github.com/alibaba-mmai-research/CLIP-FSAR: `models/base/few_shot.py` (`CNN_OTAM_CLIPFSAR`),
  `runs/train_net_few_shot.py` (the loss) and `configs/projects/CLIPFSAR/*` (MERGE_BEFORE,
  USE_CLASSIFICATION_VALUE).

One difference is known and kept out of the comparisons: the released `cos_sim` adds 0.01 to the product of the
norms; ours does not. The transcriptions take that epsilon as an argument, set to 0 for the equality checks;
`test_cosine_epsilon_is_small` bounds its effect.
"""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdmf.context import GTCE, LTCE
from mdmf.distill import RELEASED_DIRECTIONS, mutual_distillation
from mdmf.mmfe import MMFE
from mdmf.model import CLIPFSAR, MDMF, ModelConfig, build_model
from mdmf.otam import otam, otam_bidirectional
from mdmf.pps import pps_probs, pps_similarity

# released [t_compare, v_compare]
RELEASED_CONDITIONS = {(1, 1): 'both', (1, 0): 't', (0, 1): 'v', (0, 0): 'none'}


# ---- transcriptions of the released functions -------------------------------------------------------------------


def _released_cos(x, y, epsilon=0.01):
    "cos_sim: x @ y^T over the last axis, divided by the product of the norms plus epsilon."
    return (x @ y.transpose(-1, -2)) / (x.norm(dim=-1)[..., :, None] * y.norm(dim=-1)[..., None, :] + epsilon)


def _class_mean(x, labels):
    "The per-class mean over the first axis, classes in sorted label order (torch.unique + index_select + mean)."
    return torch.stack([x[labels == c].mean(0) for c in torch.unique(labels)])


def _released_pps_probs(support_tokens, support_labels, target_features, epsilon=0.0):
    "fliter_target_feature: mean of the top-4 frame cosines per class, softmax at logit scale 200."
    classes = _class_mean(support_tokens, support_labels)  # [N, D]
    per_query = classes[None].repeat(len(target_features), 1, 1)  # [Q, N, D]
    top = _released_cos(per_query, target_features, epsilon).topk(4, dim=-1).values  # [Q, N, 4]
    return F.softmax(top.mean(-1) * 200, dim=-1)  # [Q, N]


def _released_transformer_v1(m: MMFE, q, k, v):
    "Transformer_v1, depth 1, eval mode: shared pre-LayerNorm, bias-free q/k/v, out projection, residual FFN."
    ln = lambda x: F.layer_norm(x, (x.shape[-1],), m.norm.weight, m.norm.bias, m.norm.eps)
    h = m.heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], h, -1).permute(0, 2, 1, 3)  # b n (h d) -> b h n d
    qh, kh, vh = (
        split(ln(q) @ m.to_q.weight.T),
        split(ln(k) @ m.to_k.weight.T),
        split(ln(v) @ m.to_v.weight.T),
    )
    dots = torch.einsum('bhid,bhjd->bhij', qh, kh) * qh.shape[-1] ** -0.5
    out = torch.einsum('bhij,bhjd->bhid', dots.softmax(-1), vh).permute(0, 2, 1, 3).flatten(2)
    x = out @ m.proj[0].weight.T + m.proj[0].bias + q
    lin1, lin2 = m.ffn[0], m.ffn[2]
    return F.gelu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias + x


def _weight_norm(conv):
    "The weight of an old-style weight_norm(Conv1d): g * v / ||v|| per output channel."
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    return g * v / v.norm(dim=(1, 2), keepdim=True)


def _released_tcn(gtce: GTCE, x):
    "TemporalConvNet, eval mode: per level, (conv padded both sides, chomp the right, ReLU) twice, residual, ReLU."
    for i, block in enumerate(gtce.tcn.blocks):
        d, res = 2**i, x
        for conv in (block.net[0].conv, block.net[3].conv):
            pad = (conv.kernel_size[0] - 1) * d
            x = F.conv1d(x, _weight_norm(conv), conv.bias, padding=pad, dilation=d)[:, :, :-pad].relu()
        x = (x + res).relu()
    return x


def _released_global_context(gtce: GTCE, feats):
    "get_context_feats_g: the TCN's last frame repeated over the T frames, plus the features."
    last = _released_tcn(gtce, feats.transpose(1, 2)).transpose(1, 2)[:, -1]  # [B, D]
    return last[:, None].repeat(1, feats.shape[1], 1) + feats


def _released_local_context(ltce: LTCE, feats):
    "get_context_feats: context_conv1 then context_conv2, channels first."
    c1, c2 = ltce.net[0], ltce.net[1]
    x = F.conv1d(feats.permute(0, 2, 1), c1.weight, c1.bias, padding=1)
    return F.conv1d(x, c2.weight, c2.bias, padding=1).permute(0, 2, 1)


def _released_otam_v2(dists, lbda=0.5):
    "OTAM_cum_dist_v2: cell by cell, the soft-min as -lbda * log(sum(exp(-x / lbda)))."
    d = F.pad(dists, (1, 1))
    cum = torch.zeros_like(d)
    for m in range(1, d.shape[-1]):
        cum[..., 0, m] = d[..., 0, m] + cum[..., 0, m - 1]
    smin = lambda *xs: -lbda * torch.log(sum(torch.exp(-x / lbda) for x in xs))
    for l in range(1, d.shape[-2]):
        cum[..., l, 1] = d[..., l, 1] + smin(cum[..., l - 1, 0], cum[..., l - 1, 1], cum[..., l, 0])
        for m in range(2, d.shape[-1] - 1):
            cum[..., l, m] = d[..., l, m] + smin(cum[..., l - 1, m - 1], cum[..., l, m - 1])
        cum[..., l, -1] = d[..., l, -1] + smin(cum[..., l - 1, -2], cum[..., l - 1, -1], cum[..., l, -2])
    return cum[..., -1, -1]


def _released_otam_distance(support, target, epsilon=0.0):
    "otam_distance: 1 - cos_sim between all frames, then OTAM_cum_dist_v2 in both directions."
    Q, S, T = len(target), len(support), target.shape[1]
    sim = _released_cos(target.flatten(0, 1), support.flatten(0, 1), epsilon)  # [Q*T, S*T]
    dists = (1 - sim).reshape(Q, T, S, T).permute(0, 2, 1, 3)  # [Q, S, T, T]
    return _released_otam_v2(dists) + _released_otam_v2(dists.transpose(-1, -2))


def _released_distillation(
    cum_up, cum_down, tq_up, ts_up, tq_down, ts_down, t_compare, v_compare, direction, epsilon=0.0
):
    "The distillation block of MDMF_CLIPFSAR.forward: a loop over queries, reliable lists, weighted KL."
    tu = F.softmax(_released_cos(tq_up, ts_up, epsilon), -1).max(-1).values
    td = F.softmax(_released_cos(tq_down, ts_down, epsilon), -1).max(-1).values
    vu, vd = F.softmax(-cum_up, -1).max(-1).values, F.softmax(-cum_down, -1).max(-1).values
    t_up, v_up = tu >= td, vu >= vd

    def up_reliable(v, t):
        return (v and t) if t_compare and v_compare else t if t_compare else v if v_compare else None

    def down_reliable(v, t):
        return (
            (not v and not t)
            if t_compare and v_compare
            else (not t)
            if t_compare
            else (not v)
            if v_compare
            else None
        )

    up_rows, down_rows = [], []
    for i in range(len(cum_up)):
        if up_reliable(bool(v_up[i]), bool(t_up[i])):
            up_rows.append(i)
        elif down_reliable(bool(v_up[i]), bool(t_up[i])):
            down_rows.append(i)

    def term(teacher, student, c):  # KL(teacher || student) per row, weighted mean by c
        kl = F.kl_div((-student).softmax(-1).log(), (-teacher).softmax(-1), reduction='none').sum(1)
        return kl @ c / c.sum()

    up_loss = (
        term(cum_up[up_rows], cum_down[up_rows], vu[up_rows] + tu[up_rows]) if up_rows else torch.zeros(())
    )
    down_loss = (
        term(cum_down[down_rows], cum_up[down_rows], vd[down_rows] + td[down_rows])
        if down_rows
        else torch.zeros(())
    )
    if not t_compare and not v_compare:  # no condition: plain KL, summed over the queries
        up_loss = F.kl_div((-cum_down).softmax(-1).log(), (-cum_up).softmax(-1), reduction='none').sum()
        down_loss = F.kl_div((-cum_up).softmax(-1).log(), (-cum_down).softmax(-1), reduction='none').sum()
    return {'bid': up_loss + down_loss, 'up2down': down_loss, 'down2up': up_loss}[direction]


# ---- components -------------------------------------------------------------------------------------------------


def test_pps_top4_equals_fliter_target_feature():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 16, generator=g, dtype=torch.float64)  # [N, D]
    labels = torch.arange(5).repeat_interleave(3)[torch.randperm(15, generator=g)]  # shuffled support
    target = torch.randn(10, 8, 16, generator=g, dtype=torch.float64)  # [Q, T, D]
    ours = pps_probs(pps_similarity(target, tokens, 'top4'), 0.005)
    torch.testing.assert_close(
        ours, _released_pps_probs(tokens[labels], labels, target).float(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize('B,L', [(3, 9), (25, 9), (2, 5)])
def test_mmfe_without_position_embedding_equals_transformer_v1(B, L):
    torch.manual_seed(B)
    m = MMFE(32, heads=8, seq_len=L, pos_emb=False, ffn_dim=64, ffn_act_dropout=0.05).double().eval()
    q, kv = torch.randn(B, L, 32, dtype=torch.float64), torch.randn(B, L, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            m(q, kv)[0], _released_transformer_v1(m, q, kv, kv), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            m(q, kv, return_attn=False)[0], _released_transformer_v1(m, q, kv, kv), rtol=1e-12, atol=1e-12
        )


def test_gtce_equals_temporal_conv_net_and_repeat():
    torch.manual_seed(0)
    gtce = GTCE(16).double().eval()
    feats = torch.randn(4, 8, 16, dtype=torch.float64)
    with torch.no_grad():  # weights away from the initial g = ||v|| so that the weight norm matters
        for p in gtce.parameters():
            p.mul_(1 + torch.rand_like(p))
        torch.testing.assert_close(gtce(feats), _released_global_context(gtce, feats), rtol=1e-12, atol=1e-12)


def test_released_ltce_equals_context_convs():
    torch.manual_seed(0)
    ltce = LTCE(16, 'released').double().eval()
    feats = torch.randn(4, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ltce(feats), _released_local_context(ltce, feats), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('T', [3, 8])
def test_bidirectional_otam_equals_otam_cum_dist_v2(T):
    g = torch.Generator().manual_seed(T)
    cost = 2 * torch.rand(5, 5, T, T, generator=g, dtype=torch.float64)  # [Q, N, T, T] costs in [0, 2]
    c1, c2 = cost.clone().requires_grad_(), cost.clone().requires_grad_()
    ours, theirs = otam_bidirectional(c1), _released_otam_v2(c2) + _released_otam_v2(c2.transpose(-1, -2))
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(otam(cost), _released_otam_v2(cost), rtol=1e-13, atol=1e-13)
    w = torch.randn(5, 5, dtype=torch.float64, generator=g)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-12, atol=1e-12)


def _views(seed, Q=25, N=5, D=16, ties=False):
    "Distances and tokens of both views; with `ties`, some queries score exactly the same in both views."
    g = torch.Generator().manual_seed(seed)
    up, down = 4 * torch.rand(Q, N, generator=g), 4 * torch.rand(Q, N, generator=g)  # LTC, GTC distances
    tq_up, ts_up = torch.randn(Q, D, generator=g), torch.randn(N, D, generator=g)
    tq_down, ts_down = torch.randn(Q, D, generator=g), torch.randn(N, D, generator=g)
    if ties:
        down[:4] = up[:4]  # v ties on queries 0-3
        tq_down, ts_down = torch.cat([tq_up[:2], tq_down[2:]]), ts_up.clone()  # t ties on queries 0-1
    return up, down, tq_up, ts_up, tq_down, ts_down


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('direction', list(RELEASED_DIRECTIONS))
@pytest.mark.parametrize('t_v', list(RELEASED_CONDITIONS))
def test_released_distillation_equals_released_loop(t_v, direction, ties):
    up, down, tq_up, ts_up, tq_down, ts_down = _views(sum(t_v) + len(direction), ties=ties)
    a_up, a_down = up.clone().requires_grad_(), down.clone().requires_grad_()
    b_up, b_down = up.clone().requires_grad_(), down.clone().requires_grad_()
    ours = mutual_distillation(
        a_down,
        a_up,
        (tq_down, ts_down),
        (tq_up, ts_up),
        RELEASED_CONDITIONS[t_v],
        RELEASED_DIRECTIONS[direction],
        released=True,
    ).loss
    theirs = _released_distillation(b_up, b_down, tq_up, ts_up, tq_down, ts_down, *t_v, direction)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    if ours.requires_grad:  # an empty reliable set gives a constant 0 in both
        ours.backward()
        theirs.backward()
        for a, b in ((a_up, b_up), (a_down, b_down)):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_no_condition_is_summed_as_released():
    up, down, tq_up, ts_up, tq_down, ts_down = _views(3)
    theirs = _released_distillation(up, down, tq_up, ts_up, tq_down, ts_down, 0, 0, 'bid')
    ours_mean = mutual_distillation(down, up, (tq_down, ts_down), (tq_up, ts_up), 'none').loss
    torch.testing.assert_close(theirs, 25 * ours_mean, rtol=1e-5, atol=1e-6)  # the factor Q of issue 13


def test_cosine_epsilon_is_small():
    "The released 0.01 in cos_sim changes a cosine by a relative 0.01 / (|a| |b|): below 1e-3 for norms above 4."
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 64, generator=g), torch.randn(40, 64, generator=g)
    a, b = 4 * F.normalize(a, dim=-1), 4 * F.normalize(b, dim=-1)
    rel = (_released_cos(a, b) - _released_cos(a, b, 0.0)).abs() / _released_cos(a, b, 0.0).abs()
    assert rel.max() < 1e-3


# ---- whole heads ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def backbone():
    return build_model(ModelConfig(model='frame-mean')).backbone


def _episode(D, shot, query=2, way=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(way * shot, generator=g)  # the support set in any order
    return (
        torch.randn(way * shot, 8, D, generator=g),
        torch.arange(way).repeat_interleave(shot)[order],
        torch.randn(way * query, 8, D, generator=g),
        torch.arange(way).repeat_interleave(query),
    )


def _released_clip_fsar(
    model: CLIPFSAR, support, s_labels, target, t_labels, text_train, real_rows, weight, merge_before
):
    "CNN_OTAM_CLIPFSAR.forward (training branch) and its loss in train_net_few_shot.py, eval-mode dropout."
    tf = lambda x: _released_transformer_v1(model.transformer, x, x, x)
    video = torch.cat([support, target]).mean(1)
    class_logits = _released_cos(video, text_train, 0.0) * model.video_text_scale
    context = text_train[real_rows[s_labels]][:, None]  # [S, 1, D]
    target_out = tf(target)
    if merge_before:
        support, context = _class_mean(support, s_labels), _class_mean(context, s_labels)
    support_out = tf(torch.cat([support, context], dim=1))[:, : support.shape[1]]  # the token goes last
    if not merge_before:
        support_out = _class_mean(support_out, s_labels)
    logits = -_released_otam_distance(support_out, target_out)  # [Q, N]
    real = real_rows[torch.cat([s_labels, t_labels])]
    loss = F.cross_entropy(logits, t_labels) + weight * F.cross_entropy(class_logits, real)
    return logits, loss


@pytest.mark.parametrize('merge_before', [True, False])
@pytest.mark.parametrize('shot', [1, 5])
def test_clip_fsar_equals_its_released_forward_and_loss(backbone, shot, merge_before):
    torch.manual_seed(shot)
    cfg = ModelConfig(model='clip-fsar', fsar_merge_before=merge_before, video_text_weight=1.5, ffn_dim=128)
    model = build_model(cfg, backbone=backbone).eval()
    with torch.no_grad():
        model.video_text_scale.fill_(2.5)  # a scale that has learnt something
    train = [f'train class {i}' for i in range(12)]
    model.set_text_classes(train)
    rows = torch.tensor([9, 2, 11, 0, 5])  # the episode's classes among the training classes
    names = [train[i] for i in rows]
    support, s_labels, target, t_labels = _episode(model.dim, shot)
    out = model.forward_features(
        support, s_labels, target, model.class_tokens(names), t_labels, class_names=names
    )
    logits, loss = _released_clip_fsar(
        model, support, s_labels, target, t_labels, model.class_tokens(train), rows, 1.5, merge_before
    )
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    _same_gradients(model.transformer, out.loss, loss, extra=[model.video_text_scale])


def _same_gradients(module, ours, theirs, extra=()):
    "The two losses give the same gradient to every parameter of `module` (and to `extra`)."
    params = [p for p in module.parameters() if p.requires_grad] + list(extra)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _released_mdmf_head(model: MDMF, support, s_labels, target, t_labels, tokens, drawn, t_v, direction):
    "MDMF_CLIPFSAR.forward from the CLIP features on (eval mode), given the PPS draw; its loss (lambdas 0, 1, 1)."
    context_support = tokens[s_labels][:, None]  # [S, 1, D]
    soft_target = _class_mean(context_support, s_labels)[drawn]  # [Q, 1, D]

    def branch(mmfe, s_other, t_other):  # text_eh_temporal_transformer, then the slicing of forward
        t_vis, s_vis = torch.cat([soft_target, target], 1), torch.cat([context_support, support], 1)
        t_out = _released_transformer_v1(mmfe, torch.cat([soft_target, t_other], 1), t_vis, t_vis)
        s_out = _class_mean(
            _released_transformer_v1(mmfe, torch.cat([context_support, s_other], 1), s_vis, s_vis), s_labels
        )
        return s_out[:, 1:], t_out[:, 1:]  # frames only; [:, 0] of these is the first frame (the text score)

    s_up, t_up = branch(
        model.mmfe['ltc'], *(_released_local_context(model.extractors['ltc'], x) for x in (support, target))
    )
    s_dn, t_dn = branch(
        model.mmfe['gtc'], *(_released_global_context(model.extractors['gtc'], x) for x in (support, target))
    )
    cum_up, cum_down = _released_otam_distance(s_up, t_up), _released_otam_distance(s_dn, t_dn)
    distill = _released_distillation(
        cum_up, cum_down, t_up[:, 0], s_up[:, 0], t_dn[:, 0], s_dn[:, 0], *t_v, direction
    )
    logits = -cum_up - cum_down
    return logits, F.cross_entropy(logits, t_labels, reduction='sum') + distill


@pytest.mark.parametrize(
    't_v,direction', [((1, 0), 'up2down'), ((1, 1), 'bid'), ((0, 1), 'down2up'), ((0, 0), 'bid')]
)
def test_released_config_equals_the_released_head(backbone, t_v, direction):
    random.seed(0)
    torch.manual_seed(0)
    cfg = ModelConfig.released(
        distill_condition=RELEASED_CONDITIONS[t_v],
        distill_direction=RELEASED_DIRECTIONS[direction],
        ffn_dim=128,
    )
    model = MDMF(cfg, backbone=backbone).eval()
    support, s_labels, target, t_labels = _episode(model.dim, shot=3, query=3)
    tokens = torch.randn(5, model.dim)
    out = model.forward_features(
        support, s_labels, target, tokens, t_labels, generator=torch.Generator().manual_seed(1)
    )
    logits, loss = _released_mdmf_head(
        model, support, s_labels, target, t_labels, tokens, out.extras['pps_drawn'], t_v, direction
    )
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    assert set(out.losses) == {'main', 'distill'}
    # nothing detached either
    _same_gradients(torch.nn.ModuleList([model.extractors, model.mmfe]), out.loss, loss)


# ---- the released training recipes ------------------------------------------------------------------------------
# Transcriptions of the released configuration files, written here from the files themselves (not from
# mdmf.config), so that a wrong value in the package's recipes shows up as a difference.

# CLIP-FSAR, configs/projects/CLIPFSAR/<dir>/CLIPFSAR_<name>_<shot>shot_v1.yaml: (line, value) of each key read.
FSAR_YAML = {
    ('hmdb51', 1): dict(
        NUM_TRAIN_TASKS=(15, 5000),
        VAL_FRE_ITER=(17, 300),
        BASE_LR=(61, 1e-5),
        STEPS_ITER=(63, 700),
        STEPS=(64, [0, 4, 6]),
        LRS=(65, [1, 0.1, 0.01]),
        MAX_EPOCH=(66, 10),
        WARMUP_EPOCHS=(69, 1),
        WARMUP_START_LR=(70, 1e-6),
        NUM_GPUS=(84, 4),
        BATCH_SIZE_PER_TASK=(20, 4),
    ),
    ('hmdb51', 5): dict(
        NUM_TRAIN_TASKS=(17, 5000),
        VAL_FRE_ITER=(19, 300),
        BASE_LR=(63, 1e-5),
        STEPS_ITER=(65, 700),
        STEPS=(66, [0, 4, 6]),
        LRS=(67, [1, 0.1, 0.01]),
        MAX_EPOCH=(68, 10),
        WARMUP_EPOCHS=(71, 1),
        WARMUP_START_LR=(72, 1e-6),
        NUM_GPUS=(86, 4),
        BATCH_SIZE_PER_TASK=(22, 4),
    ),
    ('kinetics100', 1): dict(
        NUM_TRAIN_TASKS=(16, 5000),
        VAL_FRE_ITER=(18, 100),
        BASE_LR=(61, 1e-5),
        STEPS_ITER=(63, 250),
        STEPS=(64, [0, 6, 9]),
        LRS=(65, [1, 0.1, 0.01]),
        MAX_EPOCH=(66, 10),
        WARMUP_EPOCHS=(69, 1),
        WARMUP_START_LR=(70, 5e-6),
        NUM_GPUS=(85, 4),
        BATCH_SIZE_PER_TASK=(21, 4),
    ),
    ('kinetics100', 5): dict(
        NUM_TRAIN_TASKS=(18, 5000),
        VAL_FRE_ITER=(20, 100),
        BASE_LR=(63, 1e-5),
        STEPS_ITER=(65, 250),
        STEPS=(66, [0, 6, 9]),
        LRS=(67, [1, 0.1, 0.01]),
        MAX_EPOCH=(68, 10),
        WARMUP_EPOCHS=(71, 1),
        WARMUP_START_LR=(72, 5e-6),
        NUM_GPUS=(87, 4),
        BATCH_SIZE_PER_TASK=(23, 4),
    ),
    ('ucf101', 1): dict(
        NUM_TRAIN_TASKS=(15, 3000),
        VAL_FRE_ITER=(17, 100),
        BASE_LR=(61, 2e-6),
        STEPS_ITER=(63, 600),
        STEPS=(64, [0, 4, 6]),
        LRS=(65, [1, 0.1, 0.01]),
        MAX_EPOCH=(66, 10),
        WARMUP_EPOCHS=(69, 1),
        WARMUP_START_LR=(70, 1e-7),
        NUM_GPUS=(85, 4),
        BATCH_SIZE_PER_TASK=(20, 4),
    ),
    ('ucf101', 5): dict(
        NUM_TRAIN_TASKS=(17, 3000),
        VAL_FRE_ITER=(19, 100),
        BASE_LR=(61, 2e-6),
        STEPS_ITER=(63, 600),
        STEPS=(64, [0, 4, 6]),
        LRS=(65, [1, 0.1, 0.01]),
        MAX_EPOCH=(68, 10),
        WARMUP_EPOCHS=(71, 1),
        WARMUP_START_LR=(72, 1e-7),
        NUM_GPUS=(87, 4),
        BATCH_SIZE_PER_TASK=(22, 4),
    ),
    ('ssv2_small', 1): dict(
        NUM_TRAIN_TASKS=(14, 30000),
        VAL_FRE_ITER=(16, 1000),
        BASE_LR=(59, 5e-5),
        STEPS_ITER=(61, 2000),
        STEPS=(62, [0, 4, 6]),
        LRS=(63, [1, 0.1, 0.01]),
        MAX_EPOCH=(64, 10),
        WARMUP_EPOCHS=(67, 1),
        WARMUP_START_LR=(68, 2e-5),
        NUM_GPUS=(82, 4),
        BATCH_SIZE_PER_TASK=(18, 4),
    ),
    ('ssv2_small', 5): dict(
        NUM_TRAIN_TASKS=(16, 30000),
        VAL_FRE_ITER=(18, 1000),
        BASE_LR=(61, 5e-5),
        STEPS_ITER=(63, 2000),
        STEPS=(64, [0, 4, 6]),
        LRS=(65, [1, 0.1, 0.01]),
        MAX_EPOCH=(66, 10),
        WARMUP_EPOCHS=(69, 1),
        WARMUP_START_LR=(70, 2e-5),
        NUM_GPUS=(84, 4),
        BATCH_SIZE_PER_TASK=(20, 4),
    ),
    ('ssv2_full', 1): dict(
        NUM_TRAIN_TASKS=(14, 30000),
        VAL_FRE_ITER=(16, 1000),
        BASE_LR=(58, 5e-5),
        STEPS_ITER=(60, 4000),
        STEPS=(61, [0, 4, 6]),
        LRS=(62, [1, 0.1, 0.01]),
        MAX_EPOCH=(63, 10),
        WARMUP_EPOCHS=(66, 1),
        WARMUP_START_LR=(67, 1e-5),
        NUM_GPUS=(81, 4),
        BATCH_SIZE_PER_TASK=(19, 4),
    ),
    ('ssv2_full', 5): dict(
        NUM_TRAIN_TASKS=(16, 30000),
        VAL_FRE_ITER=(18, 1000),
        BASE_LR=(60, 5e-5),
        STEPS_ITER=(62, 4000),
        STEPS=(63, [0, 4, 6]),
        LRS=(64, [1, 0.1, 0.01]),
        MAX_EPOCH=(65, 10),
        WARMUP_EPOCHS=(68, 1),
        WARMUP_START_LR=(69, 1e-5),
        NUM_GPUS=(83, 4),
        BATCH_SIZE_PER_TASK=(21, 4),
    ),
}
FSAR_OPTIMIZER_WEIGHT_DECAY = (
    1e-3  # configs/pool/run/training/finetune.yaml line 51, read by models/utils/optimizer.py line 104
)
FSAR_BN_WEIGHT_DECAY = (
    0.0  # finetune.yaml line 58: the group of parameters named *bn* / *norm* (optimizer.py lines 60-61, 72)
)

# CLIP-MDMF, run_clip_fsar_decison_now.py: argparse defaults (line, value).
MDMF_ARGS = dict(
    learning_rate=(59, 1e-6),
    tasks_per_batch=(60, 16),
    training_iterations=(62, 20020),
    test_iters=(65, [14000, 16000, 18000, 20000]),
    dist_direction=(105, 'up2down'),
    dist_condition=(106, [1, 0]),
)
# configs/projects/CLIPFSAR/kinetics100/CLIPFSAR_K100_1shot_v1.yaml
MDMF_K100_1SHOT_SINGLE_DIRECT = (28, True)


def _v(d, key):
    return d[key][1]


def _released_fsar_lr(cfg: dict, iteration: int) -> float:
    "runs/train_net_few_shot.py lines 59, 66, 95 (its epoch counter) and models/utils/lr_policy.py lines 10-70."
    S = _v(cfg, 'STEPS_ITER')
    # cur_epoch + NUM_FOLDS * cur_iter / data_size, NUM_FOLDS 1
    epoch = iteration // S + 1 * float(iteration) / S

    def relative(e):  # lr_func_steps_with_relative_lrs, get_step_index
        steps = _v(cfg, 'STEPS') + [_v(cfg, 'MAX_EPOCH')]
        for ind, step in enumerate(steps):  # noqa: B007 (ind is read after the loop, as the released code does)
            if e < step:
                break
        return _v(cfg, 'LRS')[ind - 1] * _v(cfg, 'BASE_LR')

    lr = relative(epoch)
    if epoch < _v(cfg, 'WARMUP_EPOCHS'):
        start, end = _v(cfg, 'WARMUP_START_LR'), relative(_v(cfg, 'WARMUP_EPOCHS'))
        lr = epoch * (end - start) / _v(cfg, 'WARMUP_EPOCHS') + start
    return lr


@pytest.mark.parametrize('dataset,shot', list(FSAR_YAML))
def test_released_fsar_recipe_equals_its_config(dataset, shot):
    from mdmf.config import resolve_config

    y = FSAR_YAML[dataset, shot]
    cfg = resolve_config(['--preset', dataset, '--recipe', 'released-fsar', '--shot', str(shot)])
    G = _v(y, 'NUM_GPUS')
    assert (cfg.recipe, cfg.model.model, cfg.optim.lr, cfg.optim.warmup_lr) == (
        'released-fsar',
        'clip-fsar',
        _v(y, 'BASE_LR'),
        _v(y, 'WARMUP_START_LR'),
    )
    assert cfg.optim.train_episodes == _v(y, 'NUM_TRAIN_TASKS') * G  # 20k HMDB51/K100, 12k UCF101, 120k SSv2
    assert cfg.optim.accum == _v(y, 'BATCH_SIZE_PER_TASK') * G  # a step every 4 iterations of 4 GPUs
    assert cfg.eval.val_every == _v(y, 'VAL_FRE_ITER') * G
    assert (cfg.optim.weight_decay, cfg.optim.decay_norms) == (
        FSAR_OPTIMIZER_WEIGHT_DECAY,
        FSAR_BN_WEIGHT_DECAY != 0,
    )
    assert (cfg.model.freeze_bn, cfg.model.input_norm, cfg.data.flip) == (False, 'clip', False)
    assert (cfg.data.train_frames, cfg.data.test_frames, cfg.model.prompt) == (
        'segments',
        'segments',
        'a photo of {}',
    )


@pytest.mark.parametrize('dataset,shot', list(FSAR_YAML))
def test_lr_schedule_equals_clip_fsar_at_its_steps(dataset, shot):
    "The rate of optimiser step k: the released code sets it at iteration 4k + 3 (its last before the step)."
    from mdmf.config import lr_at, resolve_config

    y = FSAR_YAML[dataset, shot]
    o = resolve_config(['--preset', dataset, '--recipe', 'released-fsar']).optim
    G, S = _v(y, 'NUM_GPUS'), _v(y, 'STEPS_ITER')
    ramp = _v(y, 'BASE_LR') - _v(y, 'WARMUP_START_LR')
    for k in sorted(
        {
            0,
            1,
            50,
            S // 4 - 1,
            S // 4,
            S // 2 - 1,
            S // 2,
            3 * S // 4 - 1,
            3 * S // 4,
            5 * S // 4 - 1,
            5 * S // 4,
            _v(y, 'NUM_TRAIN_TASKS') // 4 - 1,
        }
    ):
        it = 4 * k + 3  # the released iteration whose rate step k uses
        ours, theirs = lr_at(o, o.accum * (k + 1) - 1), _released_fsar_lr(y, it)  # the window's last episode
        if it < S:
            assert abs(ours - theirs) <= 3 / (4 * S) * ramp + 1e-18, (k, ours, theirs)  # warm-up: per episode
        else:
            assert ours == pytest.approx(theirs, rel=1e-12, abs=0), (k, ours, theirs)
    assert lr_at(o, G * _v(y, 'NUM_TRAIN_TASKS') - 1) == pytest.approx(0.01 * _v(y, 'BASE_LR'))


def test_released_mdmf_recipe_equals_its_run_script():
    from mdmf.config import resolve_config
    from mdmf.distill import RELEASED_DIRECTIONS
    from mdmf.train import _crossed

    for dataset in ('hmdb51', 'ucf101', 'kinetics100', 'ssv2_small', 'ssv2_full'):
        for shot in (1, 5):
            cfg = resolve_config(['--preset', dataset, '--recipe', 'released-mdmf', '--shot', str(shot)])
            m, o, e = cfg.model, cfg.optim, cfg.eval
            # torch.optim.Adam(lr=...) (line 209), MultiStepLR gamma 1 (line 215): no schedule
            assert (o.lr, o.accum, o.train_episodes, o.weight_decay, o.lr_warmup, o.lr_steps) == (
                _v(MDMF_ARGS, 'learning_rate'),
                _v(MDMF_ARGS, 'tasks_per_batch'),
                _v(MDMF_ARGS, 'training_iterations'),
                0.0,
                0,
                [],
            )
            assert (
                m.distill_direction
                == RELEASED_DIRECTIONS[_v(MDMF_ARGS, 'dist_direction')]
                == 'gtc_teaches_ltc'
            )
            assert m.distill_condition == RELEASED_CONDITIONS[tuple(_v(MDMF_ARGS, 'dist_condition'))]
            assert m.bidirectional == (
                not (dataset == 'kinetics100' and shot == 1 and MDMF_K100_1SHOT_SINGLE_DIRECT[1])
            )
            # ToTensor only; BN eval until a test
            assert (m.input_norm, m.freeze_bn, o.unfreeze_bn_after_val) == ('none', True, True)
            assert (cfg.data.flip, cfg.data.train_frames, cfg.data.test_frames) == (
                True,
                'trx-released',
                'test-released',
            )
            rounds = [
                now
                for now in range(o.accum, o.train_episodes, o.accum)
                if _crossed(now - o.accum, now, e.val_every) and now >= e.val_start
            ]
            assert rounds == _v(MDMF_ARGS, 'test_iters')  # its test rounds (on val here), then one at the end
    assert ModelConfig.released().distill_direction == 'gtc_teaches_ltc'


def test_paper_recipe_changes_nothing():
    from mdmf.config import preset_config, resolve_config

    for preset in ('synthetic', 'hmdb51', 'ssv2_full'):
        assert (
            resolve_config(['--preset', preset])
            == resolve_config(['--preset', preset, '--recipe', 'paper'])
            == preset_config(preset)
        )


# CLIP-MDMF video_reader.py get_seq, lines 296-320, with its random.randint passed in.
def _released_mdmf_indices(n, T, train, randint):
    if n == T:
        return list(range(n))
    if train:
        excess_pad = int(min(5, (n - T) / 2))
        if excess_pad < 1:
            start, end = 0, n - 1
        else:
            start, end = randint(0, excess_pad), randint(n - 1 - excess_pad, n - 1)
    else:
        start, end = 1, n - 2
    if end - start < T:
        end, start = n - 1, 0
    return [int(f) for f in np.linspace(start, end, num=T)]


# CLIP-FSAR datasets/base/base_dataset.py _interval_based_sampling, lines 505-508 (SAMPLING_RATE 50 > 40).
def _released_fsar_indices(n, T, randint):
    interval = n // T
    return [randint(ind * interval, ind * interval + interval - 1) for ind in range(T)]


@pytest.mark.parametrize('n', [8, 9, 12, 18, 19, 40, 300])
def test_released_frame_modes_equal_the_released_loaders(n):
    from mdmf.video import frame_indices

    assert frame_indices(n, 8, 'test-released').tolist() == _released_mdmf_indices(n, 8, False, None)
    pairs, offsets = set(), set()
    for s in range(400):
        got = frame_indices(n, 8, 'trx-released', np.random.default_rng(s)).tolist()
        draws = iter([got[0], got[-1]])  # the two numbers its randint drew, read back from the window's ends
        assert got == _released_mdmf_indices(n, 8, True, lambda a, b: _in(next(draws), a, b)), (n, got)
        pairs.add((got[0], got[-1]))
        seg = frame_indices(n, 8, 'segments', np.random.default_rng(s)).tolist()
        draws = iter(seg)
        assert seg == _released_fsar_indices(n, 8, lambda a, b: _in(next(draws), a, b)), (n, seg)
        offsets.update(i - k * (n // 8) for k, i in enumerate(seg))
    pad = int(min(5, (n - 8) / 2))
    if pad >= 1 and 2 * pad + 8 <= n - 1:  # every (start, end) the released loader can draw is drawn
        assert pairs == {(a, b) for a in range(pad + 1) for b in range(n - 1 - pad, n)}
    assert offsets == set(range(n // 8))  # every frame of a segment can be drawn


def _in(x, a, b):
    assert a <= x <= b, (x, a, b)  # a draw inside the released code's inclusive randint range
    return x


def test_input_normalisation_off_feeds_unit_pixels():
    "The released CLIP-MDMF loader feeds torchvision's ToTensor output: uint8 / 255, no mean/std (video_reader.py line 332)."
    from mdmf.video import CLIP_MEAN, CLIP_STD

    torch.manual_seed(0)
    bb = build_model(ModelConfig(model='frame-mean', backbone='tiny-rn', input_norm='none')).backbone.eval()
    frames = torch.randint(0, 256, (2, 3, 3, 64, 64), dtype=torch.uint8)  # [B, T, 3, S, S]
    with torch.no_grad():
        ours = bb.encode_frames(frames)
        unit = bb.clip.visual(frames.flatten(0, 1).float() / 255).reshape(2, 3, -1)
        mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
        clip_in = bb.clip.visual((frames.flatten(0, 1).float() / 255 - mean) / std).reshape(2, 3, -1)
        bb.input_norm = 'clip'
        torch.testing.assert_close(bb.encode_frames(frames), clip_in)
    torch.testing.assert_close(ours, unit)
    assert not torch.allclose(ours, clip_in)


def _tiny_hmdb51(recipe: str):
    "The hmdb51 preset under `recipe` with a tiny ResNet CLIP on the CPU."
    from mdmf.config import resolve_config

    return resolve_config(
        f'--recipe {recipe} --preset hmdb51 --backbone tiny-rn --ffn-dim 32 --device cpu --no-amp'.split()
    )


@pytest.mark.parametrize('recipe,after', [('paper', False), ('released-mdmf', True)])
def test_bn_mode_switches_after_the_first_val_round(tmp_path, recipe, after):
    "Released CLIP-MDMF: CLIP's load() returns the model in eval mode, model.train() comes after its first test."
    from mdmf.train import Trainer

    cfg = _tiny_hmdb51(recipe)
    t = Trainer(cfg, folder=tmp_path, quiet=True)
    bns = [
        m
        for m in t.model.backbone.clip.visual.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    t.model.train()
    assert bns and not any(m.training for m in bns)  # frozen until a val round
    t.state['history'].append(dict(kind='val', episode=16))
    t.set_bn_mode()
    assert all(m.training == after for m in bns)
    t.model.eval()
    t.model.train()
    assert all(m.training == after for m in bns)
    fsar = Trainer(_tiny_hmdb51('released-fsar'), folder=tmp_path / 'f', quiet=True)
    fsar.model.train()
    assert all(
        m.training
        for m in fsar.model.backbone.clip.visual.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    )


def test_clip_fsar_prompt_has_no_period():
    "few_shot.py line 2718: 'a photo of {}'.format(name), the names as its configs list them (CLASS_NAME)."
    from mdmf.config import resolve_config

    cfg = resolve_config(['--preset', 'hmdb51', '--recipe', 'released-fsar'])
    assert (
        cfg.model.prompt.format('draw_sword')
        == 'a photo of {}'.format('draw_sword')
        == 'a photo of draw_sword'
    )
    # the paper recipe keeps the project's
    assert resolve_config(['--preset', 'hmdb51']).model.prompt == 'a photo of {}.'
