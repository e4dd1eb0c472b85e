"""Training and evaluation behaviour that the train notebook cannot show compactly.

A tiny synthetic dataset is made once per session; every run here is a few episodes of the tiny backbone.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdmf.config import Config, config_from_dict, config_parser, config_to_dict, preset_config, resolve_config
from mdmf.evaluate import evaluate, load_data
from mdmf.model import build_model
from mdmf.runs import load_checkpoint
from mdmf.runtime import Runtime
from mdmf.synthetic import make_synthetic
from mdmf.train import Trainer, train, train_schedule

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
    'OMP_NUM_THREADS': '1',
}
METRIC_KEYS = [
    ('test', 'accuracy'),
    ('test', 'ci95'),
    ('test', 'episodes'),
    ('test', 'videos'),
    ('val', 'accuracy'),
    ('train', 'episodes'),
    ('timings', 'total_s'),
]


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    make_synthetic(root, videos_per_class=12, frames=8, size=32, workers=1)
    return root


# the paper's fine-tuned path here; the default's frozen path: test_frozen_run_...
TINY = dict(
    backbone='tiny-vit',
    short_side=64,
    shot=1,
    train_query=1,
    train_episodes=6,
    accum=2,
    val_every=3,
    val_episodes=10,
    test_episodes=12,
    checkpoint_every=2,
    log_every=2,
    threads=1,
    workers=0,
    progress=False,
    ffn_dim=64,
    heads=2,
    return_attention=False,
    freeze_visual=False,
)


def tiny_cfg(data_root, runs, **kw) -> Config:
    return preset_config('synthetic').replace(
        **{**TINY, 'data_root': str(data_root), 'runs': str(runs), **kw}
    )


def flags(cfg: Config) -> list:
    "The command line that gives `cfg` (only the values that differ from the synthetic preset)."
    base, out = preset_config('synthetic'), []
    for sec in ('data', 'model', 'optim', 'eval', 'run'):
        for k, v in vars(getattr(cfg, sec)).items():
            if v == getattr(getattr(base, sec), k):
                continue
            flag = '--' + k.replace('_', '-')
            out += [flag if v else '--no-' + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return out


def run_cli(args, module='mdmf.train', cwd=None, **kw):
    return subprocess.run(
        [sys.executable, '-m', module, *args], env=ENV, cwd=cwd, capture_output=True, text=True, **kw
    )


def metrics_of(folder):
    m = json.loads((Path(folder) / 'metrics.json').read_text())
    return {k: m[k] for k in ('test', 'val', 'train')}


def test_tiny_run_writes_run_folder(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path / 'runs')
    metrics = train(cfg, quiet=True)
    folder = tmp_path / 'runs' / 'synthetic-mdmf-1shot'
    for name in ('config.json', 'metrics.json', 'log.jsonl', 'train.log', 'best.pt', 'last.pt'):
        assert (folder / name).is_file(), name
    assert not (folder / '.lock').exists(), 'the lock is released when the run ends'
    saved = json.loads((folder / 'metrics.json').read_text())
    assert saved == json.loads(json.dumps(metrics))
    for a, b in METRIC_KEYS:
        assert b in saved[a], f'{a}.{b}'
    assert saved['test']['episodes'] == 12 and saved['train']['episodes'] == 6
    assert 0 <= saved['test']['accuracy'] <= 100 and saved['test']['ci95'] > 0
    kinds = [json.loads(l)['kind'] for l in (folder / 'log.jsonl').read_text().splitlines()]
    assert kinds.count('val') == 2 and kinds.count('train') == 3 and kinds[-1] == 'test'
    assert config_from_dict(json.loads((folder / 'config.json').read_text())) == cfg
    # python -m mdmf.evaluate reproduces the run's test metrics from best.pt
    r = run_cli(
        ['--checkpoint', str(folder / 'best.pt'), '--no-progress', '--out', str(tmp_path / 'ev.json')],
        module='mdmf.evaluate',
    )
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / 'ev.json').read_text())
    assert ev['test']['accuracy'] == saved['test']['accuracy'] and ev['test']['ci95'] == saved['test']['ci95']
    assert f"{saved['test']['accuracy']:.2f} ± {saved['test']['ci95']:.2f} %" in r.stdout
    # a small split: the interval's limits are stated
    assert 'only' in r.stdout and 'distinct videos' in r.stdout


def test_kill_and_resume_gives_same_metrics(data_root, tmp_path):
    # accum 3 and checkpoints every 2 episodes: the kill lands inside an accumulation window
    cfg = tiny_cfg(
        data_root,
        tmp_path / 'a',
        train_episodes=12,
        accum=3,
        val_every=6,
        checkpoint_every=2,
        shot=2,
        gtce_dropout=0.3,
        name='run',
    )
    args = flags(cfg)
    proc = subprocess.Popen(
        [sys.executable, '-m', 'mdmf.train', *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    last = tmp_path / 'a' / 'run' / 'last.pt'
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert last.exists() and not (tmp_path / 'a' / 'run' / 'metrics.json').exists(), (
        'the run was not stopped midway'
    )
    killed_at = load_checkpoint(last)['state']['episode']
    assert 0 < killed_at < 12
    assert (tmp_path / 'a' / 'run' / '.lock').exists(), 'a killed run leaves its lock'
    r = run_cli(args + ['--resume'])  # the dead process's lock is taken over
    assert r.returncode == 0, r.stderr
    assert 'resumed from' in r.stdout
    whole = train(cfg.replace(runs=str(tmp_path / 'b')), quiet=True)
    assert metrics_of(tmp_path / 'a' / 'run') == metrics_of(tmp_path / 'b' / 'run')
    a = load_checkpoint(tmp_path / 'a' / 'run' / 'last.pt')['model']
    b = load_checkpoint(tmp_path / 'b' / 'run' / 'last.pt')['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole['train']['episodes'] == 12


def nan_from(k: int):
    "`Trainer.episode_loss` with the model's loss made NaN from episode `k` on (patched in by the tests only)."
    import dataclasses

    from mdmf.train import Trainer

    episode_loss = Trainer.episode_loss

    def patched(self, i, batch, scale=1.0):
        forward = self.net.forward  # the module DDP wraps: its gradient hooks stay
        nan = lambda *a, **kw: dataclasses.replace(out := forward(*a, **kw), loss=out.loss * float('nan'))
        if i >= k:
            self.net.forward = nan
        try:
            return episode_loss(self, i, batch, scale)
        finally:
            self.net.__dict__.pop('forward', None)

    return patched


NAN_AT_5 = (
    "import sys, mdmf.train as t, tests.test_train as h; t.Trainer.episode_loss = h.nan_from(5); "
    "t.cli(t.main, sys.argv[1:])"
)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, train_episodes=10, accum=2, checkpoint_every=2, name='nan')
    r = subprocess.run([sys.executable, '-c', NAN_AT_5, *flags(cfg)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert 'the training loss became nan by episode 5' in r.stderr and 'last good checkpoint' in r.stderr
    ck = load_checkpoint(tmp_path / 'nan' / 'last.pt')
    assert ck['state']['episode'] == 4
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert not (tmp_path / 'nan' / 'metrics.json').exists()


@pytest.mark.parametrize('model', ['mdmf', 'clip-fsar'])
def test_cached_and_uncached_evaluation_agree(data_root, tmp_path, model):
    cfg = tiny_cfg(data_root, tmp_path, model=model)
    torch.manual_seed(0)
    net = build_model(cfg.model)
    split = load_data(cfg.data, 'val')
    cached = evaluate(net, cfg, 'val', 12, data=split, cache=True)
    uncached = evaluate(net, cfg, 'val', 12, data=split, cache=False)
    assert (cached.predictions == uncached.predictions).all()
    assert cached.accuracy == uncached.accuracy and cached.ci95 == uncached.ci95


def _ddp_worker(rank, world, port, cfg_values, out):
    os.environ.update(
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_values)
    metrics, trainer = train(cfg, quiet=True, return_trainer=True)
    torch.save(
        dict(
            final=trainer.checkpoint()['model'],
            tested=trainer._weights(),
            predictions=trainer.test_result.predictions,
            metrics=metrics,
            folder=str(trainer.folder),
        ),
        Path(out) / f'rank{rank}.pt',
    )
    torch.distributed.destroy_process_group()


def test_two_process_ddp_on_cpu(data_root, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    cfg = tiny_cfg(data_root, tmp_path / 'runs', train_episodes=8, accum=4, val_every=4, test_episodes=11)
    (tmp_path / 'runs' / cfg.run_name).mkdir(parents=True)
    # an earlier run: rank 0 picks a new folder
    (tmp_path / 'runs' / cfg.run_name / 'metrics.json').write_text('{}')
    mp.spawn(_ddp_worker, args=(2, port, config_to_dict(cfg), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in (0, 1))
    assert r0['folder'] == r1['folder'] and r0['folder'].endswith('-2'), (
        'every rank writes where rank 0 decided'
    )
    for k in r0['final']:
        assert torch.equal(r0['final'][k], r1['final'][k]), k
    torch.manual_seed(cfg.run.seed)
    init = build_model(cfg.model).state_dict()
    assert any(not torch.equal(init[k], r0['final'][k]) for k in init), 'training changed nothing'
    assert r0['metrics']['train'] == r1['metrics']['train'] and r0['metrics']['train']['steps'] == 2
    # sharded evaluation (episodes split over the 2 ranks) equals one process evaluating alone
    net = build_model(cfg.model)
    net.load_state_dict(r0['tested'])
    alone = evaluate(net, cfg, 'test', 11, rt=Runtime())
    assert (alone.predictions == r0['predictions']).all() and (alone.predictions == r1['predictions']).all()
    assert alone.accuracy == r0['metrics']['test']['accuracy']


def test_config_precedence(tmp_path):
    toml = tmp_path / 'run.toml'
    toml.write_text('lr = 0.5\nshot = 3\ntrain-episodes = 77\n[model]\nviews = "gtc"\nffn_dim = 128\n')
    cfg = resolve_config(['--config', str(toml), '--lr', '0.25', '--ffn-dim', '32'])
    assert (cfg.optim.lr, cfg.data.shot, cfg.optim.train_episodes) == (0.25, 3, 77)  # flag > file > preset
    assert (cfg.model.views, cfg.model.ffn_dim) == ('gtc', 32)
    assert cfg.optim.accum == preset_config().optim.accum and cfg.model.backbone == 'tiny-pretrained'
    js = tmp_path / 'run.json'
    js.write_text(json.dumps({'preset': 'ssv2_small', 'views': 'ltc', 'no_such_key': 1}))
    with pytest.raises(ValueError, match='no_such_key'):
        resolve_config(['--config', str(js)])
    js.write_text(json.dumps({'preset': 'ssv2_small', 'views': 'ltc'}))
    cfg = resolve_config(['--config', str(js), '--shot', '1'])
    assert (
        cfg.preset,
        cfg.data.flip,
        cfg.optim.lr,
        cfg.optim.accum,
        cfg.eval.test_episodes,
        cfg.data.short_side,
    ) == ('ssv2_small', False, 1e-5, 16, 10000, 256)
    assert (cfg.model.views, cfg.data.shot, cfg.data.train_query, cfg.data.test_query, cfg.model.frames) == (
        'ltc',
        1,
        5,
        1,
        8,
    )
    cfg = resolve_config(['--preset', 'hmdb51', '--no-flip', '--backbone', 'ViT-B/16'])
    assert cfg.data.flip is False and cfg.model.backbone == 'ViT-B/16' and cfg.data.data_root == 'data/hmdb51'
    assert resolve_config(['--preset', 'kinetics100']).data.flip is True
    with pytest.raises(SystemExit):
        resolve_config(['--flip', 'False'])  # switches take no value


def test_help_lists_every_flag():
    r = run_cli(['--help'])
    assert r.returncode == 0
    for action in config_parser()._actions:
        for opt in action.option_strings:
            assert opt in r.stdout, opt
    for opt in (
        '--model',
        '--shot',
        '--backbone',
        '--data-root',
        '--config',
        '--resume',
        '--overwrite',
        '--no-flip',
        '--views',
        '--distill-condition',
        '--test-episodes',
        '--debug',
    ):
        assert opt in r.stdout
    assert '--inject-nan-at' not in r.stdout  # test aids are not flags
    r = run_cli(['--help'], module='mdmf.evaluate')
    assert r.returncode == 0
    for opt in (
        '--checkpoint',
        '--episodes',
        '--split',
        '--data-root',
        '--drop-missing',
        '--labels-json',
        '--device',
    ):
        assert opt in r.stdout, opt


def test_user_errors_are_one_or_two_lines(tmp_path):
    "Known user errors: a short message naming the culprit, exit status 2, no traceback (unless --debug)."
    cases = [
        (
            ['--data-root', str(tmp_path / 'nowhere'), '--dataset', 'hmdb51', '--runs', str(tmp_path)],
            'nowhere',
        ),
        (['--resume', '--name', 'never-ran', '--runs', str(tmp_path)], 'never-ran'),
        (['--config', str(tmp_path / 'missing.toml')], 'missing.toml'),
    ]
    for args, culprit in cases:
        r = run_cli(args)
        assert r.returncode == 2, (args, r.stderr)
        assert 'Traceback' not in r.stderr and culprit in r.stderr, r.stderr
        assert 1 <= len(r.stderr.strip().splitlines()) <= 3, r.stderr
    r = run_cli(['--checkpoint', str(tmp_path / 'nothing.pt')], module='mdmf.evaluate')
    assert r.returncode == 2 and 'nothing.pt' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = run_cli(cases[1][0] + ['--debug'])
    assert r.returncode != 0 and 'Traceback' in r.stderr
    r = run_cli(['--views', 'sideways'])
    assert r.returncode == 2 and 'sideways' in r.stderr  # argparse's own message for a bad choice


def test_frozen_run_uses_cached_features_and_matches_the_plain_path(data_root, tmp_path):
    "--freeze-visual trains on cached features; the selected weights test the same through the uncached path."
    from mdmf.runs import load_model

    cfg = tiny_cfg(data_root, tmp_path, freeze_visual=True, train_draws=2, name='frozen')
    metrics, trainer = train(cfg, quiet=True, return_trainer=True)
    assert trainer.cached
    model, saved = load_model(tmp_path / 'frozen')
    r = evaluate(model, saved, 'test', saved.eval.test_episodes, cache=False)
    assert (r.predictions == trainer.test_result.predictions).all()
    assert r.accuracy == metrics['test']['accuracy']
    resumed = train(cfg.replace(resume=True, train_episodes=8), quiet=True)  # a frozen run resumes too
    assert resumed['train']['episodes'] == 6  # --resume keeps the run's own settings


def _after_steps(ticks) -> list:
    return [(t.window, t.done, t.log, t.validate, t.checkpoint) for t in ticks if t.step]


def test_schedule_of_the_resumed_run_is_the_rest_of_the_whole_one():
    "The kill-and-resume run's schedule (accum 3, checkpoints every 2, val every 6): any resume goes on as the whole run."
    whole = train_schedule(0, 12, 3, val_every=6, checkpoint_every=2)
    assert [t.episode for t in whole] == list(range(12))
    assert [t.episode for t in whole if t.step] == [2, 5, 8, 11]
    assert [t.done for t in whole if t.validate] == [6, 12]
    assert [t.done for t in whole if t.checkpoint] == [2, 4, 6, 8, 10, 12]  # 2 and 4 inside a window
    assert [t.done for t in whole] == list(range(1, 13))
    for start in range(13):
        assert train_schedule(start, 12, 3, val_every=6, checkpoint_every=2) == whole[start:], start
    # the NaN run: the checkpoint at 4 is the last before episode 5
    nan = train_schedule(0, 10, 2, checkpoint_every=2)
    assert [t.done for t in nan if t.checkpoint and t.episode < 5] == [2, 4]


def test_schedule_of_two_processes():
    "The two-process runs: every episode trained once, one step per window each, the same rounds on every rank."
    ranks = [train_schedule(0, 8, 4, r, 2, val_every=4) for r in (0, 1)]  # test_two_process_ddp_on_cpu
    assert sorted(t.episode for ts in ranks for t in ts) == list(range(8))
    assert (
        _after_steps(ranks[0])
        == _after_steps(ranks[1])
        == [((0, 4), 4, False, True, False), ((4, 8), 8, True, True, False)]
    )
    assert [t.done for t in ranks[0]] == [0, 4, 4, 8]  # episodes done count whole windows
    # accum 3 over 2 processes
    ranks = [train_schedule(0, 6, 3, r, 2, log_every=6, checkpoint_every=3) for r in (0, 1)]
    assert [[t.episode for t in ts] for ts in ranks] == [[0, 2, 3, 5], [1, 4]]
    assert (
        _after_steps(ranks[0])
        == _after_steps(ranks[1])
        == [((0, 3), 3, False, False, True), ((3, 6), 6, True, True, True)]
    )
    for r in (0, 1):  # resumed at the checkpoint at 3
        assert train_schedule(3, 6, 3, r, 2, log_every=6, checkpoint_every=3) == [
            t for t in ranks[r] if t.episode >= 3
        ]


def test_fit_carries_out_its_schedule(data_root, tmp_path, monkeypatch):
    "What `fit` does after each episode is what `train_schedule` says (seen by patching the trainer's methods)."
    cfg = tiny_cfg(
        data_root, tmp_path, train_episodes=7, accum=3, val_every=3, log_every=2, checkpoint_every=2
    )
    seen, trainer = [], Trainer(cfg, folder=tmp_path / 'run', quiet=True)
    for name in ('step', 'validate', 'save_last', '_log_train'):
        method = getattr(Trainer, name)
        monkeypatch.setattr(
            Trainer,
            name,
            lambda self, *a, _m=method, _n=name, **kw: (
                seen.append((_n, self.state['episode'])),
                _m(self, *a, **kw),
            )[1],
        )
    trainer.fit()
    want = []
    for t in train_schedule(0, 7, 3, log_every=2, val_every=3, checkpoint_every=2):
        want += [('step', t.episode)] if t.step else []  # the episodes done before it steps
        want += [('_log_train', t.done)] if t.log else []
        want += [('validate', t.done)] if t.validate else []
        want += [('save_last', t.done)] if t.checkpoint else []
    assert seen == want + [('save_last', 7)] and trainer.state['episode'] == 7  # and the final checkpoint
