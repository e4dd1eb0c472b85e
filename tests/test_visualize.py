"""Grad-CAM leaves nothing behind, the explorer's callbacks redraw, and the CLI writes its PNG files from a run folder."""
import json
import shutil
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch

matplotlib.use('Agg')

from mdmf.model import ModelConfig, build_model
from mdmf.synthetic import make_synthetic
from mdmf.train import PRESETS, config_from_values, train
from mdmf.visualize import (EpisodeExplorer, embed_2d, grad_cam, inspect_episode, load_episode, load_run, main,
                            plot_attention, plot_otam, run_label)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A tiny CLIP-MDMF run (ResNet CLIP, two training episodes) on a small synthetic set."
    tmp = tmp_path_factory.mktemp('vis')
    root = make_synthetic(tmp / 'synthetic', videos_per_class=4, frames=8, size=64, workers=2)
    values = {**PRESETS['synthetic'], 'data_root': str(root), 'runs': str(tmp / 'runs'), 'name': 'mdmf',
              'backbone': 'tiny-rn', 'image_size': 64, 'short_side': 64, 'shot': 2, 'train_query': 1,
              'train_episodes': 2, 'accum': 2, 'val_every': 0, 'val_episodes': 2, 'test_episodes': 2,
              'checkpoint_every': 1000, 'progress': False, 'device': 'cpu', 'ffn_dim': 128, 'threads': 0}
    train(config_from_values(values), quiet=True)
    return tmp / 'runs' / 'mdmf'


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _episode(way=3, shot=2, T=8, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(support=torch.randn(way * shot, T, 3, size, size, generator=g),
                support_labels=torch.arange(way).repeat_interleave(shot),
                query=torch.randn(way, T, 3, size, size, generator=g), query_labels=torch.arange(way),
                class_names=[f'class {i}' for i in range(way)])


def test_gradcam_resnet_trained(run):
    model, cfg = load_run(run)
    model.train()  # grad_cam switches to eval and back
    model.backbone.checkpoint = True  # a checkpointed encoder: switched off inside, restored after
    ep = load_episode(cfg, 0)
    before = _hooks(model)
    cam = grad_cam(model, ep, query=1)
    S = cfg.image_size
    assert cam.layer == 'layer4'
    assert cam.query.shape == (cfg.frames, S, S) and cam.support.shape == (cfg.shot, cfg.frames, S, S)
    assert float(cam.query.std()) > 0 and float(cam.support.std()) > 0  # not constant
    assert 0 <= float(cam.query.min()) and float(cam.query.max()) <= 1
    assert cam.target == int(inspect_episode(model, ep).pred[1])  # the nearest prototype
    assert all(int(ep['support_labels'][i]) == cam.target for i in cam.support_index)
    assert all(p.grad is None for p in model.parameters())
    assert _hooks(model) == before == 0
    assert model.training and model.backbone.checkpoint


def test_gradcam_vit_and_target():
    model = build_model(ModelConfig(backbone='tiny-vit', ffn_dim=128))
    ep = _episode()
    cam = grad_cam(model, ep, query=0, target=2, generator=torch.Generator().manual_seed(0))
    assert cam.layer.startswith('transformer.resblocks.1') and cam.target == 2
    assert cam.query.shape == (8, 64, 64) and cam.support_index == [4, 5]
    assert float(cam.query.std()) > 0
    assert all(p.grad is None for p in model.parameters()) and _hooks(model) == 0


def test_gradcam_cleans_up_after_an_error():
    model = build_model(ModelConfig(backbone='tiny-rn', model='clip-fsar', ffn_dim=128))
    def broken(*a, **k): raise RuntimeError('broken head')
    model.forward_features = broken
    with pytest.raises(RuntimeError, match='broken head'): grad_cam(model, _episode(), query=0, target=0)
    assert _hooks(model) == 0 and not model.backbone.checkpoint and model.training


def test_views_of_clip_fsar():
    model = build_model(ModelConfig(backbone='tiny-vit', model='clip-fsar', ffn_dim=128))
    ins = inspect_episode(model, _episode())
    assert ins.views == ('fsar',) and _hooks(model) == 0
    assert ins.fused['fsar'][0].shape == (6, 9, 64) and ins.fused['fsar'][1].shape == (3, 8, 64)
    assert len(plot_otam(ins, 0).axes) == 3
    labels = [t.get_text() for t in plot_attention(ins, 0).axes[0].get_yticklabels()]
    assert labels[0] == 'f1' and len(labels) == 8  # CLIP-FSAR's queries carry no token


def test_explorer_callbacks(run):
    model, cfg = load_run(run)
    ex = EpisodeExplorer(model, cfg, gradcam=False)
    assert [o[1] for o in ex.w_view.options] == ['gtc', 'ltc', 'fused']
    png = ex.images['attention'].value
    ex.w_view.value = 'gtc'
    assert ex.images['attention'].value != png and len(ex.figures['otam'].axes) == cfg.way
    ex.w_seed.value = 5
    assert ex.batch['seed'] == 5 and ex.ins.batch['seed'] == 5
    ex.w_query.value = 4
    assert 'query 4' in ex.status.value and ex.figures['episode'].axes[-1].get_title(loc='left').startswith('query 4')


def test_embed_2d_without_sklearn(monkeypatch):
    x = np.random.default_rng(0).normal(size=(12, 6))
    monkeypatch.setitem(sys.modules, 'sklearn.manifold', None)  # `from sklearn.manifold import TSNE` fails
    y = embed_2d(x)
    centred = x - x.mean(0)
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    assert y.shape == (12, 2) and np.allclose(np.abs(y[:, 0]), np.abs(centred @ top))  # the first principal axis


def test_run_label():
    assert run_label({'model': 'mdmf', 'mdmf': {}}) == 'full'
    assert run_label({'model': 'mdmf', 'mdmf': {'pps': False, 'distill': False}}) == 'multi-view'
    assert run_label({'model': 'clip-fsar', 'mdmf': {}}) == 'clip-fsar'
    assert run_label({'model': 'mdmf', 'mdmf': {'distill_lambda': 2.0}}) == 'full (λ=2)'


def test_cli_writes_pngs(run, tmp_path):
    # a second run folder beside the first, as a lambda-sweep run would be (same weights, another lambda)
    other = run.parent / 'mdmf-lambda0.5'
    shutil.copytree(run, other)
    cfg = json.loads((other / 'config.json').read_text())
    cfg['mdmf']['distill_lambda'] = 0.5
    (other / 'config.json').write_text(json.dumps(cfg))
    out = tmp_path / 'figs'
    paths = main(['--run', str(run), '--out', str(out), '--compare', str(other), '--episodes', '3', '--tsne-episodes', '1',
                  '--device', 'cpu', '--dpi', '40', '--query', '1'])
    expected = {'episode', 'prediction', 'attention', 'otam', 'pps', 'posteriors', 'gradcam', 'tsne', 'tsne_compare',
                'per_class', 'curves', 'curves_compare', 'runs', 'lambda_sweep'}
    assert {p.stem for p in paths} == expected
    assert {p.stem for p in out.glob('*.png')} == expected
    assert 'mdmf-lambda0.5' in (out / 'runs.md').read_text()
    for p in paths:
        img = matplotlib.image.imread(p)
        assert img.shape[0] * img.shape[1] < 1000 * 1000  # small pictures
