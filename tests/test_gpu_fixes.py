"""The GPU path's crashes and slow paths that reading finds, each shown on a CPU with the fix it guards.

Resume onto another device (the meta device stands in for a GPU; channels-last Adam state), the run lock of a host
that is gone, the feature bank's precision and place, BatchNorm with activation checkpointing, normalisation
constants made once, float32 prototypes under autocast, TF32 flags that stay readable, per-precision peaks, the
process group's timeout and per-machine downloads (four gloo processes on two fake machines), DistributedDataParallel
without the unused-parameter search, loss sums and the progress bar of a resumed two-process run, and the benchmark's
JSON written as it goes.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import folder_run_config

from mdmf.config import RunConfig, config_from_dict, config_to_dict, preset_config
from mdmf.core import BadInput
from mdmf.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]


# ---- 1. --resume on a GPU: the checkpoint is read on the CPU and each tensor placed like its parameter ------------
def test_resume_reads_the_checkpoint_on_the_cpu(folder_videos, tmp_path):
    "Loading last.pt onto the run's device put the random states there; set_rng_state then called .numpy() on them."
    from mdmf.runs import load_checkpoint, set_rng_state
    from mdmf.train import Trainer, train

    cfg = folder_run_config(folder_videos, tmp_path)
    train(cfg, quiet=True)
    last = tmp_path / 'run' / 'last.pt'
    with pytest.raises(
        (RuntimeError, NotImplementedError, TypeError)
    ):  # what a GPU (here: meta) copy of the states does
        set_rng_state(load_checkpoint(last, 'meta')['rng'][0])
    t = Trainer(config_from_dict(load_checkpoint(last)['config']), quiet=True, folder=tmp_path / 'again')
    # a device the checkpoint must not be read onto
    t.rt = dataclasses.replace(t.rt, device=torch.device('meta'))
    t.load(last)
    assert t.state['episode'] == 4 and t._sums['loss'].device.type == 'meta'
    assert all(p.device.type == 'cpu' for p in t.params)


def test_resume_lays_adam_state_out_like_channels_last_weights(folder_videos, tmp_path):
    "A run saved with NCHW weights resumed where the ResNet is channels-last: Adam's moments take the weights' layout."
    from mdmf.runs import load_checkpoint
    from mdmf.train import Trainer, train

    cfg = folder_run_config(folder_videos, tmp_path, backbone='tiny-rn')
    train(cfg, quiet=True)
    last = tmp_path / 'run' / 'last.pt'
    t = Trainer(config_from_dict(load_checkpoint(last)['config']), quiet=True, folder=tmp_path / 'again')
    t.model.backbone.use_channels_last()  # what the fast path does on CUDA
    convs = [p for p in t.params if p.dim() == 4 and p.shape[-1] > 1]  # 1x1 kernels: both layouts alike
    assert convs and all(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs
    )
    t.load(last)
    for p in t.params:
        for k in ('exp_avg', 'exp_avg_sq'):
            assert t.opt.state[p][k].stride() == p.stride(), (k, p.shape)
    t.fit()  # and training goes on from there
    assert t.state['episode'] == 4


# ---- 2. a lock left by a machine that is gone ---------------------------------------------------------------------
def test_lock_of_another_host_is_taken_over_once_its_heartbeat_stops(tmp_path):
    from mdmf.runs import LOCK, STALE_AFTER, RunLock

    folder = tmp_path / 'run'
    folder.mkdir()
    with RunLock(folder):  # written by this host ...
        pass
    (folder / LOCK).write_text(json.dumps(dict(pid=os.getpid(), host='old-colab-vm', since='earlier')))
    with mock.patch('socket.gethostname', return_value='new-colab-vm'):  # ... read by a new VM
        with pytest.raises(
            BadInput,
            match=r'old-colab-vm since earlier \(its last heartbeat \d+ s ago\).*delete .*taken over',
        ):
            RunLock(folder).acquire()  # a live heartbeat: refused, with what to do
        old = time.time() - STALE_AFTER - 60
        os.utime(folder / LOCK, (old, old))  # the dead VM stopped touching its lock
        with RunLock(folder) as lock:
            assert lock.owner()['host'] == 'new-colab-vm'
    assert not (folder / LOCK).exists()


def test_the_holder_touches_its_lock(tmp_path, monkeypatch):
    import mdmf.runs as runs

    monkeypatch.setattr(runs, 'HEARTBEAT', 0.05)
    folder = tmp_path / 'run'
    folder.mkdir()
    with runs.RunLock(folder) as lock:
        old = time.time() - 3600
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert lock.age() < 60


# ---- 3. the feature bank: float16 on a GPU, pinned host memory when too large, float32 on a CPU --------------------
def test_feature_bank_precision_and_place(folder_videos, tmp_path):
    import mdmf.features as features
    from mdmf.data import freeze_split, load_data
    from mdmf.memory import CARDS, bank_bytes, bank_place
    from mdmf.model import build_model

    assert bank_bytes(67013, 8, 8, 1024) == 67013 * 8 * 8 * 1024 * 2  # SSv2-Full, RN50, float16: 8.2 GiB
    with mock.patch('mdmf.memory.usable_memory', return_value=CARDS['80 GB']):
        assert bank_place(bank_bytes(67013), 'cuda:0') == (torch.device('cuda', 0), torch.float16, False)
    assert bank_place(bank_bytes(67013), 'cuda:0', CARDS['16 GB']) == (
        torch.device('cpu'),
        torch.float16,
        True,
    )
    assert bank_place(bank_bytes(67013), 'cpu') == (torch.device('cpu'), torch.float32, False)
    cfg = folder_run_config(folder_videos, tmp_path, freeze_visual=True, train_draws=2)
    cfg = cfg.replace(data=freeze_split(cfg.data, tmp_path / 'splits'))
    split = load_data(cfg.data, 'train')
    torch.manual_seed(0)
    model = build_model(cfg.model)
    b32 = features.build_bank(model, split, cfg)
    assert b32.feats.dtype == torch.float32  # the CPU path as before
    with mock.patch.object(features, 'bank_place', return_value=(torch.device('cpu'), torch.float16, False)):
        b16 = features.build_bank(model, split, cfg)  # what a GPU keeps
    assert b16.feats.dtype == torch.float16 and b16.feats.shape == b32.feats.shape
    torch.testing.assert_close(b16.feats.float(), b32.feats, rtol=1e-3, atol=1e-3)
    v, d = torch.tensor([0, 1]), torch.tensor([1, 0])
    net = features.FeatureForward(model.eval())
    out16 = net(b16.take(v, d), torch.tensor([0, 1]), b16.take(v, d), ['a', 'b'])  # the heads get float32
    out32 = net(b32.take(v, d), torch.tensor([0, 1]), b32.take(v, d), ['a', 'b'])
    assert out16.logits.dtype == torch.float32
    torch.testing.assert_close(out16.logits, out32.logits, rtol=1e-2, atol=1e-2)


def test_memory_command_says_where_the_bank_lives():
    r = subprocess.run(
        [sys.executable, '-m', 'mdmf.memory'],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, 'PYTHONPATH': str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith('ssv2_full') and 'RN50' in l)
    assert (
        '67,013 videos x 8 x 8 x 1024 x 2 B' in line
        and '8.2 GiB' in line
        and '16 GB: host' in line
        and '80 GB: GPU' in line
    )


# ---- 4. BatchNorm that trains is never run in checkpointed chunks -----------------------------------------------
def test_training_batchnorm_sees_the_whole_batch_with_activation_checkpointing():
    from mdmf.backbone import Backbone, load_clip
    from mdmf.memory import MemoryPlan

    frames = torch.randint(0, 256, (2, 4, 3, 64, 64), dtype=torch.uint8)
    out = {}
    for ckpt in (False, True):
        bb = Backbone(
            load_clip('tiny-rn', seed=3), freeze_bn=False, activation_checkpoint=ckpt, checkpoint_chunk=2
        ).train()
        f = bb.encode_frames(frames)  # [2, 4, D], 8 frames in chunks of 2 when checkpointed
        f.sum().backward()
        stats = [b.clone() for n, b in bb.clip.visual.named_buffers() if 'running' in n]
        out[ckpt] = f.detach(), stats
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-6)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    bb = Backbone(load_clip('tiny-rn', seed=3), freeze_bn=False)
    plan = MemoryPlan(True, 2, message='memory plan: activation checkpointing on')
    plan.apply(bb)
    assert not bb.activation_checkpoint and not plan.activation_checkpoint and 'BatchNorm' in plan.message


# ---- 5. CLIP's normalisation constants and CLIP-FSAR's rows: no blocking host-to-device tensor per call -------------
def _counting_tensor():
    calls, real = [], torch.tensor

    def spy(*a, **k):
        calls.append(k.get('device'))
        return real(*a, **k)

    return calls, spy


def test_normalize_makes_its_constants_once_per_device_and_dtype():
    from mdmf.video import normalize, to_clip_input

    x = torch.rand(2, 3, 8, 8)
    normalize(x)  # the first call on this device and dtype makes them
    calls, spy = _counting_tensor()
    with mock.patch('torch.tensor', spy):
        for _ in range(3):
            y = normalize(x)
        to_clip_input(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    assert calls == []
    mean, std = (
        torch.tensor([0.48145466, 0.4578275, 0.40821073]),
        torch.tensor([0.26862954, 0.26130258, 0.27577711]),
    )
    torch.testing.assert_close(y, (x - mean.view(3, 1, 1)) / std.view(3, 1, 1), rtol=0, atol=0)


def test_clip_fsar_text_rows_are_not_made_on_the_device():
    from mdmf.model import build_model

    cfg = preset_config('synthetic').replace(model='clip-fsar', ffn_dim=32, heads=2)
    m = build_model(cfg.model)
    m.set_text_classes(['a', 'b', 'c'])
    tokens = m.class_tokens(['c', 'a'])
    calls, spy = _counting_tensor()
    with mock.patch('torch.tensor', spy):
        text, rows = m._text_targets(tokens, ['c', 'a'])
    assert rows.tolist() == [2, 0] and all(d is None for d in calls), calls


# ---- 6. prototypes stay float32 under autocast ----------------------------------------------------------------
def test_prototypes_float32_under_autocast():
    from mdmf.otam import prototypes

    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(10, 9, 64, generator=g), torch.arange(10) % 5
    with torch.autocast('cpu', dtype=torch.bfloat16):
        # einsum itself goes half
        assert torch.einsum('sc,sld->cld', torch.rand(10, 5), x).dtype == torch.bfloat16
        p = prototypes(x, labels, 5)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, prototypes(x, labels, 5), rtol=0, atol=1e-6)


# ---- 8. TF32 on, and every way of reading it still works ---------------------------------------------------------
def test_tf32_switch_leaves_both_apis_readable():
    from mdmf.runtime import set_tf32, tf32_enabled

    before = tf32_enabled()
    try:
        for on in (True, False):
            set_tf32(on)
            assert torch.backends.cuda.matmul.allow_tf32 == on and torch.backends.cudnn.allow_tf32 == on
            assert torch.get_float32_matmul_precision() == ('high' if on else 'highest')
            assert tf32_enabled() == on
    finally:
        set_tf32(before)


# ---- 9. peaks by precision; the A40 ----------------------------------------------------------------------------
def test_float32_rows_against_float32_peaks():
    from mdmf.runtime import peak_flops

    cuda = torch.device('cuda', 0)
    with mock.patch('torch.cuda.get_device_name', return_value='NVIDIA A40'):
        assert peak_flops(cuda, 'bfloat16')[0] == 150e12
        assert peak_flops(cuda, 'float32', tf32=True) == (74.8e12, 'table: A40 dense TF32')
        assert peak_flops(cuda, 'float32') == (37.4e12, 'table: A40 float32')
    with mock.patch('torch.cuda.get_device_name', return_value='NVIDIA H100 80GB HBM3'):
        assert peak_flops(cuda, 'float32', tf32=True)[0] == 495e12 and peak_flops(cuda)[0] == 989e12
    with mock.patch('torch.cuda.get_device_name', return_value='Tesla T4'):
        assert peak_flops(cuda, 'float32', tf32=True)[0] is None  # no TF32 on a T4


def test_bench_json_is_written_as_each_part_finishes(tmp_path):
    "A benchmark stopped by a time-out keeps the parts and training rows that finished."
    from mdmf import bench, benchmarks

    snaps = []
    with (
        mock.patch.object(bench, 'bench_otam', return_value=dict(speedup=2.0)),
        mock.patch.object(
            benchmarks,
            '_path',
            side_effect=lambda *a, **k: dict(episodes_per_s=1.0, dtype='float32', tf32=False),
        ),
    ):
        r = bench.run_bench(
            bench.BenchOptions(size='tiny', parts='otam,train'),
            RunConfig(device='cpu'),
            sizes=bench.SMALL,
            log=lambda m: None,
            on_part=lambda res: snaps.append(json.loads(json.dumps(res))),
        )
    # otam written alone
    assert snaps[0]['otam'] == dict(speedup=2.0) and snaps[0]['train'] == dict(speedup=None)
    assert snaps[1]['train']['partial'] and set(snaps[1]['train']) == {'eager', 'partial'}  # then row by row
    assert set(snaps[2]['train']) == {'eager', 'fast', 'partial'}
    assert 'partial' not in snaps[-1]['train'] and r['train']['eager']['peak_source'].startswith(
        'measured float32'
    )
    out = tmp_path / 'b.json'
    with mock.patch.object(
        bench, 'run_bench', side_effect=lambda o, run, log, on_part, **k: (on_part(dict(otam=1)), 1 / 0)
    ):
        with pytest.raises(ZeroDivisionError):
            bench.main(['--out', str(out)])
    assert json.loads(out.read_text()) == dict(otam=1, complete=False)  # what a killed run leaves


# ---- 7. the process group: a long timeout; every machine's first process downloads first -------------------------
def test_process_group_waits_an_hour_for_a_download():
    from mdmf.runtime import DIST_TIMEOUT, init_runtime

    env = dict(WORLD_SIZE='2', RANK='1', LOCAL_RANK='0')
    with (
        mock.patch.dict(os.environ, env),
        mock.patch('torch.distributed.is_initialized', return_value=False),
        mock.patch('torch.distributed.init_process_group') as init,
    ):
        init_runtime('cpu')
    init.assert_called_once_with('gloo', timeout=DIST_TIMEOUT)
    assert DIST_TIMEOUT.total_seconds() >= 3600


_NODE_SCRIPT = r'''
import os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
import mdmf.backbone as backbone
import mdmf.train as train
from mdmf.config import preset_config
from mdmf.runtime import init_runtime

tmp = Path(sys.argv[1])
def fake_load(name, device='cpu', jit=False, download_root=None):  # clip.load: download once per machine, then read
    path = Path(download_root) / f'{name}.pt'
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with open(tmp / 'downloads.txt', 'a') as f: f.write(os.environ['RANK'] + '\n')
        time.sleep(2)
        torch.save(backbone.load_clip('tiny-rn', seed=5).state_dict(), path)
    return backbone.clip_from_state_dict(torch.load(path, weights_only=True)), None
backbone.clip.load = fake_load
rt = init_runtime('cpu')
dist.barrier()
cfg = preset_config('synthetic').replace(backbone='RN50', ffn_dim=32, heads=2, progress=False, runs=str(tmp / 'runs'))
trainer = train.Trainer(cfg, rt, tmp / 'run', quiet=True)
print('find_unused', trainer.ddp.find_unused_parameters)
dist.destroy_process_group()
'''


def test_each_machine_downloads_once_before_its_other_processes(tmp_path):
    "Four gloo processes on two fake machines (own HOME each): local rank 0 of each downloads; nobody races."
    script = tmp_path / 'node.py'
    script.write_text(_NODE_SCRIPT)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(4):
        home = tmp_path / f'machine{r // 2}'
        home.mkdir(exist_ok=True)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={
                    **os.environ,
                    'HOME': str(home),
                    'MASTER_ADDR': '127.0.0.1',
                    'MASTER_PORT': str(port),
                    'WORLD_SIZE': '4',
                    'RANK': str(r),
                    'LOCAL_RANK': str(r % 2),
                    'OMP_NUM_THREADS': '1',
                    'PYTHONPATH': str(ROOT),
                },
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, '\n'.join(o[1][-1500:] for o in outs)
    assert sorted((tmp_path / 'downloads.txt').read_text().split()) == ['0', '2']  # one download per machine
    assert all('find_unused False' in o[0] for o in outs)  # every parameter is used: DDP does not search


def test_ddp_searches_for_unused_parameters_only_when_there_are_some(folder_videos, tmp_path):
    from mdmf.memory import unused_parameters
    from mdmf.model import build_model
    from mdmf.train import Trainer

    cfg = folder_run_config(folder_videos, tmp_path)
    m = build_model(cfg.model)
    assert unused_parameters(m, m, cfg, Runtime()) == []
    m.spare = torch.nn.Parameter(torch.zeros(3))  # a parameter no forward uses
    assert unused_parameters(m, m, cfg, Runtime()) == ['spare']
    assert all(p.grad is None for p in m.parameters())  # the trial leaves no gradient behind
    seen = []
    with (
        mock.patch('mdmf.train.DistributedDataParallel', side_effect=lambda net, **k: seen.append(k) or net),
        mock.patch('torch.distributed.barrier'),
    ):
        Trainer(cfg, Runtime(rank=0, world=2), tmp_path / 'ddp', quiet=True)
    assert seen and seen[0]['find_unused_parameters'] is False


# ---- 9. a resumed two-process run: every rank's own loss sums, and a progress bar that counts episodes -----------
class _Stop(Exception):
    pass


class _Bar:
    "tqdm stand-in: records the count after each update."

    log = []

    def __init__(self, total=None, initial=0, **k):
        self.n = initial

    def update(self, k=1):
        self.n += k
        if k:
            _Bar.log.append(self.n)

    def set_postfix(self, **k):
        pass

    def close(self):
        pass


def _resume_worker(rank, world, port, cfg_values, out):
    os.environ.update(
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import mdmf.train as t
    from mdmf.runs import read_log

    cfg = config_from_dict(cfg_values)
    with mock.patch.object(t, 'tqdm', _Bar):
        t.train(cfg.replace(name='whole'), quiet=True)
    bar = list(_Bar.log)
    episode_loss = t.Trainer.episode_loss

    def stop(
        self, i, batch, scale=1.0
    ):  # both ranks stop before their first collective after the checkpoint at episode 3
        if i >= 3 + self.rt.rank:
            raise _Stop
        return episode_loss(self, i, batch, scale)

    with mock.patch.object(t.Trainer, 'episode_loss', stop):
        try:
            t.train(cfg.replace(name='cut'), quiet=True)
        except _Stop:
            pass
    t.train(cfg.replace(name='cut', resume=True), quiet=True)
    if rank == 0:
        logs = {
            n: [e for e in read_log(Path(cfg.run.runs) / n) if e['kind'] == 'train'] for n in ('whole', 'cut')
        }
        torch.save(dict(bar=bar, logs=logs), Path(out) / 'rank0.pt')
    torch.distributed.destroy_process_group()


def test_two_process_resume_keeps_every_ranks_loss_sums_and_the_bar_counts_episodes(folder_videos, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    # accum 3 over 2 processes: rank 0 trains 2 episodes of each window, rank 1 one; a checkpoint at 3, one log at 6
    cfg = folder_run_config(
        folder_videos, tmp_path / 'runs', train_episodes=6, accum=3, checkpoint_every=3, log_every=6
    )
    mp.spawn(_resume_worker, args=(2, port, config_to_dict(cfg), str(tmp_path)), nprocs=2, join=True)
    r = torch.load(tmp_path / 'rank0.pt', weights_only=False)
    assert r['bar'] == [3, 6], r['bar']  # whole windows, never more than the episodes done
    whole, cut = r['logs']['whole'], r['logs']['cut']
    assert [e['episode'] for e in whole] == [6] and [e['episode'] for e in cut] == [6]
    for k in ('loss', 'accuracy'):
        assert cut[0][k] == pytest.approx(whole[0][k], rel=1e-6, abs=1e-9), k
