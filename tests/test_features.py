"""The frozen-backbone fast path: draws, the feature bank, feature episodes, their exactness, and the projection.

A tiny synthetic dataset is made once per session; every model here is a tiny backbone.
"""

import numpy as np
import pytest
import torch

from mdmf.benchmarks import project_frozen
from mdmf.config import preset_config
from mdmf.core import BadInput
from mdmf.data import episode_data, load_data
from mdmf.episodes import episode_generator
from mdmf.evaluate import crop_size, encode_split
from mdmf.features import (
    _MEMO,
    DrawEpisodes,
    FeatureEpisodes,
    FeatureForward,
    build_bank,
    cached_bank,
    check_frozen,
    clear_memo,
    draw_rng,
    episode_draws,
    feature_loader,
    frozen_split_features,
    uses_features,
    video_draws,
)
from mdmf.model import build_model
from mdmf.runs import rng_state
from mdmf.synthetic import make_synthetic
from mdmf.video import read_clip


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    make_synthetic(root, videos_per_class=8, frames=10, size=32, workers=1)
    return root


def tiny_cfg(root, **kw):
    base = dict(
        data_root=str(root),
        backbone='tiny-vit',
        short_side=72,
        shot=1,
        train_query=2,
        ffn_dim=64,
        heads=2,
        freeze_visual=True,
        train_draws=2,
        workers=0,
        progress=False,
        eval_batch=8,
    )
    return preset_config('synthetic').replace(**{**base, **kw})


def setup(root, **kw):
    cfg = tiny_cfg(root, **kw)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    split = load_data(cfg.data, 'train')
    episodes = episode_data(cfg.data, split, cfg.model.frames, crop_size(model), 6, cfg.run.seed)
    return cfg, model, split, episodes


def test_draw_is_read_clip_with_its_generator(data_root):
    cfg, model, split, _ = setup(data_root, flip=True)
    clips = video_draws(split.paths[3], 3, [0, 4, 1], seed=11, frames=8, size=64, short_side=72, flip=True)
    assert clips.shape == (3, 8, 3, 64, 64) and clips.dtype == torch.uint8
    for k, d in enumerate([0, 4, 1]):
        ref = read_clip(split.paths[3], 8, 'trx', 64, 72, True, True, draw_rng(11, 'train', 3, d))
        assert torch.equal(clips[k], ref)
    assert not torch.equal(clips[0], clips[1])
    # another video, seed or split gives other draws
    assert not torch.equal(
        clips[0], video_draws(split.paths[3], 3, [0], seed=12, frames=8, size=64, short_side=72)[0]
    )


def test_episode_draws_depend_on_the_episode_only():
    a = episode_draws(5, 'train', 7, videos=20, draws=8)
    assert np.array_equal(a, episode_draws(5, 'train', 7, videos=20, draws=8))
    assert not np.array_equal(a, episode_draws(5, 'train', 8, videos=20, draws=8))
    assert a.min() >= 0 and a.max() < 8 and len(set(a.tolist())) > 1


@pytest.mark.parametrize('kind', ['mdmf-vit', 'mdmf-rn', 'clip-fsar'])
def test_cached_and_uncached_give_same_loss_and_gradients(data_root, kind):
    kw = (
        dict(backbone='tiny-rn')
        if kind == 'mdmf-rn'
        else dict(model='clip-fsar')
        if kind == 'clip-fsar'
        else {}
    )
    cfg, model, split, episodes = setup(data_root, **kw)
    bank = build_bank(model, split, cfg)
    drawn, cached, net = (
        DrawEpisodes(episodes, bank.draws),
        FeatureEpisodes(episodes, bank),
        FeatureForward(model),
    )

    def run(f, x, feats, i):
        torch.manual_seed(100 + i)
        model.zero_grad(set_to_none=True)
        s, q = (x['support_feats'], x['query_feats']) if feats else (x['support'], x['query'])
        out = f(
            s,
            x['support_labels'],
            q,
            x['class_names'],
            x['query_labels'],
            generator=episode_generator(cfg.run.seed, 'train', i, 'cpu'),
        )
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for i in range(3):
        u, gu = run(model, drawn[i], False, i)
        c, gc = run(net, cached[i], True, i)
        assert torch.equal(drawn[i]['query_draws'], cached[i]['query_draws'])
        torch.testing.assert_close(c.loss, u.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.logits, u.logits, rtol=1e-5, atol=1e-5)
        assert sorted(gc) == sorted(gu) and gu
        assert not any(n.startswith('backbone.clip.visual') for n in gu)
        for n in gu:
            torch.testing.assert_close(gc[n], gu[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bank_rows_are_the_encoder_on_the_draws(data_root):
    cfg, model, split, _ = setup(data_root)
    bank = build_bank(model, split, cfg, draws=3)
    assert bank.feats.shape == (len(split), 3, 8, model.dim) and model.training
    for v in (0, len(split) - 1):
        with torch.no_grad():
            ref = model.eval().encode_frames(
                video_draws(split.paths[v], v, range(3), cfg.run.seed, frames=8, size=64, short_side=72)
            )
        model.train()
        torch.testing.assert_close(bank.feats[v], ref, rtol=1e-5, atol=1e-5)


def test_caching_leaves_random_generators_alone(data_root):
    cfg, model, split, episodes = setup(data_root)
    clear_memo()
    torch.manual_seed(3)
    before = rng_state()
    list(feature_loader(model, split, cfg, indices=[0, 1]))
    frozen_split_features(model, load_data(cfg.data, 'val'), cfg)
    after = rng_state()
    assert torch.equal(before['torch'], after['torch'])
    assert torch.equal(before['numpy'][1], after['numpy'][1])


def test_memo_reuses_only_what_is_the_same(data_root):
    cfg, model, split, _ = setup(data_root)
    clear_memo()
    a = cached_bank(model, split, cfg)
    assert cached_bank(model, split, cfg.replace(lr=1e-2, views='gtc')) is a  # the heads do not matter
    assert cached_bank(model, split, cfg.replace(train_draws=3)) is not a  # other draws
    assert cached_bank(model, split, cfg.replace(seed=5)).seed == 5  # other seed
    other = build_model(cfg.model.__class__(backbone='tiny-vit', backbone_seed=1, freeze_visual=True))
    assert not torch.equal(cached_bank(other, split, cfg).feats, a.feats)  # other encoder weights
    assert len(_MEMO) <= 3
    val = load_data(cfg.data, 'val')
    torch.testing.assert_close(frozen_split_features(model, val, cfg), encode_split(model, val, cfg))


def test_errors_a_user_can_act_on(data_root):
    cfg, model, split, episodes = setup(data_root)
    with pytest.raises(BadInput, match='--freeze-visual'):
        check_frozen(build_model(cfg.model.__class__(backbone='tiny-vit')))
    with pytest.raises(BadInput, match='--freeze-bn'):
        check_frozen(
            build_model(cfg.model.__class__(backbone='tiny-rn', freeze_visual=True, freeze_bn=False))
        )
    with pytest.raises(BadInput, match='at least one draw'):
        build_bank(model, split, cfg, draws=0)
    bank = build_bank(model, split, cfg)
    with pytest.raises(ValueError, match='seed'):
        FeatureEpisodes(episode_data(cfg.data, split, 8, 64, 4, seed=cfg.run.seed + 1), bank)[0]
    assert uses_features(cfg) and not uses_features(cfg.replace(train_draws=0))
    assert not uses_features(cfg.replace(freeze_visual=False))


def test_loader_serves_the_episodes_asked_for(data_root):
    cfg, model, split, episodes = setup(data_root)
    got = list(feature_loader(model, split, cfg.replace(train_episodes=6), indices=[4, 1]))
    ref = FeatureEpisodes(episodes, cached_bank(model, split, cfg))
    assert [g['query_index'].tolist() for g in got] == [
        ref[4]['query_index'].tolist(),
        ref[1]['query_index'].tolist(),
    ]
    assert torch.equal(got[0]['support_feats'], ref[4]['support_feats'])
    assert list(feature_loader(model, split, cfg, indices=[])) == []


def test_projection_follows_the_flop_facts():
    r = project_frozen('hmdb51', 'ViT-B/16', draws=4, tflops=50, step_overhead_s=0.0)
    assert r['projection'] and r['videos'] == dict(train=4280, val=1194, test=1292)
    assert r['frozen_s']['bank'] == pytest.approx(4280 * 4 * 8 * 33.7e9 / 50e12)
    assert r['frozen_s']['train'] == pytest.approx(20_000 * 400 * 3 * 33.7e9 * 0.01 / 50e12)
    assert r['finetuned_s']['val'] == pytest.approx(20 * 1194 * 8 * 33.7e9 / 50e12)
    assert r['speedup'] > 10
    assert (
        project_frozen('hmdb51', 'RN50', draws=16)['frozen_h']
        > project_frozen('hmdb51', 'RN50', draws=4)['frozen_h']
    )
