"""Batched evaluation (`episode_logits`, `eval.episode_batch`) gives the predictions of the one-by-one path
(`forward_features` per episode) on the shipped example runs and the frame mean, and the default run's
settings that the README states."""

import numpy as np
import pytest
import torch

from mdmf.config import preset_config, resolve_config
from mdmf.evaluate import encode_split, evaluate
from mdmf.examples import example_run
from mdmf.inspection import load_run
from mdmf.model import FewShotModel, build_model


@pytest.fixture(scope='module')
def home(tmp_path_factory):
    "The example runs and their synthetic data under a fresh MDMF_HOME."
    home = tmp_path_factory.mktemp('home')
    for m in ('mdmf', 'clip-fsar'):
        example_run(m, home, train=False, quiet=True)
    return home


def _model(home, name):
    if name == 'frame-mean':
        cfg = preset_config('synthetic').replace(
            model='frame-mean', data_root=str(home / 'data' / 'synthetic')
        )
        return build_model(cfg.model).eval(), cfg
    model, cfg = load_run(home / 'examples' / f'synthetic-{name}')
    model.cfg.return_attention = False  # as the run evaluated it
    return model, cfg


@pytest.mark.parametrize('name', ['mdmf', 'clip-fsar', 'frame-mean'])
def test_batched_predictions_equal_one_by_one(home, name, monkeypatch):
    model, cfg = _model(home, name)
    cfg = cfg.replace(progress=False)
    from mdmf.data import load_data

    split = load_data(cfg.data, 'test')
    feats = encode_split(model, split, cfg)
    batched = evaluate(model, cfg.replace(episode_batch=64), 'test', 300, data=split, features=feats)
    small = evaluate(model, cfg.replace(episode_batch=7), 'test', 300, data=split, features=feats)
    # forward_features, episode by episode
    monkeypatch.setattr(type(model), 'episode_logits', FewShotModel.episode_logits)
    one = evaluate(model, cfg.replace(episode_batch=1), 'test', 300, data=split, features=feats)
    np.testing.assert_array_equal(batched.predictions, one.predictions)
    np.testing.assert_array_equal(small.predictions, one.predictions)
    assert (batched.accuracy, batched.ci95) == (one.accuracy, one.ci95)
    assert one.accuracy > 60  # trained runs (frame mean: the pretrained features), far above chance (20 %)


def test_batched_logits_match_and_mdmf_fuses_each_pair_once(home):
    model, cfg = _model(home, 'mdmf')
    from mdmf.data import load_data
    from mdmf.episodes import EpisodeSampler, episode_generator

    split = load_data(cfg.data, 'test')
    feats, tokens = encode_split(model, split, cfg), model.class_tokens(split.class_names)
    sampler = EpisodeSampler.from_split(split, 5, 5, 1, cfg.run.seed)
    eps = [sampler.episode(i) for i in range(40)]
    rows = lambda k: torch.from_numpy(np.stack([getattr(e, k) for e in eps]))
    gens = lambda: [episode_generator(cfg.run.seed, 'test', i, 'cpu') for i in range(40)]
    calls = []
    hook = model.mmfe['gtc'].register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    with torch.no_grad():
        fast = model.episode_logits(
            feats,
            tokens,
            rows('support_index'),
            rows('support_labels'),
            rows('query_index'),
            rows('class_ids'),
            gens(),
        )
        ref = FewShotModel.episode_logits(
            model,
            feats,
            tokens,
            rows('support_index'),
            rows('support_labels'),
            rows('query_index'),
            rows('class_ids'),
            gens(),
        )
    hook.remove()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    # distinct (video, token) pairs
    assert calls[0] < 40 * 30 and calls[0] <= len(split) * (len(split.class_names) + 1)


def test_default_run_is_frozen_and_finetuning_one_flag_away():
    cfg = resolve_config([])
    assert cfg.model.freeze_visual and cfg.optim.train_draws > 0 and cfg.eval.test_episodes == 10000
    assert not resolve_config(['--no-freeze-visual']).model.freeze_visual
    assert not any(
        preset_config(p).model.freeze_visual for p in ('hmdb51', 'ucf101', 'kinetics100', 'ssv2_small')
    )


def test_the_example_file_is_named_as_such_with_how_to_use_it(home, tmp_path):
    "Given a shipped example file, the command says what it is and how to make its run folder (exit 2)."
    import json
    import subprocess
    import sys
    from pathlib import Path

    from mdmf.evaluate import main
    from mdmf.examples import example_file

    p = subprocess.run(
        [sys.executable, '-m', 'mdmf.evaluate', '--checkpoint', str(example_file('mdmf'))],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 2 and 'Traceback' not in p.stderr, p.stderr
    assert lines[0].startswith(
        f'error: {example_file("mdmf")} is an example file shipped with mdmf, not a checkpoint'
    )
    assert (
        "from mdmf.examples import example_run; print(example_run('mdmf'))" in lines[1]
        and '--checkpoint' in lines[1]
    )
    # the folder example_run makes is what --checkpoint takes
    out = tmp_path / 'eval.json'
    main(
        [
            '--checkpoint',
            str(home / 'examples' / 'synthetic-mdmf'),
            '--episodes',
            '4',
            '--no-progress',
            '--no-cache',
            '--workers',
            '0',
            '--out',
            str(out),
        ]
    )
    assert json.loads(out.read_text())['test']['episodes'] == 4
