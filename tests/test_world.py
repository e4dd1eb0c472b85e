"""The mechanism world (`mdmf.world`): rendering is deterministic, each family is what it claims, the classes are
distinct, the leakage rule holds, the dataset is written and read like the default one, and the default world
is unchanged."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mdmf.core import BadInput
from mdmf.world import (
    FAMILIES,
    WORLD_BY_NAME,
    WORLD_CLASSES,
    make_world,
    render_world,
    render_world_scene,
    world_params,
    world_video_id,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(videos_per_class=2, frames=4, size=16, workers=1)


def test_rendering_is_deterministic():
    for c in WORLD_CLASSES[::5]:
        p = world_params(0, c.name, 3)
        assert p == world_params(0, c.name, 3)
        assert np.array_equal(render_world(p), render_world(p))
        assert not np.array_equal(render_world(p), render_world(world_params(0, c.name, 4)))
        assert not np.array_equal(render_world(p), render_world(world_params(1, c.name, 3)))


def test_the_class_table():
    names = [c.name for c in WORLD_CLASSES]
    assert len(set(names)) == len(names) == 42
    assert len({c.spec for c in WORLD_CLASSES}) == len(WORLD_CLASSES)  # no two classes render the same motion
    for c in WORLD_CLASSES:
        if c.partner:
            d = WORLD_BY_NAME[c.partner]
            assert (d.partner, d.split, d.family) == (c.name, c.split, c.family)
    for split in ('val', 'test'):  # each family is in val and test, with enough classes for 5-way episodes
        assert {c.family for c in WORLD_CLASSES if c.split == split} == set(FAMILIES)
        assert len([c for c in WORLD_CLASSES if c.split == split]) >= 5
    test = [c for c in WORLD_CLASSES if c.split == 'test']
    train_specs = {c.spec for c in WORLD_CLASSES if c.split == 'train'}
    assert not {c.spec for c in test} & train_specs  # test classes are novel


def _main(objs):
    return next(o for o in objs if o['role'] == 'main')


def test_order_pairs_swap_the_same_two_steps():
    p = world_params(0, 'something hopping and then spinning', 0)
    q = dataclasses.replace(p, action='something spinning and then hopping', direction='spin>hop')
    a, b = _main(render_world_scene(p, 16, 64)[1]), _main(render_world_scene(q, 16, 64)[1])
    hop = lambda o: np.abs(o['cy'] - p.position[1]) > 0.01  # frames where the object is off the ground
    assert hop(a)[:6].any() and not hop(a)[-6:].any()  # hop first, then the spin
    assert hop(b)[-6:].any() and not hop(b)[:6].any()  # spin first, then the hop
    assert abs(a['cy'].min() - b['cy'].min()) < 0.02  # the same hop, at another time
    # same start and end pose
    assert np.isclose(a['cy'][0], b['cy'][0]) and np.isclose(a['cy'][-1], b['cy'][-1])


def test_pace_pairs_run_the_same_path_at_two_speeds():
    crossings = {}
    for pace in ('fast', 'slow'):
        name = f'something {"jiggling" if pace == "fast" else "drifting"} from side to side'
        for i in range(5):
            p = world_params(0, name, i)
            o = _main(render_world_scene(p, 16, 64)[1])
            assert np.allclose(o['cy'], p.position[1])  # a horizontal path
            assert np.abs(o['cx'] - p.position[0]).max() <= 0.22 + 1e-6  # of the same length
            crossings.setdefault(pace, []).append(int((np.diff(np.sign(o['cx'] - p.position[0])) != 0).sum()))
    assert min(crossings['fast']) >= 5 and max(crossings['slow']) <= 3, crossings  # ~6 against ~2


def test_attribute_classes_fix_one_attribute_only():
    tri = [world_params(0, 'a triangle wandering about', i) for i in range(12)]
    red = [world_params(0, 'something red wandering about', i) for i in range(12)]
    assert {p.shape for p in tri} == {'triangle'} and len({p.colour for p in tri}) > 3
    assert {p.colour for p in red} == {'red'} and len({p.shape for p in red}) > 3
    assert len({p.background for p in tri}) > 2


def test_leakage_rule_holds():
    "No class name of the world in the pretraining captions, no world video among the pool's clips."
    from mdmf.captions import describe_clip
    from mdmf.pretrain import pool_params
    from mdmf.synthetic import CLASSES, render

    rng = np.random.default_rng(0)
    pool = [pool_params(0, i) for i in range(3000)]
    captions = [' '.join(describe_clip(p, rng).lower().split()) for p in pool]
    assert not [c.name for c in WORLD_CLASSES if any(c.name in t for t in captions)]
    assert not {c.name for c in WORLD_CLASSES} & {c.name for c in CLASSES}
    # no pool clip has a world motion
    assert not {c.family for c in WORLD_CLASSES} & {c.family for c in CLASSES}
    frames = lambda clip: {hashlib.sha1(f.tobytes()).hexdigest() for f in clip}
    pool_frames = set().union(*(frames(render(p, 8, 64)) for p in pool[:60]))
    world_frames = set().union(*(frames(render_world(world_params(0, c.name, 0))) for c in WORLD_CLASSES))
    assert not pool_frames & world_frames


def test_default_world_is_unchanged():
    "Frames of the default world, hashed with the code before the mechanism world existed."
    from mdmf.synthetic import CLASSES, assign_splits, render, video_params

    want = {(0, 0): '5625643f0ea6431f', (13, 5): '376bb991408f2774', (39, 29): 'b2e709c0c0d30b5a'}
    for (c, i), h in want.items():
        assert hashlib.sha256(render(video_params(0, CLASSES[c].name, i)).tobytes()).hexdigest()[:16] == h
    assert [c.name for c in assign_splits()['test']][:2] == [
        'moving something from left to right',
        'moving something from right to left',
    ]


def test_make_world_writes_a_dataset_the_loader_reads(tmp_path):
    from mdmf.data import DataConfig, load_data

    root = make_world(tmp_path / 'mech', **TINY)
    info = json.loads((root / 'classes.json').read_text())
    assert info['generator'] == 'mdmf.world' and len(info['classes']) == len(WORLD_CLASSES)
    test = load_data(DataConfig(dataset='synthetic', data_root=str(root)), 'test')
    assert sorted(test.class_names) == sorted(c.name for c in WORLD_CLASSES if c.split == 'test')
    assert len(test) == 2 * len(test.class_names)
    assert (
        root
        / 'videos'
        / 'a triangle wandering about'
        / f'{world_video_id("a triangle wandering about", 1)}.mp4'
    ).exists()
    stamp = (root / '.complete').stat().st_mtime
    make_world(root, **TINY)  # complete: nothing is written again
    assert (root / '.complete').stat().st_mtime == stamp


def test_make_world_keeps_other_data(tmp_path):
    from mdmf.synthetic import make_synthetic

    make_synthetic(tmp_path / 'default', videos_per_class=1, frames=4, size=16, workers=1)
    with pytest.raises(BadInput, match='not made by mdmf.world: choose another --data-root'):
        make_world(tmp_path / 'default', **TINY)


def test_preset_and_missing_world(tmp_path):
    from mdmf.config import preset_config
    from mdmf.core import BadInput
    from mdmf.train import prepare_data

    cfg = preset_config('synthetic-mech')
    assert cfg.data.data_root == 'data/synthetic-mech' and cfg.data.dataset == 'synthetic'
    assert cfg.replace(data_root='x').model == preset_config('synthetic').model  # the same model and schedule
    with pytest.raises(BadInput, match='python -m mdmf.world'):  # never the default world in its place
        prepare_data(cfg.replace(data_root=str(tmp_path / 'none')))
    assert not (tmp_path / 'none').exists()


SMALL_CLI = ['--videos-per-class', '1', '--video-frames', '4', '--video-size', '16', '--render-workers', '1']


def world_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    "`python -m mdmf.world ARGS` from the repository root, its output captured."
    cmd = [sys.executable, '-m', 'mdmf.world', *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)


def test_cli(tmp_path):
    out = world_cli('--data-root', str(tmp_path / 'cli'), *SMALL_CLI, check=True)
    assert 'dataset ready' in out.stdout and (tmp_path / 'cli' / '.complete').exists()
    bad = world_cli('--video-size', 'big')
    # one line naming the flag
    assert bad.returncode == 2 and '--video-size' in bad.stderr and 'Traceback' not in bad.stderr


def _tree(folder: Path) -> dict:
    "Every path under `folder` with its bytes (folders as None): what a refusal must leave as it was."
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob('*'))
    }


def test_cli_refuses_a_folder_of_other_videos(tmp_path):
    "A data root whose `videos` another tool wrote: one error line naming the folder, exit 2, nothing touched."
    root = tmp_path / 'mine'
    (root / 'videos' / 'waving').mkdir(parents=True)
    (root / 'videos' / 'waving' / 'clip1.mp4').write_bytes(b'not the world')
    (root / 'classes.json').write_text('{"generator": "someone else"}')
    before = _tree(root)
    p = world_cli('--data-root', str(root), *SMALL_CLI, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: ') and str(root / 'videos') in lines[0], lines
    assert 'not made by mdmf.world' in lines[0] and '--data-root' in lines[0]
    assert _tree(root) == before  # nothing written, moved or removed
