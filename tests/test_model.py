"""The model and its baselines: shapes for every model and ablation, released switches, gradients, autocast, learning."""

import pytest
import torch

from mdmf.data import random_episode
from mdmf.model import (
    ABLATIONS,
    CLIPFSAR,
    MDMF,
    MODELS,
    VIEWS,
    FrameMean,
    ModelConfig,
    ModelOutput,
    ZeroShotCLIP,
    build_model,
)

SIZES = [(1, 1), (5, 1), (1, 5), (5, 5)]  # (shot, queries per class), 5-way


@pytest.fixture(scope='module')
def backbone():
    return build_model(ModelConfig(model='frame-mean')).backbone


def _features(D, shot=1, query=1, way=5, T=8, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(way * shot, T, D, generator=g),
        torch.arange(way).repeat_interleave(shot),
        torch.randn(way * query, T, D, generator=g),
        torch.randn(way, D, generator=g),
        torch.arange(way).repeat_interleave(query) if labels else None,
    )


def _episode(size, shot=1, query=1):
    "`random_episode` with float frames, as the model's positional arguments."
    e = random_episode(5, shot, query, 8, size, normal=True)
    return e['support'], e['support_labels'], e['query'], e['class_names'], e['query_labels']


def _grad(module):
    return sum(0.0 if p.grad is None else p.grad.abs().sum().item() for p in module.parameters())


def test_config_validation_and_released():
    with pytest.raises(ValueError):
        ModelConfig(model='trx')
    with pytest.raises(ValueError):
        ModelConfig(text_score='first')
    rel = ModelConfig.released()
    assert (
        rel.ltce_variant,
        rel.pos_emb,
        rel.pps_similarity,
        rel.text_score,
        rel.detach_teacher,
        rel.distill_ties,
        rel.distill_condition,
        rel.loss_reduction,
        rel.ffn_act_dropout,
        rel.prompt,
    ) == ('released', False, 'top4', 'released', False, 'ltc', 't', 'sum', 0.05, 'a photo of {}')
    assert ModelConfig.released(pos_emb=True).pos_emb
    for over in ABLATIONS.values():
        ModelConfig(**over)


def test_build_model_classes(backbone):
    classes = dict(zip(MODELS, (MDMF, CLIPFSAR, FrameMean, ZeroShotCLIP)))
    for name in MODELS:
        m = build_model(ModelConfig(model=name), backbone=backbone)
        assert type(m) is classes[name] and m.backbone is backbone


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('shot,query', SIZES)
def test_every_model_shapes(backbone, name, shot, query):
    m = build_model(ModelConfig(model=name), backbone=backbone)
    out = m.forward_features(*_features(m.dim, shot, query))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (5 * query, 5) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    for v in out.view_logits.values():
        assert v.shape == (5 * query, 5)


@pytest.mark.parametrize('name', MODELS)
def test_every_model_on_frames(backbone, name):
    m = build_model(ModelConfig(model=name), backbone=backbone)
    out = m(*_episode(backbone.image_size, shot=2, query=1))
    assert out.logits.shape == (5, 5) and torch.isfinite(out.loss)


@pytest.mark.parametrize('ablation', list(ABLATIONS))
def test_every_ablation_shapes(backbone, ablation):
    m = MDMF(ModelConfig(**ABLATIONS[ablation]), backbone=backbone)
    for shot, query in SIZES:
        out = m.forward_features(*_features(m.dim, shot, query, seed=shot + query))
        assert out.logits.shape == (5 * query, 5)
        assert torch.isfinite(out.loss)
        assert set(out.view_logits) == set(VIEWS[m.cfg.views])
        assert ('distill' in out.losses) == (m.cfg.views == 'both' and m.cfg.distill)
        assert set(out.extras['attention']) == set(VIEWS[m.cfg.views])
        for b in VIEWS[m.cfg.views]:
            assert out.extras['attention'][b]['query'].shape == (5 * query, 9, 9)
            assert out.extras['cost'][b].shape == (5 * query, 5, 8, 8)


def test_extras_and_no_labels(backbone):
    m = MDMF(ModelConfig(), backbone=backbone)
    out = m.forward_features(
        *_features(m.dim, 2, 3, labels=False), generator=torch.Generator().manual_seed(0)
    )
    assert out.loss is None and 'main' not in out.losses
    ex = out.extras
    assert ex['pps_probs'].shape == (15, 5) and ex['pps_drawn'].shape == (15,)
    assert ex['omega_g'].shape == (15,) and ex['omega_g'].dtype == torch.bool
    assert not (ex['omega_g'] & ex['omega_l']).any()
    assert set(ex['posteriors']) == {'gtc', 'ltc'} and ex['posteriors']['gtc'].visual.shape == (15, 5)
    off = MDMF(ModelConfig(pps=False, return_attention=False), backbone=backbone)
    out = off.forward_features(*_features(m.dim, 1, 2))
    assert ex is not out.extras and out.extras['attention'] == {}
    assert torch.equal(out.extras['query_tokens'], torch.zeros(10, m.dim))


def test_fused_logits_use_alphas(backbone):
    torch.manual_seed(0)
    m = MDMF(ModelConfig(alpha_gtc=0.3, alpha_ltc=2.0), backbone=backbone).eval()
    out = m.forward_features(*_features(m.dim, 2, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.logits, 0.3 * out.view_logits['gtc'] + 2.0 * out.view_logits['ltc'])
    torch.testing.assert_close(
        out.losses['main'],
        torch.nn.functional.cross_entropy(out.logits, torch.arange(5).repeat_interleave(2)),
    )


def test_ntc_is_self_attention_without_extractor(backbone):
    m = MDMF(ModelConfig(views='ntc'), backbone=backbone)
    assert isinstance(m.extractors['ntc'], torch.nn.Identity)
    assert set(m.mmfe) == {'ntc'}


def _eval_out(cfg, backbone, seed=0):
    torch.manual_seed(seed)
    m = MDMF(cfg, backbone=backbone).eval()
    return m.forward_features(*_features(m.dim, 1, 1), generator=torch.Generator().manual_seed(0))


def test_released_switches_change_behaviour(backbone):
    base = _eval_out(ModelConfig(), backbone)
    differ = lambda a, b: not torch.allclose(a.detach(), b.detach())
    assert differ(
        _eval_out(ModelConfig(text_score='released'), backbone).extras['posteriors']['ltc'].t,
        base.extras['posteriors']['ltc'].t,
    )
    torch.testing.assert_close(
        _eval_out(ModelConfig(loss_reduction='sum'), backbone).losses['main'], 5 * base.losses['main']
    )
    assert differ(
        _eval_out(ModelConfig(ltce_variant='released'), backbone).view_logits['ltc'], base.view_logits['ltc']
    )
    assert differ(_eval_out(ModelConfig(pos_emb=False), backbone).logits, base.logits)
    assert differ(
        _eval_out(ModelConfig(pps_similarity='top4'), backbone).extras['pps_probs'], base.extras['pps_probs']
    )
    rel = _eval_out(ModelConfig.released(), backbone)
    assert differ(rel.logits, base.logits)
    # condition 't', ties to LTC: every query decided
    assert torch.equal(rel.extras['omega_l'], ~rel.extras['omega_g'])


def test_same_generator_same_draw(backbone):
    a, b = _eval_out(ModelConfig(), backbone), _eval_out(ModelConfig(), backbone)
    assert torch.equal(a.extras['pps_drawn'], b.extras['pps_drawn'])
    torch.testing.assert_close(a.logits, b.logits)


def test_forward_is_encode_plus_forward_features(backbone):
    torch.manual_seed(0)
    m = MDMF(ModelConfig(), backbone=backbone).eval()
    support, s_lab, query, names, q_lab = _episode(backbone.image_size, 1, 1)
    with torch.no_grad():
        a = m(support, s_lab, query, names, q_lab, generator=torch.Generator().manual_seed(1))
        b = m.forward_features(
            m.encode_frames(support),
            s_lab,
            m.encode_frames(query),
            m.class_tokens(names),
            q_lab,
            generator=torch.Generator().manual_seed(1),
        )
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    m = MDMF(ModelConfig())
    m(*_episode(m.backbone.image_size, 2, 2)).loss.backward()
    for part in (
        m.backbone.clip.visual,
        m.extractors['gtc'],
        m.extractors['ltc'],
        m.mmfe['gtc'],
        m.mmfe['ltc'],
    ):
        assert _grad(part) > 0, type(part).__name__
    assert _grad(m.backbone.clip.transformer) == 0  # frozen text encoder


@pytest.mark.parametrize(
    'direction,teacher,student', [('gtc_teaches_ltc', 'gtc', 'ltc'), ('ltc_teaches_gtc', 'ltc', 'gtc')]
)
def test_detached_teacher_gets_no_distillation_gradient(backbone, direction, teacher, student):
    for detach in (True, False):
        torch.manual_seed(0)
        m = MDMF(
            ModelConfig(distill_condition='none', distill_direction=direction, detach_teacher=detach),
            backbone=backbone,
        )
        m.forward_features(*_features(m.dim, 2, 2)).losses['distill'].backward()
        t_grad = _grad(m.extractors[teacher]) + _grad(m.mmfe[teacher])
        assert (t_grad == 0) == detach
        assert _grad(m.extractors[student]) > 0 and _grad(m.mmfe[student]) > 0


def test_clip_fsar_parts(backbone):
    m = build_model(ModelConfig(model='clip-fsar', video_text_weight=0.5), backbone=backbone)
    s, sl, q, tok, ql = _features(m.dim, 2, 1)
    out = m.forward_features(s, sl, q, tok, ql)  # no training classes set: the episode's classes
    assert set(out.losses) == {'main', 'video_text'} and out.extras['video_text_classes'] == 5
    video = torch.cat([s, q]).mean(1)  # support and query videos
    # scale 1.0
    logits = torch.nn.functional.normalize(video, dim=-1) @ torch.nn.functional.normalize(tok, dim=-1).T
    torch.testing.assert_close(
        out.losses['video_text'], 0.5 * torch.nn.functional.cross_entropy(logits, torch.cat([sl, ql]))
    )
    # MERGE_BEFORE: one sequence per class
    assert out.extras['attention']['fsar']['support'].shape == (5, 9, 9)
    assert out.extras['attention']['fsar']['query'].shape == (5, 8, 8)  # the query carries no token
    assert m.transformer.pos is None and isinstance(m.video_text_scale, torch.nn.Parameter)
    assert [type(x).__name__ for x in m.transformer.ffn[1]] == ['GELU', 'Dropout']


def test_clip_fsar_text_classes(backbone):
    m = build_model(ModelConfig(model='clip-fsar'), backbone=backbone)
    train = [f'action {i}' for i in range(12)]
    m.set_text_classes(train)
    names = [train[i] for i in (11, 0, 5, 3, 8)]
    s, sl, q, _, ql = _features(m.dim, 1, 2)
    out = m.forward_features(s, sl, q, m.class_tokens(names), ql, class_names=names)
    assert out.extras['video_text_classes'] == 12
    out.loss.backward()
    assert m.video_text_scale.grad is not None and m.video_text_scale.grad.abs() > 0  # the scale learns
    with pytest.raises(ValueError, match='class_names'):
        m.forward_features(s, sl, q, m.class_tokens(names), ql)
    with pytest.raises(ValueError, match='not among'):
        m.forward_features(s, sl, q, m.class_tokens(names), ql, class_names=['unseen'] + names[1:])
    with pytest.raises(ValueError, match='unique'):
        m.set_text_classes(['a', 'a'])
    assert m.forward_features(s, sl, q, m.class_tokens(names)).loss is None  # evaluation needs no names
    for name in ('mdmf', 'frame-mean', 'zero-shot'):
        other = build_model(ModelConfig(model=name), backbone=backbone)
        assert other.set_text_classes(train) is None and not hasattr(other, 'text_classes')


def test_clip_fsar_merge_before_or_after(backbone):
    torch.manual_seed(0)
    before = build_model(ModelConfig(model='clip-fsar'), backbone=backbone).eval()
    after = build_model(ModelConfig(model='clip-fsar', fsar_merge_before=False), backbone=backbone).eval()
    after.load_state_dict(before.state_dict())
    one = _features(before.dim, 1, 2)  # one shot: merging before or after is the same
    torch.testing.assert_close(before.forward_features(*one).logits, after.forward_features(*one).logits)
    five = _features(before.dim, 5, 1)  # five shots: the transformer sees different inputs
    assert not torch.allclose(before.forward_features(*five).logits, after.forward_features(*five).logits)
    assert after.forward_features(*five).extras['attention']['fsar']['support'].shape == (25, 9, 9)


def test_frame_mean_is_order_blind_and_zero_shot_ignores_support(backbone):
    D = backbone.dim
    x = torch.randn(1, 8, D)
    for metric in ('cosine', 'euclidean'):
        m = build_model(ModelConfig(model='frame-mean', frame_mean_metric=metric), backbone=backbone)
        out = m.forward_features(torch.cat([x, x.flip(1)]), torch.arange(2), x, torch.randn(2, D))
        torch.testing.assert_close(out.logits[0, 0], out.logits[0, 1])
    mdmf = MDMF(ModelConfig(pps=False), backbone=backbone).eval()
    out = mdmf.forward_features(torch.cat([x, x.flip(1)]), torch.arange(2), x, torch.zeros(2, D))
    assert out.logits[0, 0] > out.logits[0, 1]  # OTAM sees the order
    z = build_model(ModelConfig(model='zero-shot'), backbone=backbone)
    s, sl, q, tok, ql = _features(D, 1, 2)
    a = z.forward_features(s, sl, q, tok, ql)
    b = z.forward_features(torch.randn_like(s), sl, q, tok, ql)
    torch.testing.assert_close(a.logits, b.logits)


@pytest.mark.parametrize('name', MODELS)
def test_autocast_bf16(backbone, name):
    m = build_model(ModelConfig(model=name), backbone=backbone)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(*_episode(backbone.image_size, 1, 2))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


def test_training_lowers_loss_on_order_task():
    """5 classes = the same 8 frames in 5 orders, fresh noise each step: MDMF learns, frame-mean cannot."""
    way, T, size = 5, 8, 64
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(T, 3, size, size, generator=g)
    orders = torch.stack([torch.randperm(T, generator=g) for _ in range(way)])
    labels = torch.arange(way)

    def run(cfg, steps=20):
        torch.manual_seed(0)
        m = build_model(cfg)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for step in range(steps):
            gs = torch.Generator().manual_seed(100 + step)
            videos = lambda n: (
                frames[orders].repeat_interleave(n, 0) + torch.randn(way * n, T, 3, size, size, generator=gs)
            )
            out = m(videos(1), labels, videos(2), [f'o{i}' for i in range(way)], labels.repeat_interleave(2))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.losses['main'].item())
        return losses

    mdmf = run(ModelConfig(ffn_dim=256))
    assert sum(mdmf[-5:]) / 5 < 0.5 * mdmf[0]
    mean = run(ModelConfig(model='frame-mean'), steps=5)
    assert min(mean) > 1.5


def test_table5_rows_carry_the_papers_labels():
    t5 = {k: v for k, v in ABLATIONS.items() if k.startswith('T5 ')}
    assert len(t5) == 12
    # GTC teaches
    assert t5['T5 up->down v-compare'] == dict(distill_condition='v', distill_direction='gtc_teaches_ltc')
    assert t5['T5 down->up t-compare'] == dict(distill_condition='t', distill_direction='ltc_teaches_gtc')
    assert t5['T5 bidirectional no condition'] == dict(distill_condition='none', distill_direction='both')
    assert ModelConfig(**t5['T5 bidirectional v+t-compare']) == ModelConfig()  # the full model


def test_no_condition_distillation_follows_loss_reduction(backbone):
    mean = _eval_out(ModelConfig(distill_condition='none'), backbone)
    summed = _eval_out(ModelConfig(distill_condition='none', loss_reduction='sum'), backbone)
    # 5 queries: summed, not averaged
    torch.testing.assert_close(summed.losses['distill'], 5 * mean.losses['distill'])
    cond = _eval_out(ModelConfig(distill_condition='t'), backbone)
    # with a condition: a weighted mean either way
    torch.testing.assert_close(
        _eval_out(ModelConfig(distill_condition='t', loss_reduction='sum'), backbone).losses['distill'],
        cond.losses['distill'],
    )


def test_default_mmfe_has_one_ffn_dropout(backbone):
    m = MDMF(ModelConfig(), backbone=backbone)
    assert all(isinstance(x.ffn[1], torch.nn.GELU) for x in m.mmfe.values())
    r = MDMF(ModelConfig.released(), backbone=backbone)
    assert all(x.ffn[1][1].p == 0.05 for x in r.mmfe.values())
    assert list(m.state_dict()) == list(
        MDMF(ModelConfig(ffn_act_dropout=0.05), backbone=backbone).state_dict()
    )
