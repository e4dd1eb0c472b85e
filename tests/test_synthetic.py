"""The synthetic dataset: CLI output on disk, split lists, determinism, decoding, the completion marker, and the
project's loader reading it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mdmf.core import BadInput
from mdmf.synthetic import (
    CLASS_BY_NAME,
    CLASSES,
    COLOURS,
    PAIRS,
    ClipParams,
    assign_splits,
    is_complete,
    make_synthetic,
    read_classes,
    render,
    render_scene,
    sample_params,
    video_id,
    video_params,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(videos_per_class=12, frames=8, size=32)
SPLITS = ('train', 'val', 'test')


def cli(root, *args):
    "`python -m mdmf.synthetic` at the small dataset's sizes, then `args` (a flag given again wins); checked."
    small = '--videos-per-class 12 --video-frames 8 --video-size 32'.split()
    cmd = [sys.executable, '-m', 'mdmf.synthetic', '--data-root', str(root), *small, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)


def read_lines(root):
    return {s: (Path(root) / 'splits' / f'{s}.txt').read_text().splitlines() for s in SPLITS}


def decode(path):
    import decord

    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()  # [T, H, W, 3]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "The dataset written by the CLI, with 12 test classes."
    root = tmp_path_factory.mktemp('syn') / 'a'
    out = cli(root, '--test-classes', '12')
    assert 'dataset ready' in out.stdout
    return root


def test_cli_help():
    out = subprocess.run(
        [sys.executable, '-m', 'mdmf.synthetic', '--help'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for opt in (
        '--data-root',
        '--dataset-seed',
        '--videos-per-class',
        '--video-frames',
        '--video-size',
        '--test-classes',
        '--render-workers',
        '--force',
    ):
        assert opt in out


def test_split_lists(data):
    lines = read_lines(data)
    classes = {s: {l.rsplit('/', 1)[0] for l in v} for s, v in lines.items()}
    assert {s: len(c) for s, c in classes.items()} == {'train': 20, 'val': 8, 'test': 12}
    assert len(set.union(*classes.values())) == len(CLASSES) >= 40
    assert not (
        classes['train'] & classes['val']
        or classes['train'] & classes['test']
        or classes['val'] & classes['test']
    )
    for s, v in lines.items():
        assert len(v) == len(classes[s]) * 12 and len(set(v)) == len(v)
        for line in v:
            cls, vid = line.rsplit('/', 1)
            assert cls in CLASS_BY_NAME and vid and '.' not in vid
            assert (data / 'videos' / cls / f'{vid}.mp4').is_file()
    assert len(list((data / 'videos').rglob('*.mp4'))) == 12 * len(CLASSES)
    assert not list(data.rglob('*.tmp')) and not list(data.rglob('.*.tmp'))  # no half-written files


def test_direction_pairs_in_every_split(data):
    lines = read_lines(data)
    for s, v in lines.items():
        names = {l.rsplit('/', 1)[0] for l in v}
        pairs = [(a.name, b.name) for a, b in PAIRS if a.name in names]
        assert all(b in names for _, b in pairs), 'a pair was split across splits'
        assert len(pairs) >= 3, s
    test = {l.rsplit('/', 1)[0] for l in lines['test']}
    for a, b in [
        ('moving something from left to right', 'moving something from right to left'),
        ('something rotating clockwise', 'something rotating anticlockwise'),
        ('two things moving apart', 'two things moving closer together'),
        ('something growing bigger', 'something shrinking smaller'),
    ]:
        assert a in test and b in test


def test_classes_json(data):
    info = json.loads((data / 'classes.json').read_text())
    assert info['params']['test_classes'] == 12
    recs = read_classes(data)
    assert len(recs) == len(CLASSES)
    by_name = {r['name']: r for r in recs}
    for r in recs:
        assert set(r) >= {'name', 'split', 'family', 'direction'}
        if r['partner']:
            p = by_name[r['partner']]
            assert (
                p['split'] == r['split'] and p['family'] == r['family'] and p['direction'] != r['direction']
            )
    lines = read_lines(data)
    for r in recs:
        assert any(l.startswith(r['name'] + '/') for l in lines[r['split']])


def test_decord_decodes(data):
    line = read_lines(data)['test'][0]
    x = decode(data / 'videos' / f'{line}.mp4')
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.uint8
    cls, vid = line.rsplit('/', 1)
    ref = render(video_params(0, cls, int(vid.rsplit('v', 1)[1])), 8, 32)
    assert np.abs(x.astype(int) - ref).mean() < 8  # lossy, but the same picture


def test_same_seed_same_pixels_other_seed_other_pixels(data, tmp_path):
    b = make_synthetic(tmp_path / 'b', seed=0, test_classes=12, workers=1, **SMALL)
    c = make_synthetic(tmp_path / 'c', seed=1, test_classes=12, workers=1, **SMALL)
    assert read_lines(b) == read_lines(data)
    for line in read_lines(data)['test'][::13] + read_lines(data)['train'][::50]:
        a_bytes = (data / 'videos' / f'{line}.mp4').read_bytes()
        assert a_bytes == (b / 'videos' / f'{line}.mp4').read_bytes()
        xa, xb, xc = (decode(r / 'videos' / f'{line}.mp4') for r in (data, b, c))
        np.testing.assert_array_equal(xa, xb)
        assert not np.array_equal(xa, xc)


def test_renderer_is_deterministic_and_varies():
    name = 'something rotating clockwise'
    p = sample_params(np.random.default_rng(5), name)
    assert isinstance(p, ClipParams) and p.action == name and p.direction == 'clockwise'
    np.testing.assert_array_equal(render(p, 8, 32), render(p, 8, 32))
    assert render(p, 16, 64).shape == (16, 64, 64, 3)
    assert video_params(3, name, 1) == video_params(3, name, 1) != video_params(4, name, 1)
    many = [sample_params(np.random.default_rng(i), name) for i in range(40)]
    for field in ('shape', 'colour', 'background'):
        assert len({getattr(q, field) for q in many}) >= 3, field
    assert any(q.distractor for q in many) and not all(q.distractor for q in many)


def test_render_scene_is_the_truth_of_the_pixels():
    "`render_scene` paints exactly `render`'s pixels, and its object states say where the objects are."
    from dataclasses import replace

    for i, c in enumerate(CLASSES):
        p = video_params(0, c.name, i % 3)
        frames, objs = render_scene(p, 8, 32)
        np.testing.assert_array_equal(frames, render(p, 8, 32))
        roles = [o['role'] for o in objs]
        assert roles.count('main') == 1 and (roles[0] == 'distractor') == bool(p.distractor), (c.name, roles)
        assert ('other' in roles) == (p.other_shape is not None)
        assert all(o[k].shape == (8,) for o in objs for k in ('cx', 'cy', 'scale', 'angle', 'alpha'))
    for name in (
        'moving something from left to right',
        'pushing something from right to left with something',
    ):
        p = replace(
            sample_params(np.random.default_rng(1), name), noise=0.0, distractor=None, background='plain'
        )
        frames, objs = render_scene(p, 8, 64)
        main = next(o for o in objs if o['role'] == 'main')
        for t in (0, 7):
            ys, xs = np.nonzero(np.abs(frames[t] / 255 - COLOURS[p.colour]).sum(-1) < 0.1)
            assert (
                abs((xs.mean() + 0.5) / 64 - main['cx'][t]) < 0.03
                and abs((ys.mean() + 0.5) / 64 - main['cy'][t]) < 0.03
            )


def test_time_reversed_pairs_are_frame_reversals():
    "Without per-frame randomness, the reversed class is exactly the forward clip played backwards."
    from dataclasses import replace

    for fwd, rev in PAIRS:
        if not rev.reverse:
            continue
        p = replace(sample_params(np.random.default_rng(0), fwd), noise=0.0, distractor=None)
        q = replace(p, action=rev.name, direction=rev.direction, reverse=True)
        np.testing.assert_array_equal(render(q, 8, 32), render(p, 8, 32)[::-1])
        assert not np.array_equal(render(q, 8, 32), render(p, 8, 32)), fwd.name  # the motion is visible


def test_complete_marker(tmp_path):
    root = tmp_path / 'm'
    params = dict(seed=0, videos_per_class=2, frames=4, size=16, val_classes=8, test_classes=8)
    assert not is_complete(root, **params)
    make_synthetic(root, workers=1, **params)
    assert is_complete(root, **params)
    marker = json.loads((root / '.complete').read_text())
    assert marker['params']['seed'] == 0 and marker['videos'] == 2 * len(CLASSES)
    assert not is_complete(root, **{**params, 'seed': 1})
    # complete with the same parameters: nothing is rewritten
    some = next((root / 'videos').rglob('*.mp4'))
    mtime = some.stat().st_mtime_ns
    make_synthetic(root, workers=1, **params)
    assert some.stat().st_mtime_ns == mtime
    # interrupted: marker missing, a video and a split list lost -> regenerated
    (root / '.complete').unlink()
    some.unlink()
    (root / 'splits' / 'val.txt').unlink()
    assert not is_complete(root, **params)
    make_synthetic(root, workers=1, **params)
    assert is_complete(root, **params) and some.exists() and (root / 'splits' / 'val.txt').exists()
    # other parameters: old videos go, new ones come
    make_synthetic(root, workers=1, **{**params, 'videos_per_class': 1})
    assert len(list((root / 'videos').rglob('*.mp4'))) == len(CLASSES)
    assert is_complete(root, **{**params, 'videos_per_class': 1}) and not is_complete(root, **params)
    # --force rewrites
    again = '--videos-per-class 1 --video-frames 4 --video-size 16 --render-workers 1 --force'.split()
    forced = cli(root, *again)
    assert 'wrote' in forced.stdout


def test_refuses_foreign_folder_and_bad_sizes(tmp_path):
    (tmp_path / 'videos' / 'x').mkdir(parents=True)
    (tmp_path / 'videos' / 'x' / 'a.mp4').write_bytes(b'')
    with pytest.raises(BadInput, match='not made by mdmf.synthetic: choose another --data-root'):
        make_synthetic(tmp_path, videos_per_class=1, frames=4, size=16, workers=1)
    assert (tmp_path / 'videos' / 'x' / 'a.mp4').exists()
    with pytest.raises(ValueError, match='even'):
        make_synthetic(tmp_path / 'o', videos_per_class=1, frames=4, size=15)
    with pytest.raises(ValueError):
        assign_splits(val_classes=18, test_classes=18)


def test_command_line_errors_name_the_flag(tmp_path):
    "A bad value is one line naming the flag, exit status 2, no traceback."
    run = lambda *a: subprocess.run(
        [sys.executable, '-m', 'mdmf.synthetic', '--data-root', str(tmp_path / 'o'), *a],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    odd, word = run('--video-size', '15'), run('--videos-per-class', 'many')
    assert (odd.returncode, word.returncode) == (2, 2)
    assert odd.stderr == 'error: the frame size (--video-size) must be even (yuv420p), got 15\n'
    assert (
        "argument --videos-per-class: invalid int value: 'many'" in word.stderr
        and 'Traceback' not in word.stderr
    )


def test_video_ids_unique():
    ids = [video_id(c.name, i) for c in CLASSES for i in range(3)]
    assert len(set(ids)) == len(ids)


def test_project_loader_reads_every_split(data):
    datasets = pytest.importorskip('mdmf.datasets')
    loader = pytest.importorskip('mdmf.data')
    for split in SPLITS:
        s = datasets.load_split('synthetic', split, data)
        assert len(s.classes) == {'train': 20, 'val': 8, 'test': 12}[split]
        assert s.class_names == s.classes  # the sentences are already readable prompts
        ds = loader.episode_dataset(
            'synthetic',
            split,
            data,
            way=5,
            shot=5,
            query=5,
            episodes=2,
            seed=0,
            num_frames=8,
            size=32,
            short_side=32,
        )
        b = ds[1]
        assert b['support'].shape == (25, 8, 3, 32, 32) and b['query'].shape == (25, 8, 3, 32, 32)
        assert set(b['class_names']) <= set(s.classes) and len(set(b['class_names'])) == 5
        assert b['support_labels'].tolist() == [c for c in range(5) for _ in range(5)]
