"""The data pipeline (mdmf.datasets, mdmf.episodes, mdmf.video, mdmf.data) on small fixtures in the real storage layouts."""

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mdmf.core import BadInput, MissingInput
from mdmf.data import (
    ClipDataset,
    DataConfig,
    EpisodeDataset,
    dataset_label,
    episode_data,
    episode_dataset,
    episode_loader,
    freeze_split,
    index_videos,
    load_data,
    random_episode,
    resolve_videos,
)
from mdmf.datasets import (
    DATASETS,
    SPLITS,
    Split,
    get_dataset,
    load_split,
    parse_split_classes,
    read_split,
    readable_name,
    splits_dir,
    ssv2_label_names,
)
from mdmf.episodes import EpisodeSampler, episode_generator
from mdmf.video import (
    CLIP_MEAN,
    CLIP_STD,
    crop_clip,
    frame_files,
    frame_indices,
    normalize,
    num_frames,
    read_clip,
    read_frames,
    to_clip_input,
    transform_clip,
)

ROOT = Path(__file__).resolve().parents[1]

# (classes, videos) per split, from data/splits/README.md
TABLE = {
    'hmdb51': [(31, 4280), (10, 1194), (10, 1292)],
    'ucf101': [(70, 9154), (10, 1421), (21, 2745)],
    'kinetics100': [(64, 6400), (12, 1200), (24, 2400)],
    'ssv2_small': [(64, 6400), (12, 1200), (24, 2400)],
    'ssv2_full': [(64, 67013), (12, 1926), (24, 2857)],
}


# ---------------------------------------------------------------- fixtures
def frames_of(n, h=32, w=64, seed=0):
    "Frames whose brightness encodes the frame number (frame t has value 8*t+10 in its first rows)."
    x = np.random.default_rng(seed).integers(0, 60, (n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        x[t, :8] = min(8 * t + 10, 255)
    return x


def mp4(path, n=12, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = frames_of(n, **kw)
    with av.open(str(path), 'w') as out:
        s = out.add_stream('libx264', rate=8)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], 'yuv420p'
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        out.mux(s.encode())
    return path


def jpg_folder(path, n=12, **kw):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for t, f in enumerate(frames_of(n, **kw), 1):
        Image.fromarray(f).save(path / f'{t}.jpg', quality=95)
    return path


def synthetic_root(root, classes=4, per_class=3, n=12, frame_folder_every=3, split='test'):
    "A root in the synthetic layout: <root>/videos/<class>/<id>.mp4 (every 3rd a frame folder), <root>/splits/<split>.txt."
    lines = []
    for c in range(classes):
        for k in range(per_class):
            vid, cls = f'v{c}_{k}', f'class_{c}'
            if frame_folder_every and k % frame_folder_every == frame_folder_every - 1:
                jpg_folder(root / 'videos' / cls / vid, n + k, seed=c)
            else:
                mp4(root / 'videos' / cls / f'{vid}.mp4', n + k, seed=c)
            lines.append(f'{cls}/{vid}')
    (root / 'splits').mkdir(parents=True, exist_ok=True)
    (root / 'splits' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return root


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    synthetic_root(root, classes=4, per_class=3, split='test')
    synthetic_root(root, classes=4, per_class=3, split='train')  # same videos, also listed as train
    return root


def make_split(dataset, split, items):
    classes = sorted({c for c, _ in items})
    return Split(
        dataset,
        split,
        classes,
        [readable_name(c) for c in classes],
        [v for _, v in items],
        [classes.index(c) for c, _ in items],
    )


# ---------------------------------------------------------------- registry and split lists
def test_registry():
    assert set(DATASETS) == {
        'hmdb51',
        'ucf101',
        'kinetics100',
        'ssv2_small',
        'ssv2_full',
        'synthetic',
        'folder',
    }
    assert (
        not get_dataset('ssv2_full').flip
        and not get_dataset('ssv2_small').flip
        and not get_dataset('synthetic').flip
    )
    assert get_dataset('hmdb51').flip and get_dataset('Kinetics100').flip
    with pytest.raises(BadInput, match='known: hmdb51.*folder'):
        get_dataset('nope')


@pytest.mark.parametrize('name', [n for n in TABLE if n != 'ssv2_full'])
def test_shipped_splits_parse(name):
    classes = []
    for s, (n_cls, n_vid) in zip(SPLITS, TABLE[name]):
        sp = load_split(name, s)
        assert (len(sp.classes), len(sp)) == (n_cls, n_vid)
        assert len(set(sp.videos)) == len(sp.videos)
        assert sp.class_counts().min() >= 100 or name in ('hmdb51', 'ucf101')
        classes.append(set(sp.classes))
        for nm in sp.class_names:
            assert '_' not in nm and nm == nm.strip() and '  ' not in nm, nm
            if name in ('hmdb51', 'ucf101'):
                assert nm == nm.lower(), nm
    assert not (classes[0] & classes[1]) and not (classes[0] & classes[2]) and not (classes[1] & classes[2])


def test_readable_names():
    assert readable_name('brush_hair') == 'brush hair'
    assert readable_name('ApplyEyeMakeup') == 'apply eye makeup'
    assert readable_name('PlayingDaf') == 'playing daf'
    assert readable_name('YoYo') == 'yo-yo'
    assert readable_name('air drumming') == 'air drumming'
    assert readable_name('Pushing something from right to left') == 'Pushing something from right to left'
    ucf = load_split('ucf101', 'val')
    assert 'apply lipstick' in ucf.class_names and 'playing daf' in ucf.class_names


def test_shipped_split_files_fallback_is_package_data():
    d = splits_dir('hmdb51')
    assert (d / 'test.txt').is_file()


def test_ssv2_full_names(tmp_path):
    ids = sorted({c for s in SPLITS for c, _ in read_split(splits_dir('ssv2_full') / f'{s}.txt')}, key=int)
    labels = {f'Template number {i} of something': i for i in ids}
    (tmp_path / 'something-something-v2-labels.json').write_text(json.dumps(labels))
    for s, (n_cls, n_vid) in zip(SPLITS, TABLE['ssv2_full']):
        sp = load_split('ssv2_full', s, root=tmp_path)
        assert (len(sp.classes), len(sp)) == (n_cls, n_vid)
        assert all(nm == f'Template number {c} of something' for c, nm in zip(sp.classes, sp.class_names))
    by_path = load_split('ssv2_full', 'val', labels_json=tmp_path / 'something-something-v2-labels.json')
    assert by_path.class_names == load_split('ssv2_full', 'val', root=tmp_path).class_names
    assert ssv2_label_names(root=tmp_path)[ids[0]] == f'Template number {ids[0]} of something'


def test_ssv2_full_without_labels_json(tmp_path):
    with pytest.raises(MissingInput) as e:
        load_split('ssv2_full', 'test', root=tmp_path)
    assert 'something-something-v2-labels.json' in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match='something-something-v2-labels.json'):
        load_split('ssv2_full', 'test')


@pytest.mark.parametrize(
    'text,line,what',
    [
        ('a/1\n\nb_no_slash\n', 3, 'malformed'),
        ('a/1\na/2\n/3\n', 3, 'malformed'),
        ('a/1\nb/\n', 2, 'malformed'),
        ('a/1\n\n\na/1\n', 4, 'repeats line 1'),
    ],
)
def test_split_line_errors(tmp_path, text, line, what):
    p = tmp_path / 'train.txt'
    p.write_text(text)
    with pytest.raises(BadInput) as e:
        read_split(p)
    assert str(p) in str(e.value) and f'line {line}:' in str(e.value) and what in str(e.value)


def test_split_blank_lines_ignored(tmp_path):
    p = tmp_path / 'train.txt'
    p.write_text('\na/1\n   \n\na/2\n\n')  # leading, inner and trailing blank lines
    assert read_split(p) == [('a', '1'), ('a', '2')]
    p.write_text('\n \n')
    with pytest.raises(BadInput, match='empty'):
        read_split(p)


@pytest.mark.parametrize(
    'text,line,what',
    [
        ('a/1\n/etc/passwd\n', 2, 'absolute path'),
        ('a/1\n\n/abs/dir/v\n', 3, 'absolute path'),
        ('C:\\data\\x/1\n', 1, 'absolute path'),
        ('a/1\n../other/1\n', 2, 'climbs out'),
        ('a/../../b/1\n', 1, 'climbs out'),
        ('a/1\nb/..\n', 2, 'climbs out'),
        ('a\\..\\b/1\n', 1, 'climbs out'),
    ],
)
def test_split_lines_outside_the_root_rejected(tmp_path, text, line, what):
    p = tmp_path / 'test.txt'
    p.write_text(text)
    with pytest.raises(BadInput) as e:
        read_split(p)
    assert str(p) in str(e.value) and f'line {line}:' in str(e.value) and what in str(e.value)
    p.write_text('a..b/v..1\nx/..y\n')  # dots inside names are fine
    assert read_split(p) == [('a..b', 'v..1'), ('x', '..y')]


def test_split_class_is_before_last_slash(tmp_path):
    p = tmp_path / 'x.txt'
    p.write_text('Put a/b thing/123\nplain/v_1\n')
    assert read_split(p) == [('Put a/b thing', '123'), ('plain', 'v_1')]


def test_synthetic_needs_root_and_reads_its_splits(toy, tmp_path):
    with pytest.raises(ValueError, match='root'):
        load_split('synthetic', 'test')
    sp = load_split('synthetic', 'test', toy)
    assert len(sp) == 12 and sp.classes == [f'class_{c}' for c in range(4)] and sp.class_names[0] == 'class 0'
    with pytest.raises(FileNotFoundError, match='val.txt'):
        load_split('synthetic', 'val', toy)


# ---------------------------------------------------------------- finding videos
def test_missing_data_root(tmp_path):
    sp = make_split('hmdb51', 'test', [('a', 'v1')])
    with pytest.raises(FileNotFoundError) as e:
        resolve_videos(sp, tmp_path / 'nowhere')
    assert 'nowhere' in str(e.value) and 'does not exist' in str(e.value)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        episode_dataset('synthetic', 'test', tmp_path / 'x' / 'y')


def test_layouts_resolved_per_video(tmp_path):
    for p in ['a/v1.mp4', 'a/v2.AVI', 'a/v3.webm', 'b/v4.mkv', 'b/v5.mov', 'v7.mp4']:
        (tmp_path / p).parent.mkdir(exist_ok=True, parents=True)
        (tmp_path / p).touch()
    (tmp_path / 'b' / 'v6').mkdir()
    (tmp_path / 'v8').mkdir()
    (tmp_path / 'a' / 'notes.txt').touch()
    sp = make_split(
        'hmdb51',
        'test',
        [
            ('a', 'v1'),
            ('a', 'v2'),
            ('a', 'v3'),
            ('b', 'v4'),
            ('b', 'v5'),
            ('b', 'v6'),
            ('a', 'v7'),
            ('b', 'v8'),
        ],
    )
    res = resolve_videos(sp, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in res.paths] == [
        'a/v1.mp4',
        'a/v2.AVI',
        'a/v3.webm',
        'b/v4.mkv',
        'b/v5.mov',
        'b/v6',
        'v7.mp4',
        'v8',
    ]


def test_index_is_one_walk(tmp_path, monkeypatch):
    for c in range(3):
        for k in range(4):
            (tmp_path / f'c{c}').mkdir(exist_ok=True)
            (tmp_path / f'c{c}' / f'v{k}.mp4').touch()
    import os

    calls = []
    real = os.scandir
    monkeypatch.setattr(os, 'scandir', lambda p='.': (calls.append(p), real(p))[1])
    monkeypatch.setattr(Path, 'exists', lambda self: pytest.fail('no per-video stat'))
    idx = index_videos(tmp_path, ['c0', 'c1', 'c2'])
    assert len(calls) == 4 and sum(len(v) for v in idx.by_class.values()) == 12


def test_missing_videos_reported(tmp_path):
    items = [('a', f'v{i}') for i in range(15)] + [('b', 'w0')]
    for _, v in items[:3]:
        (tmp_path / 'a').mkdir(exist_ok=True)
        (tmp_path / 'a' / f'{v}.mp4').touch()
    sp = make_split('hmdb51', 'test', items)
    with pytest.raises(MissingInput) as e:
        resolve_videos(sp, tmp_path)
    msg = str(e.value)
    assert '13 of 16 videos' in msg and 'a/v3' in msg and 'a/v12' in msg and str(tmp_path) in msg
    assert '--drop-missing' in msg and 'drop_missing=True' in msg
    assert 'b/w0' not in msg.split('Looked')[0]  # only the first 10 listed
    with pytest.warns(UserWarning, match='13 of 16 videos'):
        res = resolve_videos(sp, tmp_path, drop_missing=True)
    assert res.videos == ['v0', 'v1', 'v2'] and len(res.paths) == 3 and len(res.missing) == 13
    assert res.classes == sp.classes and res.labels == [0, 0, 0]


def test_kinetics_youtube_id_matching(tmp_path):
    (tmp_path / 'air drumming').mkdir()
    (tmp_path / 'air drumming' / '-kYzxMKp514.mp4').touch()  # stored by YouTube id only
    (tmp_path / 'air drumming' / '1663fIopl7c.mp4').touch()
    (tmp_path / 'air drumming' / '1663fIopl7c_000035_000045.mp4').touch()  # exact name wins
    (tmp_path / 'AbCdEfGhIjK_000001_000011.avi').touch()  # flat, full name
    sp = make_split(
        'kinetics100',
        'test',
        [
            ('air drumming', '-kYzxMKp514_000086_000096'),
            ('air drumming', '1663fIopl7c_000035_000045'),
            ('air drumming', 'AbCdEfGhIjK_000001_000011'),
        ],
    )
    res = resolve_videos(sp, tmp_path)
    assert [p.name for p in res.paths] == [
        '-kYzxMKp514.mp4',
        '1663fIopl7c_000035_000045.mp4',
        'AbCdEfGhIjK_000001_000011.avi',
    ]
    # other datasets do not match by prefix
    sp2 = make_split('hmdb51', 'test', [('air drumming', '-kYzxMKp514_000086_000096')])
    with pytest.raises(FileNotFoundError, match='1 of 1'):
        resolve_videos(sp2, tmp_path)


def test_too_few_videos_names_class():
    sp = make_split(
        'hmdb51',
        'train',
        [(c, f'{c}{k}') for c in 'abcdef' for k in range(4)] + [('tiny_class', 'x0'), ('tiny_class', 'x1')],
    )
    EpisodeSampler.from_split(sp, way=5, shot=1, query=1)
    with pytest.raises(BadInput) as e:
        EpisodeSampler.from_split(sp, way=5, shot=2, query=1)
    assert "'tiny_class' has 2" in str(e.value) and '2+1' in str(e.value)
    with pytest.raises(BadInput, match='split has 7'):
        EpisodeSampler.from_split(sp, way=8)


# ---------------------------------------------------------------- decoding
def test_formats_decode_to_same_shapes(tmp_path):
    a, b = mp4(tmp_path / 'v.mp4', 20), jpg_folder(tmp_path / 'v', 20)
    assert num_frames(a) == num_frames(b) == 20
    ca, cb = read_clip(a, 8, size=32, short_side=36), read_clip(b, 8, size=32, short_side=36)
    assert ca.shape == cb.shape == (8, 3, 32, 32) and ca.dtype == cb.dtype == torch.uint8
    assert (ca.float() - cb.float()).abs().mean() < 10  # both lossy, same pictures (grey levels)
    fa, fb = read_frames(a, [0, 19]), read_frames(b, [0, 19])
    assert fa.shape == fb.shape == (2, 32, 64, 3) and fa.dtype == np.uint8


def test_frame_folder_sorted_numerically(tmp_path):
    folder = jpg_folder(tmp_path / 'f', 12)
    assert [p.name for p in frame_files(folder)] == [f'{t}.jpg' for t in range(1, 13)]
    top = read_frames(folder, range(12))[:, :8].mean(axis=(1, 2, 3))
    assert np.all(np.diff(top) > 4), top  # brightness rises with the frame number: 10.jpg after 9.jpg


def test_widths_decord_cannot_copy(tmp_path):
    "decord fails on a few small widths (48 here); PyAV decodes those files instead."
    for w in (48, 64):
        p = mp4(tmp_path / f'w{w}.mp4', 10, w=w)
        f = read_frames(p, [0, 4, 9])
        assert f.shape == (3, 32, w, 3)
        assert np.all(np.diff(f[:, :8].reshape(3, -1).mean(1)) > 20)  # the right frames, in order


@pytest.mark.parametrize('content', [b'', b'garbage' * 50])
def test_undecodable_file_named(tmp_path, content):
    p = tmp_path / 'bad_video.mp4'
    p.write_bytes(content)
    for f in (lambda: num_frames(p), lambda: read_clip(p, 8, size=32, short_side=36)):
        with pytest.raises(BadInput, match='bad_video.mp4'):
            f()


def test_empty_frame_folder_named(tmp_path):
    (tmp_path / 'emptyvid').mkdir()
    with pytest.raises(BadInput, match='emptyvid.*has no images'):
        num_frames(tmp_path / 'emptyvid')
    with pytest.raises(BadInput, match='emptyvid'):
        read_clip(tmp_path / 'emptyvid', 8, size=32, short_side=36)
    (tmp_path / 'emptyvid' / 'sub').mkdir()
    with pytest.raises(BadInput, match='one level too high'):
        num_frames(tmp_path / 'emptyvid')


def test_bad_video_in_episode_named(tmp_path):
    root = synthetic_root(tmp_path, classes=3, per_class=2, frame_folder_every=0)
    (root / 'videos' / 'class_1' / 'v1_0.mp4').write_bytes(b'broken')
    ds = episode_dataset(
        'synthetic', 'test', root, way=3, shot=1, query=1, episodes=1, size=32, short_side=36
    )
    with pytest.raises(BadInput, match='v1_0.mp4'):
        ds[0]


@pytest.mark.parametrize('n', [1, 3, 5])
def test_short_video_repeats_frames(tmp_path, n):
    for mode in ('test', 'train', 'trx'):
        idx = frame_indices(n, 8, mode, np.random.default_rng(0))
        assert len(idx) == 8 and idx.min() >= 0 and idx.max() < n and np.all(np.diff(idx) >= 0)
    assert set(frame_indices(n, 8).tolist()) == set(range(n))  # every frame used, repeated in order
    p = jpg_folder(tmp_path / 'short', n)
    clip = read_clip(p, 8, size=32, short_side=36)
    assert clip.shape == (8, 3, 32, 32)
    distinct = sum(not torch.equal(clip[t], clip[t + 1]) for t in range(7))
    assert distinct == n - 1


def test_frame_index_modes():
    assert frame_indices(40).tolist() == np.round(np.linspace(1, 38, 8)).astype(int).tolist()
    assert frame_indices(40, 16).shape == (16,)
    rng = np.random.default_rng(0)
    for _ in range(50):
        tr = frame_indices(40, 8, 'train', rng)
        seg = np.floor(np.arange(8) * 5)
        assert np.all(tr >= seg) and np.all(tr < seg + 5)  # one frame per segment of 5
        tx = frame_indices(40, 8, 'trx', rng)
        assert abs(tx[0] - 1) <= 5 and abs(tx[-1] - 38) <= 5 and np.all(np.diff(tx) >= 0)
    with pytest.raises(ValueError, match='mode'):
        frame_indices(40, 8, 'middle')


def test_transforms():
    # 4 equal frames
    x = np.random.default_rng(0).integers(0, 255, (1, 60, 80, 3), dtype=np.uint8).repeat(4, 0)
    te = transform_clip(x, size=32, short_side=40)
    assert te.shape == (4, 3, 32, 32) and te.dtype == torch.float32
    seen_flip = False
    for s in range(10):
        tr = transform_clip(x, size=32, short_side=40, train=True, flip=True, rng=np.random.default_rng(s))
        assert all(torch.equal(tr[0], tr[t]) for t in range(4))  # one crop and flip per clip
        nf = transform_clip(x, size=32, short_side=40, train=True, flip=False, rng=np.random.default_rng(s))
        seen_flip |= torch.equal(tr, nf.flip(-1)) and not torch.equal(tr, nf)
    assert seen_flip
    grey = np.full((2, 30, 40, 3), 255, np.uint8)
    out = transform_clip(grey, 16, 16)
    expect = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, :, 5, 5], expect, atol=1e-4)
    # short side smaller than the crop: resized up to the crop
    assert transform_clip(grey, 24, 16).shape == (2, 3, 24, 24)


# ---------------------------------------------------------------- episodes
def test_sampler_on_real_split():
    sp = load_split('hmdb51', 'test')
    s = EpisodeSampler.from_split(sp, way=5, shot=5, query=2, seed=3)
    labels = np.asarray(sp.labels)
    for i in range(200):
        ep = s.episode(i)
        assert len(set(ep.class_ids)) == 5
        assert not set(ep.support_index) & set(ep.query_index)
        assert len(set(ep.support_index)) == 25 and len(set(ep.query_index)) == 10
        assert np.array_equal(labels[ep.support_index], np.repeat(ep.class_ids, 5))  # class-major
        assert np.array_equal(labels[ep.query_index], np.repeat(ep.class_ids, 2))
        assert np.array_equal(ep.support_labels, np.repeat(np.arange(5), 5))


def test_episodes_reproducible_across_instances():
    sp = load_split('ucf101', 'test')
    a, b = (EpisodeSampler.from_split(sp, 5, 1, 1, seed=1896) for _ in range(2))
    for i in (0, 1, 9999):
        ea, eb = a.episode(i), b.episode(i)
        assert np.array_equal(ea.class_ids, eb.class_ids) and np.array_equal(ea.query_index, eb.query_index)
        assert np.array_equal(ea.support_index, eb.support_index)
    b.episode(5)
    assert np.array_equal(a.episode(1).support_index, b.episode(1).support_index)  # order free
    assert not np.array_equal(a.episode(0).support_index, a.episode(1).support_index)
    c = EpisodeSampler.from_split(sp, 5, 1, 1, seed=1)
    assert any(not np.array_equal(a.episode(i).support_index, c.episode(i).support_index) for i in range(5))


def _episodes(ds, workers):
    return list(episode_loader(ds, num_workers=workers))


@pytest.mark.parametrize('split', ['test', 'train'])
def test_episodes_identical_across_worker_counts(toy, split):
    ds = episode_dataset(
        'synthetic', split, toy, way=3, shot=1, query=1, episodes=4, seed=5, size=32, short_side=40
    )
    assert ds.train == (split == 'train') and ds.flip is False
    e0, e2 = _episodes(ds, 0), _episodes(ds, 2)
    assert len(e0) == len(e2) == 4
    for a, b in zip(e0, e2):
        for k in (
            'support',
            'query',
            'support_labels',
            'query_labels',
            'class_ids',
            'support_index',
            'query_index',
        ):
            assert torch.equal(a[k], b[k]), k
        assert a['class_names'] == b['class_names']
    again = episode_dataset(
        'synthetic', split, toy, way=3, shot=1, query=1, episodes=4, seed=5, size=32, short_side=40
    )
    assert torch.equal(again[2]['support'], e0[2]['support'])


def test_episode_dict_contract(toy):
    ds = episode_dataset(
        'synthetic',
        'test',
        toy,
        way=3,
        shot=2,
        query=1,
        episodes=2,
        seed=0,
        num_frames=4,
        size=32,
        short_side=36,
    )
    ep = next(iter(episode_loader(ds)))
    assert ep['support'].shape == (6, 4, 3, 32, 32) and ep['query'].shape == (3, 4, 3, 32, 32)
    assert ep['support'].dtype == ep['query'].dtype == torch.uint8
    assert ep['support_labels'].tolist() == [0, 0, 1, 1, 2, 2] and ep['query_labels'].tolist() == [0, 1, 2]
    for k in ('support_labels', 'query_labels', 'class_ids', 'support_index', 'query_index'):
        assert ep[k].dtype == torch.long, k
    assert ep['class_names'] == [f'class {c}' for c in ep['class_ids'].tolist()]
    labels = torch.tensor(ds.split.labels)
    assert torch.equal(labels[ep['support_index']], ep['class_ids'].repeat_interleave(2))
    assert not set(ep['support_index'].tolist()) & set(ep['query_index'].tolist())


def test_train_episodes_random_test_fixed(toy):
    tr = episode_dataset(
        'synthetic', 'train', toy, way=3, shot=1, query=1, episodes=3, seed=0, size=32, short_side=48
    )
    assert tr.frame_mode == 'trx'
    assert not torch.equal(tr[0]['support'], tr[1]['support'])
    te = episode_dataset(
        'synthetic', 'test', toy, way=3, shot=1, query=1, episodes=3, seed=0, size=32, short_side=48
    )
    assert te.frame_mode == 'test'
    resumed = episode_dataset(
        'synthetic',
        'train',
        toy,
        way=3,
        shot=1,
        query=1,
        episodes=3,
        seed=0,
        size=32,
        short_side=48,
        offset=1,
    )
    assert torch.equal(resumed[0]['query'], tr[1]['query'])


def test_flip_defaults():
    sp = make_split('hmdb51', 'train', [(c, f'{c}{k}') for c in 'abc' for k in range(2)])
    sp.paths = [Path('x')] * len(sp)
    s = EpisodeSampler.from_split(sp, 2, 1, 1)
    assert EpisodeDataset(sp, s).flip is True
    sp2 = make_split('ssv2_small', 'train', [(c, f'{c}{k}') for c in 'abc' for k in range(2)])
    sp2.paths = sp.paths
    assert EpisodeDataset(sp2, s).flip is False
    sp3 = make_split('hmdb51', 'test', [(c, f'{c}{k}') for c in 'abc' for k in range(2)])
    sp3.paths = sp.paths
    assert EpisodeDataset(sp3, s).flip is False
    with pytest.raises(ValueError, match='resolve_videos'):
        EpisodeDataset(make_split('hmdb51', 'test', [('a', 'b')]), s)


def test_drop_missing_in_episode_dataset(tmp_path):
    root = synthetic_root(tmp_path, classes=3, per_class=3, frame_folder_every=0)
    (root / 'videos' / 'class_0' / 'v0_0.mp4').unlink()
    with pytest.raises(MissingInput, match='1 of 9'):
        episode_dataset('synthetic', 'test', root, way=3, episodes=1)
    with pytest.warns(UserWarning, match='1 of 9'):
        ds = episode_dataset(
            'synthetic', 'test', root, way=3, episodes=1, size=32, short_side=36, drop_missing=True
        )
    assert len(ds.split) == 8 and ds[0]['support'].shape == (3, 8, 3, 32, 32)


def test_clip_dataset_matches_test_episode(toy):
    ds = episode_dataset(
        'synthetic', 'test', toy, way=3, shot=1, query=1, episodes=1, seed=2, size=32, short_side=36
    )
    cds = ClipDataset(ds.split, size=32, short_side=36)
    assert len(cds) == len(ds.split)
    ep = ds[0]
    for j, i in enumerate(ep['query_index'].tolist()):
        clip, label, idx = cds[i]
        assert idx == i and label == ds.split.labels[i] and torch.equal(clip, ep['query'][j])
    batch = next(iter(torch.utils.data.DataLoader(cds, batch_size=4)))
    assert batch[0].shape == (4, 8, 3, 32, 32) and batch[1].dtype == torch.long


# ---------------------------------------------------------------- your own videos: the folder dataset
OWN_CLASSES = ['clap_hands', 'JumpRope', 'wave', 'push up', 'sit_down', 'StandUp', 'throw', 'catch_ball']


def own_root(root, classes=OWN_CLASSES, per_class=3, n=10):
    "`<root>/<class>/<video>`: every class has .mp4 files and one JPEG frame folder."
    for c, cls in enumerate(classes):
        for k in range(per_class):
            if k == 1:
                jpg_folder(root / cls / f'vid{k}', n + k, seed=c)
            else:
                mp4(root / cls / f'vid{k}.mp4', n + k, seed=c)
    return root


@pytest.fixture(scope='module')
def own(tmp_path_factory):
    return own_root(tmp_path_factory.mktemp('data') / 'my_actions')


def test_folder_split_on_the_fly_both_formats(own, tmp_path):
    cfg = DataConfig(dataset='folder', data_root=str(own), split_classes='4/2/2', split_seed=3, way=2, shot=1)
    splits = {s: load_data(cfg, s) for s in SPLITS}
    assert [len(sp.classes) for sp in splits.values()] == [4, 2, 2]
    # disjoint, complete
    assert sorted(c for sp in splits.values() for c in sp.classes) == sorted(OWN_CLASSES)
    assert all(len(sp) == 3 * len(sp.classes) for sp in splits.values())  # each class whole
    assert {p.suffix for sp in splits.values() for p in sp.paths} == {'.mp4', ''}  # files and frame folders
    names = {n for sp in splits.values() for n in sp.class_names}
    assert {'clap hands', 'jump rope', 'push up', 'stand up', 'catch ball'} <= names
    assert splits['val'].title == 'my_actions' and 'my_actions' in repr(splits['val'])
    other = DataConfig(dataset='folder', data_root=str(own), split_classes='4/2/2', split_seed=4)
    assert any(load_data(other, s).classes != splits[s].classes for s in SPLITS)  # the seed decides
    assert load_data(cfg, 'test').videos == splits['test'].videos  # and only the seed
    for s in SPLITS:  # both formats decode into the same uint8 clips
        ep = episode_data(cfg, splits[s], num_frames=4, size=32, episodes=2, seed=0)[1]
        assert ep['support'].dtype == torch.uint8 and ep['support'].shape == (2, 4, 3, 32, 32)


def test_folder_split_written_and_reused(own, tmp_path):
    cfg = DataConfig(dataset='folder', data_root=str(own), split_classes='0.5/0.25/0.25', way=2, shot=1)
    run = tmp_path / 'runs' / dataset_label(cfg)
    frozen = freeze_split(cfg, run / 'splits')
    assert frozen.splits == str(run / 'splits') and cfg.splits == ''
    assert sorted(p.name for p in (run / 'splits').iterdir()) == ['test.txt', 'train.txt', 'val.txt']
    for s in SPLITS:
        assert load_data(frozen, s).videos == load_data(cfg, s).videos
        assert read_split(run / 'splits' / f'{s}.txt') == list(
            zip([load_data(cfg, s).classes[y] for y in load_data(cfg, s).labels], load_data(cfg, s).videos)
        )
    assert freeze_split(frozen, tmp_path / 'elsewhere') is frozen and not (tmp_path / 'elsewhere').exists()
    # a class folder added later does not change the run's split
    extra = own_root(tmp_path / 'grown', OWN_CLASSES + ['dance'])
    grown = DataConfig(dataset='folder', data_root=str(extra), splits=frozen.splits)
    assert load_data(grown, 'train').classes == load_data(frozen, 'train').classes
    # the folder's lists are never overwritten by another split
    with pytest.raises(BadInput, match='different split list'):
        freeze_split(
            DataConfig(dataset='folder', data_root=str(own), split_classes='4/2/2', split_seed=9),
            run / 'splits',
        )


def test_folder_lists_in_root_and_splits_flag(own, tmp_path):
    root = own_root(tmp_path / 'listed', OWN_CLASSES[:4], per_class=2)
    cfg = DataConfig(dataset='folder', data_root=str(root))
    with pytest.raises(MissingInput) as e:
        load_data(cfg, 'train')
    assert all(s in str(e.value) for s in ('train.txt', '--splits', '--split-classes'))
    (root / 'splits').mkdir()
    for s, classes in zip(SPLITS, [OWN_CLASSES[:2], OWN_CLASSES[2:3], OWN_CLASSES[3:4]]):
        (root / 'splits' / f'{s}.txt').write_text(
            ''.join(f'{c}/vid{k}\n' for c in classes for k in range(2)) + '\n'
        )
    assert load_data(cfg, 'train').classes == sorted(OWN_CLASSES[:2]) and len(load_data(cfg, 'val')) == 2
    elsewhere = tmp_path / 'lists'
    elsewhere.mkdir()
    (elsewhere / 'val.txt').write_text('push up/vid1\n')
    assert load_data(
        DataConfig(dataset='folder', data_root=str(root), splits=str(elsewhere)), 'val'
    ).videos == ['vid1']


def test_class_names_file(own, tmp_path):
    names = tmp_path / 'names.json'
    names.write_text(json.dumps({'JumpRope': 'skipping rope', 'wave': 'waving a hand'}))
    cfg = DataConfig(dataset='folder', data_root=str(own), split_classes='4/2/2', class_names=str(names))
    got = {c: n for s in SPLITS for sp in [load_data(cfg, s)] for c, n in zip(sp.classes, sp.class_names)}
    assert (
        got['JumpRope'] == 'skipping rope' and got['wave'] == 'waving a hand' and got['StandUp'] == 'stand up'
    )
    names.write_text(json.dumps({'Jumprope': 'typo'}))
    with pytest.raises(BadInput, match="'Jumprope'"):
        load_data(cfg, 'train')
    names.write_text('{"JumpRope": 3}')
    with pytest.raises(BadInput, match='names file'):
        load_data(cfg, 'train')
    names.write_text('not json')
    with pytest.raises(BadInput, match='not valid JSON'):
        load_data(cfg, 'train')
    with pytest.raises(MissingInput, match='nothere.json'):
        load_data(
            DataConfig(
                dataset='folder',
                data_root=str(own),
                split_classes='4/2/2',
                class_names=str(tmp_path / 'nothere.json'),
            ),
            'val',
        )
    # also for a benchmark: a prompt name fixed by hand
    (tmp_path / 'ucf.json').write_text('{"YoYo": "playing with a yo-yo"}')
    sp = load_split('ucf101', 'train', class_names=tmp_path / 'ucf.json')
    assert 'playing with a yo-yo' in sp.class_names


@pytest.mark.parametrize(
    'spec,n,counts',
    [
        ('64/12/24', 100, (64, 12, 24)),
        ('64/12/24', 150, (64, 12, 24)),
        ('3/1/1', 5, (3, 1, 1)),
        ('0.6/0.2/0.2', 10, (6, 2, 2)),
        ('0.64/0.12/0.24', 100, (64, 12, 24)),
        ('0.5/0.25/0.25', 6, (3, 2, 1)),
        (' 0.7 / 0.15 / 0.15 ', 15, (11, 2, 2)),
    ],
)
def test_split_classes_spec(spec, n, counts):
    got = parse_split_classes(spec, n)
    assert got == counts and sum(got) <= n


@pytest.mark.parametrize(
    'spec,what',
    [
        ('64/12', 'three numbers'),
        ('a/b/c', 'three numbers'),
        ('64/12/24', 'asks for 100 classes'),
        ('0.8/0.3/0.2', 'at most 1'),
        ('1.5/0.2/0.2', 'at most 1'),
        ('5/0/5', 'every split needs'),
        ('0.98/0.01/0.01', 'every split needs'),
        ('-1/2/2', 'three numbers'),
    ],
)
def test_split_classes_spec_errors(spec, what):
    with pytest.raises(BadInput, match=what):
        parse_split_classes(spec, 50)


def test_folder_user_errors(tmp_path, own):
    with pytest.raises(MissingInput, match='nowhere.*--data-root'):
        load_data(
            DataConfig(dataset='folder', data_root=str(tmp_path / 'nowhere'), split_classes='1/1/1'), 'val'
        )
    flat = tmp_path / 'one_class'  # the root points at a class: videos' frames directly inside
    jpg_folder(flat / 'vid0', 4)
    jpg_folder(flat / 'vid1', 4)
    with pytest.raises(BadInput, match='one level too deep'):
        load_data(DataConfig(dataset='folder', data_root=str(flat), split_classes='1/1/1'), 'val')
    with pytest.raises(BadInput, match='own data'):
        load_data(DataConfig(dataset='hmdb51', data_root=str(own), split_classes='1/1/1'), 'val')
    with pytest.raises(BadInput, match='own data'):
        freeze_split(DataConfig(dataset='hmdb51', data_root=str(own), split_classes='1/1/1'), tmp_path / 's')
    (own.parent / 'junk' / 'empty_class').mkdir(parents=True)
    own_root(own.parent / 'junk', OWN_CLASSES[:3], per_class=1)
    with pytest.warns(UserWarning, match='empty_class'):
        sp = load_data(
            DataConfig(dataset='folder', data_root=str(own.parent / 'junk'), split_classes='1/1/1'), 'train'
        )
    assert 'empty_class' not in sp.classes
    cfg = DataConfig(dataset='folder', data_root=str(own), split_classes='4/2/2', way=3)
    with pytest.raises(BadInput, match='3-way episodes need 3 classes, the val split .* has 2'):
        episode_data(cfg, load_data(cfg, 'val'), 4, 32, 1, 0)
    with pytest.raises(BadInput, match='fewer videos than shot\\+query = 5\\+2'):
        episode_data(DataConfig(way=2), load_data(cfg, 'train'), 4, 32, 1, 0)


def test_dataset_label(tmp_path):
    assert dataset_label(DataConfig()) == 'synthetic'
    assert dataset_label(DataConfig(dataset='ssv2-full', data_root='/data/ssv2')) == 'ssv2_full'
    assert (
        dataset_label(DataConfig(dataset='folder', data_root=str(tmp_path / 'my_actions') + '/'))
        == 'my_actions'
    )
    assert (
        dataset_label(DataConfig(dataset='folder', data_root=str(tmp_path / 'my actions (2024)')))
        == 'my_actions_2024'
    )


def test_data_config_defaults_and_help():
    import inspect
    from dataclasses import fields

    cfg = DataConfig()
    assert (
        cfg.dataset,
        cfg.data_root,
        cfg.way,
        cfg.shot,
        cfg.train_query,
        cfg.test_query,
        cfg.short_side,
        cfg.flip,
        cfg.workers,
    ) == ('synthetic', 'data/synthetic', 5, 5, 2, 1, 72, False, 1)
    need = {
        'dataset',
        'data_root',
        'splits',
        'split_classes',
        'class_names',
        'labels_json',
        'drop_missing',
        'way',
        'shot',
        'train_query',
        'test_query',
        'short_side',
        'flip',
        'workers',
    }
    assert need <= {f.name for f in fields(DataConfig)}
    src = inspect.getsource(DataConfig)
    for f in fields(DataConfig):  # every field typed, with one plain default and a help comment
        assert f.type in ('str', 'int', 'bool') and type(f.default).__name__ == f.type, f.name
        assert re.search(rf'^\s+{f.name}: \w+ = [^#]+# \S', src, re.M), f.name


def test_episode_data_follows_the_split(toy):
    cfg = DataConfig(data_root=str(toy), way=3, shot=1, train_query=2, test_query=1, flip=True, short_side=36)
    tr, te = load_data(cfg, 'train'), load_data(cfg, 'test')
    a, b = episode_data(cfg, tr, 4, 32, 3, seed=1), episode_data(cfg, te, 4, 32, 3, seed=1)
    assert (a.train, a.flip, a.frame_mode, a.sampler.query) == (True, True, 'trx', 2)
    assert (b.train, b.flip, b.frame_mode, b.sampler.query) == (False, False, 'test', 1)
    assert a[0]['query'].shape == (6, 4, 3, 32, 32) and b[0]['query'].shape == (3, 4, 3, 32, 32)
    assert torch.equal(episode_data(cfg, tr, 4, 32, 3, seed=1, offset=1)[0]['support'], a[1]['support'])
    assert episode_data(cfg, te, 4, 32, 1, seed=1, shot=2).sampler.shot == 2


# ---------------------------------------------------------------- SSv2-Full flat layout: ids that are class ids
def test_ssv2_flat_frame_folders_named_like_classes(tmp_path):
    train = read_split(splits_dir('ssv2_full') / 'train.txt')
    classes = {c for c, _ in train}
    colliding = [(c, v) for c, v in train if v in classes]
    assert len(colliding) == 20 and ('9', '56') in colliding  # the shipped list's real collisions
    plain = [(c, v) for c, v in train if v not in classes][:10]
    items = colliding + plain
    for _, v in items:
        jpg_folder(tmp_path / v, 2)
    sp = make_split('ssv2_full', 'train', items)
    res = resolve_videos(sp, tmp_path)
    assert [p.name for p in res.paths] == [v for _, v in items] and not res.missing
    # a real class folder of the same name still works: class folder first, then the flat entry
    jpg_folder(tmp_path / '9', 2)
    (tmp_path / '9' / 'inside.mp4').touch()  # both a class folder and video 9's frames
    res = resolve_videos(make_split('ssv2_full', 'train', [('9', 'inside'), ('125', '9')]), tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in res.paths] == ['9/inside.mp4', '9']


# ---------------------------------------------------------------- user errors: types, file names, workers
def test_truncated_and_damaged_frames_name_the_file(tmp_path):
    folder = jpg_folder(tmp_path / 'vid', 6)
    data = (folder / '4.jpg').read_bytes()
    (folder / '4.jpg').write_bytes(data[: len(data) // 3])
    with pytest.raises(BadInput) as e:
        read_frames(folder, [0, 3])
    assert (
        str(folder / '4.jpg') in str(e.value)
        and 'truncated' in str(e.value)
        and '--drop-missing' in str(e.value)
    )
    read_frames(folder, [0, 1, 2])  # the other frames are fine
    (folder / '4.jpg').write_bytes(b'not an image')
    with pytest.raises(BadInput, match='4.jpg cannot be decoded'):
        read_clip(folder, 6, size=16, short_side=16)
    Image.new('RGB', (10, 10)).save(folder / '4.jpg')
    with pytest.raises(BadInput, match='differ in size'):
        read_frames(folder, [0, 3])


@pytest.mark.parametrize('cut', [0, 200, 0.5])
def test_truncated_video_file_named(tmp_path, cut):
    p = mp4(tmp_path / 'clip.mp4', 20)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(BadInput) as e:
        read_clip(p, 8, size=16, short_side=16)
    assert str(p) in str(e.value) and '--drop-missing' in str(e.value)


def test_user_errors_are_typed(tmp_path):
    with pytest.raises(MissingInput, match='does not exist'):
        read_split(tmp_path / 'nope.txt')
    with pytest.raises(MissingInput, match='nowhere'):
        resolve_videos(make_split('hmdb51', 'test', [('a', 'v')]), tmp_path / 'nowhere')
    with pytest.raises(MissingInput, match='vanished'):
        read_clip(tmp_path / 'vanished.mp4')
    with pytest.raises(BadInput, match='split must be one of'):
        load_split('hmdb51', 'dev')
    assert issubclass(MissingInput, FileNotFoundError) and issubclass(BadInput, ValueError)


@pytest.mark.parametrize('workers', [0, 2])
def test_worker_errors_keep_type_and_message(tmp_path, workers):
    root = synthetic_root(tmp_path, classes=3, per_class=2, frame_folder_every=0)
    (root / 'videos' / 'class_1' / 'v1_0.mp4').write_bytes(b'broken' * 20)
    ds = episode_dataset(
        'synthetic', 'test', root, way=3, shot=1, query=1, episodes=2, size=32, short_side=36
    )
    with pytest.raises(BadInput) as e:
        list(episode_loader(ds, num_workers=workers))
    msg = str(e.value)
    assert msg.startswith('video ') and 'v1_0.mp4' in msg and 'Traceback' not in msg and 'Caught' not in msg
    assert len(msg.splitlines()) <= 2


# ---------------------------------------------------------------- trx frames on short clips
def _trx_released(n, T, rng, jitter=5):
    "The released code's rule: both ends jittered by up to `jitter` frames whatever the clip's length."
    start, end = (1, n - 2) if n >= T + 2 else (0, n - 1)
    start = int(np.clip(start + rng.integers(-jitter, jitter + 1), 0, n - 1))
    end = int(np.clip(end + rng.integers(-jitter, jitter + 1), 0, n - 1))
    return np.round(np.linspace(min(start, end), max(start, end), T)).astype(np.int64)


@pytest.mark.parametrize('T', [4, 8, 16])
def test_trx_never_repeats_while_frames_remain(T):
    for n in range(T, 3 * T + 1):
        for s in range(200):
            idx = frame_indices(n, T, 'trx', np.random.default_rng(s))
            assert len(idx) == T and np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < n, (n, idx)
            old = _trx_released(n, T, np.random.default_rng(s))
            if len(set(old.tolist())) == T:
                assert np.array_equal(idx, old), (n, s)  # unchanged where it was fine
    for n in range(1, T):  # shorter than T: every frame, in order, as the test mode
        for s in range(20):
            assert np.array_equal(frame_indices(n, T, 'trx', np.random.default_rng(s)), frame_indices(n, T))


def test_trx_unchanged_on_long_clips_and_still_jitters():
    for n in (20, 21, 40, 100, 300):
        for s in range(100):
            assert np.array_equal(
                frame_indices(n, 8, 'trx', np.random.default_rng(s)),
                _trx_released(n, 8, np.random.default_rng(s)),
            )
    starts = {int(frame_indices(12, 8, 'trx', np.random.default_rng(s))[0]) for s in range(200)}
    assert starts == set(range(5))  # 12 frames, 8 needed: the window still moves over the 4 spare frames
    # the same draws as before: a clip's crop after its indices is unchanged
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    frame_indices(9, 8, 'trx', r1)
    _trx_released(9, 8, r2)
    assert r1.integers(1000) == r2.integers(1000)


# ---------------------------------------------------------------- uint8 clips
def test_uint8_clips_match_the_float_transform(tmp_path):
    frames = frames_of(6, h=40, w=60)
    for train in (False, True):
        kw = dict(size=32, short_side=36, train=train, flip=True)
        u = crop_clip(frames, rng=np.random.default_rng(1), **kw)
        f = transform_clip(frames, rng=np.random.default_rng(1), **kw)
        assert u.dtype == torch.uint8 and u.shape == f.shape == (6, 3, 32, 32)
        err = (to_clip_input(u) - f).abs().max().item()
        assert err <= 0.5 / 255 / min(CLIP_STD) + 1e-6  # half a grey level, normalised
    same = frames_of(4, h=32, w=32)  # no resize needed: exact
    assert torch.equal(crop_clip(same, 32, 32), torch.from_numpy(same).permute(0, 3, 1, 2))
    assert torch.equal(
        to_clip_input(crop_clip(same, 32, 32)),
        normalize(torch.from_numpy(same).permute(0, 3, 1, 2).float() / 255),
    )


def test_random_episode():
    ep = random_episode(way=3, shot=2, query=2, frames=4, size=16, seed=1)
    assert ep['support'].shape == (6, 4, 3, 16, 16) and ep['query'].shape == (6, 4, 3, 16, 16)
    assert ep['support'].dtype == ep['query'].dtype == torch.uint8
    assert ep['support_labels'].tolist() == [0, 0, 1, 1, 2, 2] and ep['query_labels'].tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert ep['class_names'] == ['class 0', 'class 1', 'class 2']
    assert torch.equal(random_episode(seed=1)['support'], random_episode(seed=1)['support'])
    assert not torch.equal(random_episode(seed=1)['support'], random_episode(seed=2)['support'])


def test_episode_generator_is_the_evaluation_one():
    from mdmf.evaluate import episode_generator as old

    for args in [(1896, 'test', 0), (0, 'train', 4711)]:
        assert torch.equal(
            torch.rand(5, generator=episode_generator(*args, 'cpu')),
            torch.rand(5, generator=old(*args, 'cpu')),
        )
