"""The benchmark's results: keys and types of the JSON, fast OTAM equal to the loop, cached predictions equal to
uncached ones, the training step being the trainer's, an honest float32 baseline, the memory table, and the command
line on a reduced configuration. No timing asserts: speed is what the benchmark reports."""

import json
import numbers
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from mdmf.bench import PARTS, SMALL, BenchOptions, format_table, run_bench
from mdmf.benchmarks import SIZES, bench_config, bench_frozen_step, bench_otam, train_path
from mdmf.config import RunConfig
from mdmf.core import BadInput
from mdmf.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]


def _number_or_none(x):
    return x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool))


@pytest.fixture(scope='module')
def small():
    return run_bench(BenchOptions(), RunConfig(device='cpu'), log=lambda m: None, sizes=SMALL)


def test_bench_otam_reports_equal_values_and_gradients():
    r = bench_otam(repeats=1, queries=4, way=3)
    assert r['equal'] and r['max_abs_diff'] < 1e-4 and r['grad_max_abs_diff'] < 1e-4
    assert r['shape'] == [2, 4, 3, 8, 8]
    assert all(_number_or_none(r[k]) for k in ('reference_ms', 'fast_ms', 'speedup'))


def test_json_keys_and_types(small):
    r = json.loads(json.dumps(small))  # what --out writes
    assert isinstance(r['device'], str) and r['device']
    # the run's defaults
    assert (r['small'], r['seed'], r['threads']) == (True, RunConfig().seed, RunConfig().threads)
    for part, key in [
        ('otam', 'speedup'),
        ('eval', 'cache_speedup'),
        ('train', 'speedup'),
        ('frozen', 'speedup'),
        ('frozen', 'step_speedup'),
    ]:
        assert isinstance(r[part][key], float), (part, key)
    for k in ('reference_ms', 'fast_ms', 'max_abs_diff', 'grad_max_abs_diff'):
        assert _number_or_none(r['otam'][k])
    e = r['eval']
    for k in (
        'cached_ms',
        'uncached_ms',
        'encode_s',
        'tenk_cached_s',
        'tenk_uncached_s',
        'cache_speedup_10k',
        'accuracy_cached',
        'accuracy_uncached',
    ):
        assert _number_or_none(e[k]) and e[k] is not None, k
    t = r['train']
    for path in ('eager', 'fast'):
        for k in ('episodes_per_s', 'backbone_tflops', 'peak_gib', 'predicted_peak_gib', 'peak_fraction'):
            assert _number_or_none(t[path][k]), (path, k)
        # CPU: live tensor bytes, no CUDA
        assert t[path]['peak_gib'] > 0 and t[path]['host_syncs_per_step'] is None
    assert (
        t['eager']['dtype'] == 'float32'
        and t['frames_per_episode'] == t['way'] * (t['shot'] + t['query']) * 8
    )
    d = r['data']
    for kind in ('video', 'frames'):
        assert d[kind] and all(_number_or_none(w['clips_per_s']) and w['clips_per_s'] > 0 for w in d[kind])
    assert d['keeps_up'] is None or isinstance(d['keeps_up'], bool)
    rows = r['memory']['rows']
    assert {(x['backbone'], x['precision']) for x in rows} >= {('RN50', 'float16'), ('ViT-B/16', 'bfloat16')}
    text = format_table(small)
    assert '(small sizes)' in text
    assert 'otam' in text and 'eval' in text and 'predicted peak GPU memory' in text and '16 GB' in text
    assert (
        'frozen' in text
        and r['frozen']['uncached']['episode_s'] > 0
        and r['frozen']['cached']['episode_s'] > 0
    )


def test_cached_equals_uncached_predictions(small):
    e = small['eval']
    assert e['same_predictions'] and e['prediction_agreement'] == 1.0
    assert e['accuracy_cached'] == e['accuracy_uncached']


def test_unmeasured_parts_are_null_and_unknown_parts_refused():
    r = run_bench(BenchOptions(parts='otam'), RunConfig(device='cpu'), log=lambda m: None, sizes=SMALL)
    assert isinstance(r['otam']['speedup'], float) and r['memory']['rows'] is None
    assert (
        r['eval']['cache_speedup'] is None and r['train']['speedup'] is None and r['data']['keeps_up'] is None
    )
    assert r['frozen']['speedup'] is None
    with pytest.raises(BadInput, match='unknown part nope'):
        run_bench(BenchOptions(parts='nope'), log=lambda m: None)


def test_training_step_is_the_trainers():
    "The bench times Trainer.episode_loss + Trainer.step (no copy of the step), once with the fast path off."
    from mdmf.train import Trainer

    calls = []
    real_loss, real_step = Trainer.episode_loss, Trainer.step

    def loss(self, *a, **k):
        calls.append('loss')
        return real_loss(self, *a, **k)

    def step(self, *a, **k):
        calls.append('step')
        return real_step(self, *a, **k)

    cfg = bench_config(SIZES['tiny'], way=2, shot=1, train_query=1)
    with mock.patch.object(Trainer, 'episode_loss', loss), mock.patch.object(Trainer, 'step', step):
        r = train_path(cfg, Runtime(), fast=False, repeats=1, steps=2, warmup=0)
    assert calls == ['loss', 'step'] * 3  # the measured first step, then one block of 2
    assert (r['dtype'], r['tf32'], r['cudnn_benchmark'], r['fused_adam'], r['channels_last']) == (
        'float32',
        False,
        False,
        False,
        False,
    )


def test_frozen_step_is_the_trainers():
    "The frozen-encoder benchmark times Trainer.episode_loss + Trainer.step too, on frames and on cached features."
    from mdmf.train import Trainer

    calls = []
    real_loss, real_step = Trainer.episode_loss, Trainer.step

    def loss(self, i, batch, *a, **k):
        calls.append(('loss', 'support_feats' in batch, self.net is not self.model))
        return real_loss(self, i, batch, *a, **k)

    def step(self, *a, **k):
        calls.append('step')
        return real_step(self, *a, **k)

    cfg = bench_config(SIZES['tiny'])
    with mock.patch.object(Trainer, 'episode_loss', loss), mock.patch.object(Trainer, 'step', step):
        r = bench_frozen_step(cfg, way=2, shot=1, query=1, repeats=1, warmup=0)
    # frames, then cached features
    assert calls == [('loss', False, False), 'step', ('loss', True, True), 'step']
    assert r['frames_per_episode'] == 2 * 2 * 8 and r['uncached_s'] > 0 and r['cached_s'] > 0


def test_baseline_is_ieee_float32_and_fast_path_on_cuda_runtime():
    "What each path asks of the runtime on a GPU, read without one: TF32 and cudnn.benchmark only on the fast path."
    from mdmf.runtime import backend_flags, tf32_enabled

    cuda = Runtime(torch.device('cuda', 0), amp_dtype=torch.float16)
    for fast, want in ((False, (False, False)), (True, (True, True))):
        # as train_path builds it
        rt = Runtime(cuda.device, amp_dtype=cuda.amp_dtype if fast else None, fast=fast)
        with backend_flags(rt):
            assert (tf32_enabled(), torch.backends.cudnn.benchmark) == want


def test_cli_small_run(tmp_path, monkeypatch, capsys):
    "The command line on the SMALL sizes (patched in: no flag shrinks a benchmark): its flags, the run's settings, --out."
    import functools

    from mdmf import bench

    monkeypatch.setattr(bench, 'run_bench', functools.partial(run_bench, sizes=SMALL))
    out = tmp_path / 'bench.json'
    bench.main(
        [
            '--size',
            'tiny',
            '--device',
            'cpu',
            '--threads',
            '1',
            '--seed',
            '7',
            '--parts',
            'memory,otam,train',
            '--worker-counts',
            '0',
            '--out',
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert (
        'mdmf benchmark' in text
        and 'otam' in text
        and 'predicted peak GPU memory' in text
        and '(small sizes)' in text
    )
    r = json.loads(out.read_text())
    assert (
        set(PARTS) <= set(r)
        and isinstance(r['otam']['speedup'], float)
        and isinstance(r['train']['speedup'], float)
    )
    assert r['eval']['cache_speedup'] is None and r['complete']
    assert (r['device_type'], r['threads'], r['seed'], r['small']) == ('cpu', 1, 7, True)
    for old in (
        '--quick',
        '--workers',
        '--activation-checkpoint',
    ):  # gone, or renamed: no flag named like a run setting
        p = subprocess.run(
            [sys.executable, '-m', 'mdmf.bench', old, '--parts', 'otam'],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2 and f'unrecognized arguments: {old}' in p.stderr, (old, p.stderr[-500:])
    bad = subprocess.run(
        [sys.executable, '-m', 'mdmf.bench', '--parts', 'nope'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        bad.returncode == 2
        and 'error: --parts: unknown part nope' in bad.stderr
        and 'Traceback' not in bad.stderr
    )


def test_default_run_times_the_train_command(tmp_path):
    "`--default-run` runs `python -m mdmf.train` with the flags after `--`, and reports wall time, accuracy, load, CPU."
    from mdmf.synthetic import make_synthetic

    root = make_synthetic(tmp_path / 'synthetic', videos_per_class=4, frames=8, size=32, workers=1)
    out = tmp_path / 'default.json'
    p = subprocess.run(
        [
            sys.executable,
            '-m',
            'mdmf.bench',
            '--default-run',
            '--out',
            str(out),
            '--',
            '--data-root',
            str(root),
            '--model',
            'frame-mean',
            '--shot',
            '1',
            '--val-episodes',
            '5',
            '--test-episodes',
            '20',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r['command'].startswith('python -m mdmf.train --data-root') and r['model'] == 'frame-mean'
    assert r['test']['episodes'] == 20 and r['wall_s'] > 0 and set(r['load']) == {'start', 'max', 'end'}
    assert {'model', 'cores', 'vector', 'limits', 'torch_capability'} <= set(r['cpu'])
    assert '| `python -m mdmf.train --data-root' in p.stdout and 'vector extensions' in p.stdout
    bad = subprocess.run(
        [sys.executable, '-m', 'mdmf.bench', '--', '--model', 'frame-mean'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and 'flags after -- are for --default-run' in bad.stderr
