"""Training and evaluation behaviour that the train notebook cannot show compactly.

A tiny synthetic dataset is made once per session; every run here is a few episodes of the tiny backbone.
"""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from mdmf.evaluate import Runtime, evaluate, load_eval_split
from mdmf.model import build_model
from mdmf.synthetic import make_synthetic
from mdmf.train import PRESETS, TrainConfig, build_parser, config_from_values, resolve_config, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
       'OMP_NUM_THREADS': '1'}
METRIC_KEYS = [('test', 'accuracy'), ('test', 'ci95'), ('test', 'episodes'), ('val', 'accuracy'),
               ('train', 'episodes'), ('timings', 'total_s')]


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    make_synthetic(root, videos_per_class=12, frames=8, size=32, workers=1)
    return root


TINY = dict(backbone='tiny-vit', short_side=64, shot=1, train_query=1, train_episodes=6, accum=2, val_every=3, val_episodes=10,
            test_episodes=12, checkpoint_every=2, log_every=2, threads=1, workers=0, progress=False,
            ffn_dim=64, heads=2, return_attention=False)


def tiny_cfg(data_root, runs, **kw) -> TrainConfig:
    return config_from_values({**PRESETS['synthetic'], **TINY, 'data_root': str(data_root), 'runs': str(runs), **kw})


def flags(cfg: TrainConfig) -> list:
    "The command line that gives `cfg` (only the values that differ from the synthetic preset)."
    base, now, out = asdict(config_from_values(PRESETS['synthetic'])), asdict(cfg), []
    vals = {**{k: v for k, v in now.items() if k != 'mdmf'}, **now['mdmf']}
    ref = {**{k: v for k, v in base.items() if k != 'mdmf'}, **base['mdmf']}
    for k, v in vals.items():
        if k == 'preset' or v == ref[k]: continue
        flag = '--' + k.replace('_', '-')
        out += [flag if v else '--no-' + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return out


def run_cli(args, module='mdmf.train', cwd=None, **kw):
    return subprocess.run([sys.executable, '-m', module, *args], env=ENV, cwd=cwd, capture_output=True,
                          text=True, **kw)


def metrics_of(folder):
    m = json.loads((Path(folder) / 'metrics.json').read_text())
    return {k: m[k] for k in ('test', 'val', 'train')}


def test_tiny_run_writes_run_folder(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path / 'runs')
    metrics = train(cfg, quiet=True)
    folder = tmp_path / 'runs' / 'synthetic-mdmf-1shot'
    for name in ('config.json', 'metrics.json', 'log.jsonl', 'train.log', 'best.pt', 'last.pt'):
        assert (folder / name).is_file(), name
    saved = json.loads((folder / 'metrics.json').read_text())
    assert saved == json.loads(json.dumps(metrics))
    for a, b in METRIC_KEYS: assert b in saved[a], f'{a}.{b}'
    assert saved['test']['episodes'] == 12 and saved['train']['episodes'] == 6
    assert 0 <= saved['test']['accuracy'] <= 100 and saved['test']['ci95'] > 0
    kinds = [json.loads(l)['kind'] for l in (folder / 'log.jsonl').read_text().splitlines()]
    assert kinds.count('val') == 2 and kinds.count('train') == 3 and kinds[-1] == 'test'
    assert config_from_values(json.loads((folder / 'config.json').read_text())) == cfg
    # python -m mdmf.evaluate reproduces the run's test metrics from best.pt
    r = run_cli(['--checkpoint', str(folder / 'best.pt'), '--no-progress', '--out', str(tmp_path / 'ev.json')],
                module='mdmf.evaluate')
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / 'ev.json').read_text())
    assert ev['test']['accuracy'] == saved['test']['accuracy'] and ev['test']['ci95'] == saved['test']['ci95']
    assert f"{saved['test']['accuracy']:.2f} ± {saved['test']['ci95']:.2f} %" in r.stdout


def test_kill_and_resume_gives_same_metrics(data_root, tmp_path):
    # accum 3 and checkpoints every 2 episodes: the kill lands inside an accumulation window
    cfg = tiny_cfg(data_root, tmp_path / 'a', train_episodes=12, accum=3, val_every=6, checkpoint_every=2,
                   shot=2, gtce_dropout=0.3, name='run')
    args = flags(cfg)
    proc = subprocess.Popen([sys.executable, '-m', 'mdmf.train', *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    last = tmp_path / 'a' / 'run' / 'last.pt'
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None: time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert last.exists() and not (tmp_path / 'a' / 'run' / 'metrics.json').exists(), 'the run was not stopped midway'
    killed_at = torch.load(last, weights_only=False)['state']['episode']
    assert 0 < killed_at < 12
    r = run_cli(args + ['--resume'])
    assert r.returncode == 0, r.stderr
    assert 'resumed from' in r.stdout
    whole = train(replace(cfg, runs=str(tmp_path / 'b')), quiet=True)
    assert metrics_of(tmp_path / 'a' / 'run') == metrics_of(tmp_path / 'b' / 'run')
    a = torch.load(tmp_path / 'a' / 'run' / 'last.pt', weights_only=False)['model']
    b = torch.load(tmp_path / 'b' / 'run' / 'last.pt', weights_only=False)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole['train']['episodes'] == 12


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, train_episodes=10, accum=2, checkpoint_every=2, inject_nan_at=5, name='nan')
    r = run_cli(flags(cfg))
    assert r.returncode == 3, r.stderr
    assert 'the training loss became nan by episode 5' in r.stderr and 'last good checkpoint' in r.stderr
    ck = torch.load(tmp_path / 'nan' / 'last.pt', weights_only=False)
    assert ck['state']['episode'] == 4
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert not (tmp_path / 'nan' / 'metrics.json').exists()


@pytest.mark.parametrize('model', ['mdmf', 'clip-fsar'])
def test_cached_and_uncached_evaluation_agree(data_root, tmp_path, model):
    cfg = tiny_cfg(data_root, tmp_path, model=model)
    torch.manual_seed(0)
    net = build_model(cfg.mdmf)
    split = load_eval_split(cfg, 'val')
    cached = evaluate(net, cfg, 'val', 12, data=split, cache=True)
    uncached = evaluate(net, cfg, 'val', 12, data=split, cache=False)
    assert (cached.predictions == uncached.predictions).all()
    assert cached.accuracy == uncached.accuracy and cached.ci95 == uncached.ci95


def _ddp_worker(rank, world, port, cfg_values, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = config_from_values(cfg_values)
    metrics, trainer = train(cfg, quiet=True, return_trainer=True)
    torch.save(dict(final=trainer.checkpoint()['model'], tested=trainer._weights(),
                    predictions=trainer.test_result.predictions, metrics=metrics), Path(out) / f'rank{rank}.pt')
    torch.distributed.destroy_process_group()


def test_two_process_ddp_on_cpu(data_root, tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    cfg = tiny_cfg(data_root, tmp_path / 'runs', train_episodes=8, accum=4, val_every=4, test_episodes=11)
    mp.spawn(_ddp_worker, args=(2, port, asdict(cfg), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in (0, 1))
    for k in r0['final']: assert torch.equal(r0['final'][k], r1['final'][k]), k
    torch.manual_seed(cfg.seed)
    init = build_model(cfg.mdmf).state_dict()
    assert any(not torch.equal(init[k], r0['final'][k]) for k in init), 'training changed nothing'
    assert r0['metrics']['train'] == r1['metrics']['train'] and r0['metrics']['train']['steps'] == 2
    # sharded evaluation (episodes split over the 2 ranks) equals one process evaluating alone
    net = build_model(cfg.mdmf)
    net.load_state_dict(r0['tested'])
    alone = evaluate(net, cfg, 'test', 11, rt=Runtime())
    assert (alone.predictions == r0['predictions']).all() and (alone.predictions == r1['predictions']).all()
    assert alone.accuracy == r0['metrics']['test']['accuracy']


def test_config_precedence(tmp_path):
    toml = tmp_path / 'run.toml'
    toml.write_text('lr = 0.5\nshot = 3\ntrain-episodes = 77\n[mdmf]\nviews = "gtc"\nffn_dim = 128\n')
    cfg = resolve_config(['--config', str(toml), '--lr', '0.25', '--ffn-dim', '32'])
    assert (cfg.lr, cfg.shot, cfg.train_episodes) == (0.25, 3, 77)  # flag > file > preset
    assert (cfg.mdmf.views, cfg.mdmf.ffn_dim) == ('gtc', 32)
    assert cfg.accum == PRESETS['synthetic']['accum'] and cfg.mdmf.backbone == PRESETS['synthetic']['backbone']
    js = tmp_path / 'run.json'
    js.write_text(json.dumps({'preset': 'ssv2_small', 'views': 'ltc', 'no_such_key': 1}))
    with pytest.raises(ValueError, match='no_such_key'): resolve_config(['--config', str(js)])
    js.write_text(json.dumps({'preset': 'ssv2_small', 'views': 'ltc'}))
    cfg = resolve_config(['--config', str(js), '--shot', '1'])
    assert (cfg.preset, cfg.flip, cfg.lr, cfg.accum, cfg.test_episodes, cfg.image_size, cfg.short_side) == \
        ('ssv2_small', False, 1e-5, 16, 10000, 224, 256)
    assert (cfg.mdmf.views, cfg.shot, cfg.train_query, cfg.test_query, cfg.frames) == ('ltc', 1, 5, 1, 8)
    cfg = resolve_config(['--preset', 'hmdb51', '--no-flip', '--backbone', 'ViT-B/16'])
    assert cfg.flip is False and cfg.mdmf.backbone == 'ViT-B/16' and cfg.data_root == 'data/hmdb51'
    assert resolve_config(['--preset', 'kinetics100']).flip is True
    with pytest.raises(SystemExit): resolve_config(['--flip', 'False'])  # switches take no value


def test_help_lists_every_flag():
    r = run_cli(['--help'])
    assert r.returncode == 0
    for action in build_parser()._actions:
        for opt in action.option_strings: assert opt in r.stdout, opt
    for opt in ('--model', '--shot', '--backbone', '--data-root', '--config', '--resume', '--no-flip', '--views',
                '--distill-condition', '--test-episodes'):
        assert opt in r.stdout
    r = run_cli(['--help'], module='mdmf.evaluate')
    assert r.returncode == 0 and '--checkpoint' in r.stdout and '--episodes' in r.stdout and '--split' in r.stdout
