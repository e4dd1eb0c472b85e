"""Inspection, pictures, the explorer and `python -m mdmf.visualize` beyond what the notebooks 20-23 show:
Grad-CAM leaves nothing behind, example runs are refused when stale, figures display without pyplot, the CLI's
files and errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from IPython.core.formatters import DisplayFormatter
from PIL import Image

from mdmf.config import cli, config_from_dict
from mdmf.core import MissingInput, png_size
from mdmf.data import random_episode
from mdmf.examples import _digest, example_file, example_run
from mdmf.explorer import TABS, EpisodeExplorer
from mdmf.inspection import embed_2d, grad_cam, inspect_episode, load_run
from mdmf.model import ModelConfig, build_model
from mdmf.plots import frames_image, plot_attention, plot_episode, plot_otam, short_names
from mdmf.runs import load_checkpoint
from mdmf.synthetic import assign_splits
from mdmf.visualize import main, run_label


@pytest.fixture(scope='module')
def home(tmp_path_factory):
    "The example runs and their synthetic data under a fresh MDMF_HOME."
    home = tmp_path_factory.mktemp('home')
    for m in ('mdmf', 'clip-fsar'):
        example_run(m, home, train=False, quiet=True)
    return home


def _hooks(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_shipped_examples_fit_the_shipped_backbone():
    for m in ('mdmf', 'clip-fsar'):
        ex = load_checkpoint(example_file(m))
        model = build_model(config_from_dict(ex['config']).model)
        state = model.state_dict()
        assert _digest(state, [k for k in state if k not in ex['weights']]) == ex['base'], (
            f'{example_file(m)} was made over another tiny-pretrained backbone: train the default runs again and write '
            'it with `python -m mdmf.visualize --save-examples RUN ...` (see nbs/24_visualize.ipynb)'
        )
        # shipped with the package: what training changed, float16 (~1.5M values)
        assert example_file(m).stat().st_size < 4e6
        assert ex['metrics']['test']['accuracy'] > 0 and any(e['kind'] == 'train' for e in ex['log'])


def test_example_run_is_an_ordinary_run_folder(home):
    run = home / 'examples' / 'synthetic-mdmf'
    model, cfg = load_run(run)
    assert cfg.data.data_root == str(home / 'data' / 'synthetic') and cfg.model.model == 'mdmf'
    assert model.cfg.return_attention  # load_run keeps the attention maps for pictures
    ex = load_checkpoint(example_file('mdmf'))
    state = model.state_dict()
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in ex['weights'].items())
    before = (run / 'best.pt').stat().st_mtime_ns
    assert example_run('mdmf', home, train=False, quiet=True) == run  # the second call reuses the folder
    assert (run / 'best.pt').stat().st_mtime_ns == before


def test_a_stale_example_is_refused(home, tmp_path, monkeypatch):
    ex = load_checkpoint(example_file('clip-fsar'))
    stale = tmp_path / 'example-clip-fsar.pt'
    torch.save(dict(ex, base='0' * 64), stale)
    monkeypatch.setattr('mdmf.examples.example_file', lambda model='mdmf': stale)
    with pytest.raises(MissingInput, match='made over another tiny-pretrained backbone.*--save-examples'):
        example_run("clip-fsar", home, train=False, quiet=True)


def test_save_examples_command(home, tmp_path, monkeypatch, capsys):
    written = {}
    monkeypatch.setattr(
        'mdmf.examples.example_file', lambda model='mdmf': written.setdefault(model, tmp_path / f'{model}.pt')
    )
    paths = main(['--save-examples', str(home / 'examples' / 'synthetic-clip-fsar')])
    assert paths == [tmp_path / 'clip-fsar.pt'] and 'MB' in capsys.readouterr().out
    again, shipped = load_checkpoint(paths[0]), load_checkpoint(example_file('clip-fsar'))
    assert again['base'] == shipped['base'] and sorted(again['weights']) == sorted(shipped['weights'])
    assert all(v.dtype != torch.float32 for v in again['weights'].values())  # float16: half the size


def test_gradcam_resnet_restores_everything():
    model = build_model(ModelConfig(backbone='tiny-rn', ffn_dim=128))
    model.train()  # grad_cam switches to eval and back
    model.backbone.activation_checkpoint = True  # a checkpointed encoder: switched off inside, restored after
    ep = random_episode(way=3, shot=2, frames=8, size=64)
    cam = grad_cam(model, ep, query=1, generator=torch.Generator().manual_seed(0))
    assert cam.layer == 'layer4' and cam.query.shape == (8, 64, 64) and cam.support.shape == (2, 8, 64, 64)
    assert float(cam.query.std()) > 0 and 0 <= float(cam.query.min()) and float(cam.query.max()) <= 1
    assert all(int(ep['support_labels'][i]) == cam.target for i in cam.support_index)
    assert all(p.grad is None for p in model.parameters()) and _hooks(model) == 0
    assert model.training and model.backbone.activation_checkpoint


def test_gradcam_vit_explains_the_target_asked_for():
    model = build_model(ModelConfig(backbone='tiny-vit', ffn_dim=128))
    cam = grad_cam(
        model, random_episode(way=3, shot=2), query=0, target=2, generator=torch.Generator().manual_seed(0)
    )
    assert cam.layer.startswith('transformer.resblocks.1') and cam.target == 2 and cam.support_index == [4, 5]
    assert (
        float(cam.query.std()) > 0 and all(p.grad is None for p in model.parameters()) and _hooks(model) == 0
    )


def test_gradcam_cleans_up_after_an_error():
    model = build_model(ModelConfig(backbone='tiny-rn', model='clip-fsar', ffn_dim=128))

    def broken(*a, **k):
        raise RuntimeError('broken head')

    model.forward_features = broken
    with pytest.raises(RuntimeError, match='broken head'):
        grad_cam(model, random_episode(way=3), query=0, target=0)
    assert _hooks(model) == 0 and not model.backbone.activation_checkpoint and model.training


@pytest.mark.parametrize('merge', [True, False])
def test_clip_fsar_support_rows(merge):
    model = build_model(
        ModelConfig(backbone='tiny-vit', model='clip-fsar', ffn_dim=128, fsar_merge_before=merge)
    )
    ins = inspect_episode(model, random_episode(way=3, shot=2), generator=torch.Generator().manual_seed(0))
    assert (
        ins.views == ('fsar',) and ins.support_rows == ('class' if merge else 'video') and _hooks(model) == 0
    )
    assert ins.fused['fsar'][0].shape == ((3 if merge else 6), 9, 64) and ins.fused['fsar'][1].shape == (
        3,
        8,
        64,
    )
    assert len(plot_otam(ins, 0).axes) == 3 + 1  # three prototypes and the colour bar
    labels = [t.get_text() for t in plot_attention(ins, 0).axes[0].get_yticklabels()]
    assert labels == [str(i) for i in range(1, 9)]  # the queries carry no token
    assert (
        plot_attention(ins, 0, support=1).axes[0].get_title().endswith(('class 1' if merge else 'support 1'))
    )


def test_uint8_frames_keep_their_brightness():
    ep = random_episode(way=2, shot=1)
    clip = ep['query'][0]
    img = frames_image(clip)[:, :64]  # the first frame
    assert abs(img.mean() - clip[0].float().mean().item() / 255) < 1e-6 and img.mean() < 0.6  # not near-white


def test_figures_display_without_pyplot():
    "A picture shows itself (before any printer pyplot's inline backend registers for Figure) as a PNG."
    from unittest.mock import patch

    fig = plot_episode(random_episode(way=2, shot=1), 0)
    shown = []
    with patch('IPython.display.display', lambda obj, raw=False: shown.append((obj, raw))):
        handled = DisplayFormatter().ipython_display_formatter(fig)
    ((bundle, raw),) = shown
    assert handled and raw and 'image/png' in bundle and png_size(bundle['image/png'])[0] >= 8 * 64


def test_class_names_stay_apart():
    names = [c.name for cs in assign_splits().values() for c in cs]
    for width in (14, 22, 30):
        assert len(set(short_names(names, width))) == len(names)


def test_embed_2d_says_which_method():
    x = np.random.default_rng(0).normal(size=(30, 6))
    assert embed_2d(x)[1] == 't-SNE' and embed_2d(x, 'pca')[1] == 'PCA' and embed_2d(x[:4])[1] == 'PCA'
    y, how = embed_2d(x, 'pca')
    centred = x - x.mean(0)
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    assert how == 'PCA' and np.allclose(np.abs(y[:, 0]), np.abs(centred @ top))  # the first principal axis


def test_run_label_names_the_ablations():
    assert run_label({'model': {}}) == 'full'
    assert run_label({'model': {'pps': False, 'distill': False}}) == 'multi-view'
    assert run_label({'model': {'model': 'clip-fsar'}}) == 'clip-fsar'
    assert run_label({'model': {'distill_lambda': 2.0}}) == 'full (λ=2)'
    assert (
        run_label({'model': {'distill_condition': 'none', 'distill_direction': 'ltc_teaches_gtc'}})
        == 'T5 down->up no condition'
    )
    # lambda only matters with two views
    assert run_label({'model': {'views': 'gtc', 'distill_lambda': 2.0}}) == 'GTC+PPS'
    # flat configs of earlier versions
    assert run_label({'model': 'mdmf', 'mdmf': {'views': 'ntc', 'pps': False}}) == 'NTC'


def test_explorer_redraws_what_is_on_screen(home):
    model, cfg = load_run(home / 'examples' / 'synthetic-mdmf')
    ex = EpisodeExplorer(model, cfg)
    assert [o[1] for o in ex.w_view.options] == ['gtc', 'ltc', 'fused'] and ex.tabs.selected_index == 0
    png = ex.images['prediction'].value
    ex.w_view.value = 'gtc'
    assert ex.images['prediction'].value != png
    ex.tabs.selected_index = list(TABS).index('attention')
    assert set(k for k, _, _ in ex.cache) == {'query', 'prediction', 'pps', 'attention'}
    ex.w_seed.value = 5
    assert ex.batch['seed'] == 5 and ex.ins.batch['seed'] == 5 and ('prediction', 0, 'gtc') not in ex.cache
    ex.w_query.value = 4
    assert 'query 4' in ex.status.value and ex.images['attention'].value == ex.cache[('attention', 4, 'gtc')]
    bundle = ex._repr_mimebundle_()
    # a picture for pages without a kernel
    assert 'application/vnd.jupyter.widget-view+json' in bundle and 'image/png' in bundle
    assert bundle['text/plain'].startswith('EpisodeExplorer(CLIP-MDMF: test episode 0, seed 5, query 4')


def test_cli_writes_pngs_and_the_table(home, tmp_path):
    run = home / 'examples' / 'synthetic-mdmf'
    # a lambda-sweep run beside a copy of the first: same weights
    other = tmp_path / 'runs' / 'mdmf-lambda0.5'
    first = tmp_path / 'runs' / 'mdmf'
    shutil.copytree(run, first)
    shutil.copytree(run, other)
    cfg = json.loads((other / 'config.json').read_text())
    cfg['model']['distill_lambda'] = 0.5
    (other / 'config.json').write_text(json.dumps(cfg))
    out = tmp_path / 'figs'
    paths = main(
        [
            '--run',
            str(first),
            '--out',
            str(out),
            '--episodes',
            '3',
            '--tsne-episodes',
            '1',
            '--device',
            'cpu',
            '--query',
            '1',
            '--view',
            'ltc',
        ]
    )
    expected = {
        'episode',
        'prediction',
        'attention',
        'otam',
        'pps',
        'posteriors',
        'gradcam',
        'tsne',
        'per_class',
        'curves',
        'runs',
        'lambda_sweep',
    }
    assert {p.stem for p in paths} == expected == {p.stem for p in out.glob('*.png')}
    assert (
        'mdmf-lambda0.5' in (out / 'runs.md').read_text() and 'full (λ=0.5)' in (out / 'runs.md').read_text()
    )
    for p in paths:
        w, h = Image.open(p).size
        # small, at most what a page shows unshrunk
        assert w <= 900 and w * h < 900 * 900 and p.stat().st_size < 300_000


@pytest.mark.parametrize(
    'argv, message',
    [(['--run', 'no/such/run'], 'is not a folder'), (['--view', 'sideways'], "invalid choice: 'sideways'")],
)
def test_cli_user_errors_are_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli(main, argv + ['--out', str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    assert 'Traceback' not in err


def test_cli_query_out_of_range(home, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(
            main,
            [
                '--run',
                str(home / 'examples' / 'synthetic-mdmf'),
                '--out',
                str(tmp_path),
                '--query',
                '9',
                '--device',
                'cpu',
            ],
        )
    err = capsys.readouterr().err
    assert (
        err.startswith('error: --query 9: episode 0 has queries 0 to 4')
        and len(err.strip().splitlines()) == 1
    )
