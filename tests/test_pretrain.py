"""The pretraining of the tiny CLIP: the leakage rule of its data (pool, clip captions, frame captions, facts),
determinism, the command line, and the shipped weights (loading, and what they see)."""

import json

import numpy as np
import torch
from clip.model import build_model

from mdmf.backbone import Backbone, load_clip, pretrained_file
from mdmf.captions import (
    CLASS_NAMES,
    FACTS,
    Crop,
    contains_class_name,
    describe_clip,
    describe_frame,
    fact_truth,
    view_objects,
)
from mdmf.pretrain import (
    PretrainConfig,
    batch_captions,
    check_disjoint,
    frame_features,
    main,
    pool_params,
    pretrain,
    render_pool,
    sample_frames,
)
from mdmf.synthetic import CLASSES, assign_splits, render, render_scene, video_params
from mdmf.video import frame_indices, transform_clip


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the leakage rule


def test_pool_never_meets_the_dataset():
    r = check_disjoint(seed=0, clips=12000, dataset_seed=0, videos_per_class=30)
    assert r['equal_params'] == 0 and r['equal_seed_field'] == 0
    # pixels, on a part of both (rendering everything takes a minute)
    ds_frames = {
        f.tobytes() for c in CLASSES[:8] for i in range(3) for f in render(video_params(0, c.name, i), 16, 64)
    }
    pool, _ = render_pool(0, clips=60, workers=1)
    assert not any(f.tobytes() in ds_frames for clip in pool for f in clip)
    # the check is not vacuous: a dataset video's own record is caught
    assert (
        check_disjoint(
            seed=0,
            clips=10,
            videos_per_class=3,
            pixels=True,
            pool=np.stack([render(video_params(0, CLASSES[0].name, 1), 16, 64)[:8]]),
        )['equal_frames']
        == 1
    )


def test_no_caption_contains_a_class_name():
    assert len(CLASS_NAMES) == 40
    rng = np.random.default_rng(0)
    params = [pool_params(3, i) for i in range(3000)]
    clip_caps = [describe_clip(p, rng) for p in params]
    assert not any(contains_class_name(c) for c in clip_caps)
    assert {p.action for p in params} == set(CLASS_NAMES)  # every motion of every class is in the pool
    pool, scenes = render_pool(3, clips=200, workers=1)
    g = torch.Generator().manual_seed(0)
    cc, fc, truth = batch_captions(
        [pool_params(3, i) for i in range(200)],
        scenes,
        list(range(200)),
        sample_frames(8, 4, 200, g),
        [Crop(top=t, left=8 - t) for t in range(9)] * 23,
        rng,
    )
    assert len(fc) == 800 and truth.shape == (800, len(FACTS))
    for text in cc + fc + list(FACTS):
        low = text.lower()
        assert not any(n in low for n in CLASS_NAMES), text
    # the guard is not vacuous: class names are caught, inside longer text and in any case
    for n in CLASS_NAMES:
        assert contains_class_name(f'A video of {n.upper()} on a plain background') == [n]


def test_frame_captions_and_facts_follow_the_state():
    p = pool_params(
        0,
        next(
            i
            for i in range(200)
            if pool_params(0, i).family == 'translate_horizontal'
            and pool_params(0, i).direction == 'left_to_right'
        ),
    )
    _, objs = render_scene(p, 8, 64)
    first, last = (fact_truth(view_objects(objs, f)) for f in (0, 7))
    col = lambda t: [i for i in range(5) if t[i]]
    assert max(col(first)) < min(col(last))  # the columns that hold an actor move right
    assert first[FACTS.index('one shape')] and not first[FACTS.index('two shapes')]
    text = describe_frame(view_objects(objs, 7), p.background, np.random.default_rng(0))
    assert p.colour in text and ('right' in text), text
    # a crop moves what the captions say: the same frame cut far to the right puts the object further left
    x_centre = view_objects(objs, 7)[-1].x
    assert (
        view_objects(objs, 7, Crop(top=4, left=8))[-1].x
        < x_centre
        < view_objects(objs, 7, Crop(top=4, left=0))[-1].x
    )


# -- determinism and the command line


def test_deterministic_for_a_seed():
    cfg = PretrainConfig(steps=3, clips=24, batch=8, warmup=1, workers=1)
    pool = render_pool(cfg.seed, cfg.clips, cfg.pool_frames, workers=1)
    a, info = pretrain(cfg, pool, progress=False, log=None)
    b, _ = pretrain(cfg, pool, progress=False, log=None)
    assert _same(a, b)
    assert all(np.isfinite([h['clip'], h['frame'], h['fact']]).all() for h in info['history'])
    c, _ = pretrain(
        PretrainConfig(steps=3, clips=24, batch=8, warmup=1, workers=1, seed=1), progress=False, log=None
    )
    assert not _same(a, c)


def test_cli_writes_a_file_build_model_accepts(tmp_path):
    out = tmp_path / 'w.pt'
    main(
        [
            '--out',
            str(out),
            '--steps',
            '2',
            '--clips',
            '16',
            '--batch',
            '8',
            '--warmup',
            '1',
            '--workers',
            '1',
            '--no-progress',
        ]
    )
    sd = torch.load(out, map_location='cpu', weights_only=True)
    model = build_model(dict(sd))
    assert model.visual.input_resolution == 64 and model.text_projection.shape == (64, 64)
    assert _same(load_clip(str(out)), load_clip(str(out)))
    info = json.loads(out.with_suffix('.json').read_text())
    assert info['config']['steps'] == 2 and info['checks']['equal_params'] == 0 and len(info['history']) == 1


# -- the shipped weights


def test_shipped_weights_load_and_work():
    path = pretrained_file('tiny-pretrained')
    assert path.stat().st_size < 20e6
    sd = torch.load(path, map_location='cpu', weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    m = load_clip('tiny-pretrained')
    assert next(m.parameters()).dtype == torch.float32 and not m.training
    assert _same(m, load_clip(str(path)))
    bb = Backbone(m)
    assert (bb.dim, bb.image_size) == (64, 64)
    names = [c.name for c in CLASSES[:6]]
    with torch.no_grad():
        f = bb.encode_frames(torch.randn(2, 3, 3, 64, 64))
        t = bb.encode_prompts(names)
    assert (
        f.shape == (2, 3, 64) and t.shape == (6, 64) and torch.isfinite(f).all() and torch.isfinite(t).all()
    )
    info = json.loads(path.with_suffix('.json').read_text())
    assert info['checks']['equal_params'] == 0 and info['checks'].get('equal_frames', 0) == 0


def _val_videos(per_class: int = 12):
    "Freshly rendered val videos (the dataset's own records), test frames and crop: [V, T, 3, S, S], labels, names."
    val = assign_splits()['val']
    clips, labels = [], []
    for y, c in enumerate(val):
        for i in range(per_class):
            clips.append(
                transform_clip(render(video_params(0, c.name, i), 16, 64)[frame_indices(16, 8)], 64, 72)
            )
            labels.append(y)
    return torch.stack(clips), torch.tensor(labels), [c.name for c in val]


def test_shipped_weights_see_order_and_are_aligned():
    """On unseen val classes: zero-shot by names beats chance, and ordered frame matching (OTAM on the raw frame
    features) tells a direction pair apart where the order-blind frame mean cannot."""
    from mdmf.otam import otam_distance
    from mdmf.pretrain import class_prompt_features, zero_shot_accuracy

    x, y, names = _val_videos()
    m = load_clip('tiny-pretrained')
    with torch.no_grad():
        f = frame_features(m, x).float()  # [V, T, D]
        acc = zero_shot_accuracy(f, y, class_prompt_features(m, names))
    assert acc > 2 / len(names), acc  # chance 1/8, order-blind ceiling 5/8
    up, down = names.index('moving something up'), names.index('moving something down')
    fu, fd = f[y == up], f[y == down]  # [12, T, D] each
    protos = torch.stack([fu[:6].mean(0), fd[:6].mean(0)])  # [2, T, D] from 6 shots each
    queries, truth = torch.cat([fu[6:], fd[6:]]), torch.tensor([0] * 6 + [1] * 6)
    ordered = otam_distance(queries, protos).argmin(-1).eq(truth).float().mean().item()
    blind = (
        torch.nn.functional.normalize(queries.mean(1), dim=-1)
        @ torch.nn.functional.normalize(protos.mean(1), dim=-1).T
    )
    assert ordered >= 0.9, ordered
    assert abs(blind.argmax(-1).eq(truth).float().mean().item() - 0.5) <= 0.35  # near a coin flip
