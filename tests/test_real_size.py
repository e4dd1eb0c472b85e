"""Real-size backbones on a CPU, through the same code path as real weights: randomly initialised RN50- and
ViT-B/16-shaped CLIP weights files (224 px, OpenAI's widths and depths) train one step and evaluate a tiny episode,
`python -m mdmf.train --backbone /path/RN50-random.pt ...` and `python -m mdmf.evaluate` included. Two frames per
video (one for ViT-B/16) and 2-way 1-shot episodes keep it to about a minute. The videos are 32 px and the synthetic preset's short side
is 72: the run layer crops to the backbone's 224 px by itself (issue 11, item 5)."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import random_class_folders

from mdmf.backbone import load_clip

ROOT = Path(__file__).resolve().parents[1]
TINY_EPISODES = [
    '--dataset',
    'folder',
    '--split-classes',
    '2/2/2',
    '--way',
    '2',
    '--shot',
    '1',
    '--train-query',
    '1',
    '--test-query',
    '1',
    '--frames',
    '2',
    '--train-episodes',
    '1',
    '--val-every',
    '0',
    '--val-episodes',
    '1',
    '--test-episodes',
    '1',
    '--no-cache',
    '--workers',
    '0',
    '--ffn-dim',
    '64',
    '--heads',
    '2',
    '--no-progress',
    '--threads',
    '2',
]


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
    "Six classes of two 4-frame videos (JPEG frame folders, 32 px): the folder dataset, split 2/2/2 by class."
    return random_class_folders(tmp_path_factory.mktemp('videos'), per_class=2)


def _random_weights(name: str, folder: Path) -> Path:
    "A CLIP weights file as one would download, but random: float16 state dict of `load_clip('<name>-random')`."
    path = folder / f'{name.replace("/", "-")}-random.pt'
    torch.save({k: v.half() for k, v in load_clip(f'{name}-random', seed=1).state_dict().items()}, path)
    return path


def _no_downloads():
    "Patches that make any CLIP download fail loudly."

    def refuse(*a, **k):
        raise AssertionError('a download was attempted')

    return [mock.patch('clip.clip._download', refuse), mock.patch('urllib.request.urlopen', refuse)]


def test_rn50_random_weights_file_trains_and_evaluates_through_the_clis(videos, tmp_path):
    weights = _random_weights('RN50', tmp_path)
    runs = tmp_path / 'runs'
    p = subprocess.run(
        [
            sys.executable,
            '-m',
            'mdmf.train',
            '--backbone',
            str(weights),
            '--data-root',
            str(videos),
            '--runs',
            str(runs),
            '--name',
            'rn50',
        ]
        + TINY_EPISODES,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((runs / 'rn50' / 'metrics.json').read_text())
    assert m['train']['steps'] == 1 and m['test']['episodes'] == 1 and np.isfinite(m['train']['final_loss'])
    # a CPU: no plan
    assert m['memory']['activation_checkpoint'] is False and m['memory']['predicted_peak_gib'] > 0
    weights.unlink()  # the run's checkpoint holds every weight: the evaluation needs neither this file nor a download
    out = tmp_path / 'eval.json'
    code = (
        'import sys; from unittest import mock\n'
        'def refuse(*a, **k): raise AssertionError("a download was attempted")\n'
        'with mock.patch("clip.clip._download", refuse), mock.patch("urllib.request.urlopen", refuse):\n'
        '    from mdmf.evaluate import main; from mdmf.config import cli; cli(main, sys.argv[1:])\n'
    )
    p = subprocess.run(
        [
            sys.executable,
            '-c',
            code,
            '--checkpoint',
            str(runs / 'rn50'),
            '--episodes',
            '1',
            '--no-cache',
            '--workers',
            '0',
            '--data-root',
            str(videos),
            '--out',
            str(out),
            '--no-progress',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(out.read_text())['test']['episodes'] == 1


def test_vit_b16_random_weights_file_trains_and_evaluates(videos, tmp_path):
    from mdmf.config import resolve_config
    from mdmf.runs import load_model
    from mdmf.train import train

    weights = _random_weights('ViT-B/16', tmp_path)
    # ViT-B/16 is 3x RN50's cost: 1 frame
    cfg = resolve_config(
        [
            '--backbone',
            str(weights),
            '--data-root',
            str(videos),
            '--runs',
            str(tmp_path / 'runs'),
            '--name',
            'vit',
        ]
        + TINY_EPISODES
        + ['--frames', '1']
    )
    patches = _no_downloads()
    for p in patches:
        p.start()
    try:
        m, trainer = train(cfg, quiet=True, return_trainer=True)
        assert m['train']['steps'] == 1 and m['test']['episodes'] == 1
        bb = trainer.model.backbone
        assert (bb.image_size, bb.dim, bb.is_resnet) == (224, 512, False)
        weights.unlink()
        model, saved = load_model(tmp_path / 'runs' / 'vit')
        assert saved.model.backbone == str(weights) and model.backbone.image_size == 224
        assert all(
            torch.equal(a, b)
            for a, b in zip(model.state_dict().values(), trainer.model.state_dict().values())
        )
    finally:
        for p in patches:
            p.stop()
