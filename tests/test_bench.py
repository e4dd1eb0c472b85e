"""The benchmark's results: keys and types of the JSON, fast OTAM equal to the loop, cached predictions equal to
uncached ones, and the command line on a reduced configuration. No timing asserts: speed is what the benchmark reports."""
import json
import numbers
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdmf.bench import PARTS, bench_otam, format_table, otam_reference, run_bench
from mdmf.otam import otam

ROOT = Path(__file__).resolve().parents[1]


def _number_or_none(x):
    return x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool))


@pytest.fixture(scope='module')
def quick():
    return run_bench('tiny', 'cpu', quick=True, log=lambda m: None)


def test_reference_equals_fast_otam():
    for shape in [(8, 8), (25, 5, 8, 8), (2, 3, 5, 7)]:
        c1 = (2 * torch.rand(*shape, dtype=torch.float64)).requires_grad_()
        c2 = c1.detach().clone().requires_grad_()
        slow, fast = otam_reference(c1), otam(c2)
        torch.testing.assert_close(slow, fast, rtol=1e-9, atol=1e-9)
        w = torch.randn_like(slow)
        (slow * w).sum().backward(); (fast * w).sum().backward()
        torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-9, atol=1e-9)


def test_reference_otam_can_tell_orders_apart():
    eye = 1 - torch.eye(6)
    assert otam_reference(eye, lam=1e-3).abs() < 1e-2   # the diagonal path is free
    assert otam_reference(eye.flip(-1), lam=1e-3) > 1.5  # reversed order pays


def test_bench_otam_reports_equal_values_and_gradients():
    r = bench_otam(repeats=1, queries=4, way=3)
    assert r['equal'] and r['max_abs_diff'] < 1e-4 and r['grad_max_abs_diff'] < 1e-4
    assert r['shape'] == [2, 4, 3, 8, 8]
    assert all(_number_or_none(r[k]) for k in ('reference_ms', 'fast_ms', 'speedup'))


def test_json_keys_and_types(quick):
    r = json.loads(json.dumps(quick))  # what --out writes
    assert isinstance(r['device'], str) and r['device']
    for part, key in [('otam', 'speedup'), ('eval', 'cache_speedup'), ('train', 'speedup')]:
        assert isinstance(r[part][key], float), (part, key)
    for k in ('reference_ms', 'fast_ms', 'max_abs_diff', 'grad_max_abs_diff'): assert _number_or_none(r['otam'][k])
    assert r['otam']['reference_times_ms'] and r['otam']['fast_times_ms']
    e = r['eval']
    for k in ('cached_ms', 'uncached_ms', 'encode_s', 'tenk_cached_s', 'tenk_uncached_s', 'cache_speedup_10k',
              'accuracy_cached', 'accuracy_uncached'):
        assert _number_or_none(e[k]) and e[k] is not None, k
    t = r['train']
    for path in ('eager', 'fast'):
        for k in ('episodes_per_s', 'backbone_tflops', 'peak_memory_gb', 'rss_delta_mb', 'peak_fraction'):
            assert _number_or_none(t[path][k]), (path, k)
        assert t[path]['peak_memory_gb'] is None  # CPU: no CUDA peak
    assert t['eager']['dtype'] == 'float32'
    assert t['frames_per_episode'] == t['way'] * (t['shot'] + t['query']) * 8
    d = r['data']
    for kind in ('video', 'frames'):
        assert d[kind] and all(_number_or_none(w['clips_per_s']) and w['clips_per_s'] > 0 for w in d[kind])
    assert d['keeps_up'] is None or isinstance(d['keeps_up'], bool)
    assert 'otam' in format_table(quick) and 'eval' in format_table(quick)


def test_cached_equals_uncached_predictions(quick):
    e = quick['eval']
    assert e['same_predictions'] and e['prediction_agreement'] == 1.0
    assert e['accuracy_cached'] == e['accuracy_uncached']


def test_unmeasured_parts_are_null():
    r = run_bench('tiny', 'cpu', parts=['otam'], quick=True, log=lambda m: None)
    assert isinstance(r['otam']['speedup'], float)
    assert r['eval']['cache_speedup'] is None and r['train']['speedup'] is None and r['data']['keeps_up'] is None
    with pytest.raises(ValueError): run_bench('tiny', 'cpu', parts=['nope'], log=lambda m: None)


def test_cli_reduced_run(tmp_path):
    out = tmp_path / 'bench.json'
    p = subprocess.run([sys.executable, '-m', 'mdmf.bench', '--size', 'tiny', '--device', 'cpu', '--quick',
                        '--parts', 'otam,train', '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'mdmf benchmark' in p.stdout and 'otam' in p.stdout
    r = json.loads(out.read_text())
    assert set(PARTS) <= set(r) and isinstance(r['otam']['speedup'], float) and isinstance(r['train']['speedup'], float)
    assert r['eval']['cache_speedup'] is None
