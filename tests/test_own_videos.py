"""Your own videos end to end, as README's "Your own videos" section tells a user: train, evaluate and draw with the
documented commands on a folder of class folders (video files and frame folders mixed), with no hand-made file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mdmf.video import write_frames, write_mp4

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
    'OMP_NUM_THREADS': '1',
    'MPLBACKEND': 'Agg',
}
CLASSES = ['clap_hands', 'JumpRope', 'wave', 'push up', 'sit_down', 'StandUp']
SMALL = [
    '--way',
    '2',
    '--shot',
    '1',
    '--train-query',
    '1',
    '--test-query',
    '1',
    '--backbone',
    'tiny-vit',
    '--short-side',
    '64',
    '--ffn-dim',
    '64',
    '--heads',
    '2',
    '--threads',
    '1',
    '--workers',
    '0',
    '--no-progress',
]


def _clip(colour, n, rng):
    "A square moving across a 48x64 frame: uint8 [n, 48, 64, 3]."
    x = np.full((n, 48, 64, 3), 40, np.uint8)
    x += rng.integers(0, 20, x.shape, dtype=np.uint8)
    for t in range(n):
        left = 4 + 4 * t
        x[t, 16:32, left : left + 12] = colour
    return x


def run(module, *args, cwd):
    return subprocess.run(
        [sys.executable, '-m', module, *args], env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope='module')
def own(tmp_path_factory):
    "`my_actions/<class>/<video>`: six classes of four videos, one of them a folder of JPEG frames."
    root = tmp_path_factory.mktemp('own') / 'my_actions'
    rng = np.random.default_rng(0)
    for _c, name in enumerate(CLASSES):
        colour = rng.integers(80, 256, 3).astype(np.uint8)
        for k in range(4):
            frames = _clip(colour, 10 + k, rng)
            if k == 1:
                write_frames(root / name / f'video{k}', frames)
            else:
                write_mp4(root / name / f'video{k}.mp4', frames)
    (root.parent / 'names.json').write_text(json.dumps({'JumpRope': 'skipping rope'}))
    return root


def test_own_videos_train_evaluate_draw(own, tmp_path):
    r = run(
        'mdmf.train',
        '--dataset',
        'folder',
        '--data-root',
        str(own),
        '--split-classes',
        '2/2/2',
        '--class-names',
        str(own.parent / 'names.json'),
        '--train-episodes',
        '4',
        '--accum',
        '2',
        '--val-every',
        '2',
        '--val-episodes',
        '4',
        '--test-episodes',
        '6',
        '--runs',
        'runs',
        *SMALL,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    folder = tmp_path / 'runs' / 'my_actions-mdmf-1shot'  # named after the user's folder
    assert (folder / 'best.pt').is_file() and (folder / 'metrics.json').is_file()
    assert sorted(p.name for p in (folder / 'splits').iterdir()) == ['test.txt', 'train.txt', 'val.txt']
    assert (
        'on my_actions' in r.stdout
        and 'synthetic' not in r.stdout
        and 'folder' not in r.stdout.split('run folder')[0]
    )
    assert not list(own.rglob('.complete')) and not (own / 'splits').exists(), (
        'nothing is written into the data'
    )
    metrics = json.loads((folder / 'metrics.json').read_text())
    assert metrics['test']['episodes'] == 6

    r = run('mdmf.evaluate', '--checkpoint', str(folder), '--episodes', '8', '--no-progress', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'my_actions test' in r.stdout and '%' in r.stdout

    r = run(
        'mdmf.visualize',
        '--run',
        str(folder),
        '--out',
        'figures',
        '--episodes',
        '4',
        '--tsne-episodes',
        '1',
        '--device',
        'cpu',
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted(p.name for p in (tmp_path / 'figures').glob('*.png'))
    assert {
        'episode.png',
        'attention.png',
        'otam.png',
        'gradcam.png',
        'tsne.png',
        'per_class.png',
        'curves.png',
    } <= set(pngs), pngs
    assert all((tmp_path / 'figures' / p).stat().st_size > 3000 for p in pngs)  # drawn, not blank


def test_own_videos_mistake_reads_well(own, tmp_path):
    "A class folder given as the data root: one or two lines naming the folder and saying what to do, exit 2."
    r = run(
        'mdmf.train',
        '--dataset',
        'folder',
        '--data-root',
        str(own / 'wave'),
        '--split-classes',
        '2/2/2',
        '--runs',
        'runs',
        *SMALL,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) <= 3 and 'Traceback' not in r.stderr, r.stderr
    assert str(own / 'wave') in r.stderr and 'one level too deep' in r.stderr
    assert not (tmp_path / 'runs').exists() or not any((tmp_path / 'runs').iterdir()), (
        'no run folder for a failed start'
    )
