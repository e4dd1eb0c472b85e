"""Issue 11 (the GPU path) on a CPU: what can be shown without a GPU, each with the fix it guards.

Device choice with faked CUDA devices, the TF32/cudnn policy, float32 costs under autocast, size checks, the scaler on
resume in float16, rank-0-first downloads between two gloo processes, and models rebuilt from checkpoints offline.
"""

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import folder_run_config

from mdmf.distill import view_posterior
from mdmf.otam import frame_cost, otam_bidirectional, otam_distance
from mdmf.runtime import (
    Runtime,
    amp_dtype,
    backend_flags,
    ddp_device_ids,
    init_runtime,
    pick_device,
    set_tf32,
    tf32_enabled,
)

ROOT = Path(__file__).resolve().parents[1]


# ---- items 1-2: device, LOCAL_RANK, DDP ids, AMP dtype by compute capability --------------------------------------
def _fake_gpus(n, capability=(7, 5)):
    return [
        mock.patch('torch.cuda.is_available', return_value=n > 0),
        mock.patch('torch.cuda.device_count', return_value=n),
        mock.patch('torch.cuda.get_device_capability', return_value=capability),
    ]


@pytest.mark.parametrize(
    'name, local_rank, want',
    [('cuda', 0, 0), ('cuda', 3, 3), ('auto', 1, 1), ('auto', 5, 1), ('cuda:2', 3, 2)],
)
def test_cuda_device_always_has_an_index(name, local_rank, want):
    with (
        mock.patch('torch.cuda.is_available', return_value=True),
        mock.patch('torch.cuda.device_count', return_value=4),
    ):
        dev = pick_device(name, local_rank)
    assert dev == torch.device('cuda', want) and dev.index == want


def test_torchrun_second_process_gets_its_gpu_nccl_and_device_ids():
    env = dict(WORLD_SIZE='2', RANK='1', LOCAL_RANK='1')
    patches = _fake_gpus(2, (8, 0)) + [
        mock.patch.dict(os.environ, env),
        mock.patch('torch.cuda.set_device'),
        mock.patch('torch.distributed.is_initialized', return_value=False),
        mock.patch('torch.distributed.init_process_group'),
    ]
    with backend_flags(Runtime()):  # init_runtime sets the process's flags: restore them after the test
        for p in patches:
            p.start()
        try:
            rt = init_runtime('cuda')
            torch.cuda.set_device.assert_called_once_with(torch.device('cuda', 1))
            from mdmf.runtime import DIST_TIMEOUT

            torch.distributed.init_process_group.assert_called_once_with('nccl', timeout=DIST_TIMEOUT)
            assert torch.backends.cudnn.benchmark and tf32_enabled()  # bfloat16 card: the fast path's flags
        finally:
            for p in patches:
                p.stop()
    assert (rt.device, rt.rank, rt.world, rt.local_rank, rt.amp_dtype) == (
        torch.device('cuda', 1),
        1,
        2,
        1,
        torch.bfloat16,
    )
    assert ddp_device_ids(rt) == [1] and ddp_device_ids(Runtime()) is None


@pytest.mark.parametrize(
    'capability, want',
    [
        ((7, 5), torch.float16),
        ((7, 0), torch.float16),
        ((6, 1), torch.float16),
        ((8, 0), torch.bfloat16),
        ((8, 9), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
)
def test_amp_dtype_by_compute_capability_not_by_emulated_bf16(capability, want):
    cuda = torch.device('cuda', 0)
    with mock.patch(
        'torch.cuda.is_bf16_supported', return_value=True
    ):  # what a T4 answers (emulated bfloat16)
        assert amp_dtype(cuda, capability=capability) == want
        with mock.patch('torch.cuda.get_device_capability', return_value=capability):
            assert amp_dtype(cuda) == want
    assert (
        amp_dtype(cuda, enabled=False, capability=capability) is None
        and amp_dtype(torch.device('cpu')) is None
    )


def test_tf32_policy_honest_float32():
    "TF32 only with autocast on the fast path; --no-amp and the benchmark's baseline are IEEE float32."
    cuda = torch.device('cuda', 0)
    before = tf32_enabled()
    for rt, want in [
        (Runtime(cuda, amp_dtype=torch.bfloat16), True),
        (Runtime(cuda, amp_dtype=None), False),
        (Runtime(cuda, amp_dtype=torch.float16, fast=False), False),
        (Runtime(), False),
    ]:
        set_tf32(not want)
        with backend_flags(rt):
            assert tf32_enabled() == want, rt
            assert torch.backends.cudnn.benchmark == (rt.fast and rt.device.type == 'cuda')
    set_tf32(before)


# ---- item 6: the cosine costs stay float32 under autocast ------------------------------------------------------
def _near_ties(Q=100, N=5, T=8, D=1024, noise=5e-4, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = F.normalize(torch.randn(N, T, D, generator=g), dim=-1)  # [N, T, D]
    q = 0.5 * (p[torch.arange(Q) % N] + p[(torch.arange(Q) + 1) % N]) + noise * torch.randn(
        Q, T, D, generator=g
    )
    return q, p


def test_near_tie_predictions_do_not_flip_under_bf16_autocast():
    q, p = _near_ties()
    d32 = otam_distance(q, p)  # [Q, N]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cost = frame_cost(q, p)
        d_amp = otam_distance(q, p)
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost, frame_cost(q, p), rtol=0, atol=1e-6)
    assert torch.equal(d_amp.argmin(-1), d32.argmin(-1))
    gap = d32.topk(2, largest=False).values.diff(dim=-1)
    assert gap.median() < 0.01  # the episodes are near ties ...
    rounded = otam_bidirectional(frame_cost(q, p).bfloat16().float())
    assert (rounded.argmin(-1) != d32.argmin(-1)).sum() >= 5  # ... that bfloat16 costs would decide otherwise


def test_text_posterior_float32_under_autocast():
    g = torch.Generator().manual_seed(1)
    qt, pt, dist = (
        torch.randn(25, 1024, generator=g),
        torch.randn(5, 1024, generator=g),
        torch.rand(25, 5, generator=g),
    )
    ref = view_posterior(dist, qt, pt)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        amp = view_posterior(dist, qt, pt)
    assert amp.text.dtype == torch.float32
    torch.testing.assert_close(amp.text, ref.text, rtol=0, atol=1e-6)
    torch.testing.assert_close(amp.t, ref.t, rtol=0, atol=1e-6)


# ---- item 4: rank 0 downloads CLIP first; the others wait and read its file ------------------------------------
_RANK_SCRIPT = r'''
import contextlib, hashlib, os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
import mdmf.backbone as backbone
import mdmf.train as train
from mdmf.config import preset_config
from mdmf.runtime import init_runtime

tmp, guarded = Path(sys.argv[1]), sys.argv[2] == 'guarded'
def fake_load(name, device='cpu', jit=False, download_root=None):  # clip.load: download once, then read the file
    path = Path(download_root) / f'{name}.pt'
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with open(tmp / 'downloads.txt', 'a') as f: f.write(os.environ['RANK'] + '\n')
        time.sleep(2)  # a download takes a while: another process arriving now would download too
        torch.save(backbone.load_clip('tiny-rn', seed=5).state_dict(), path)
    return backbone.clip_from_state_dict(torch.load(path, weights_only=True)), None
backbone.clip.load = fake_load
if not guarded: train.main_first = lambda rt, local=False: contextlib.nullcontext()  # what the trainer would be without it
rt = init_runtime('cpu')  # WORLD_SIZE=2: joins the gloo group
dist.barrier()  # both ranks reach the model at the same moment
cfg = preset_config('synthetic').replace(backbone='RN50', ffn_dim=32, heads=2, progress=False, runs=str(tmp / 'runs'),
                                         freeze_visual=False)
trainer = train.Trainer(cfg, rt, tmp / 'run', quiet=True)
sd = trainer.model.backbone.clip.state_dict()
print('weights', hashlib.sha256(b''.join(v.numpy().tobytes() for v in sd.values())).hexdigest()[:16])
dist.destroy_process_group()
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_ranks(
    tmp: Path, mode: str
) -> tuple:  # (ranks that downloaded, return codes, (stdout, stderr) of both ranks)
    tmp.mkdir()
    script = tmp / 'rank.py'
    script.write_text(_RANK_SCRIPT)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp), mode],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                'HOME': str(tmp),
                'MASTER_ADDR': '127.0.0.1',
                'MASTER_PORT': str(port),
                'WORLD_SIZE': '2',
                'RANK': str(r),
                'LOCAL_RANK': str(r),
                'OMP_NUM_THREADS': '1',
                'PYTHONPATH': str(ROOT),
            },
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    return (tmp / 'downloads.txt').read_text().split(), [p.returncode for p in procs], outs


def test_rank_zero_downloads_clip_first_under_torchrun(tmp_path):
    "Two gloo processes build the trainer's model at once: with main_first one download (rank 0), the same weights."
    downloads, codes, outs = _two_ranks(tmp_path / 'guarded', 'guarded')
    assert codes == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert downloads == ['0']
    # both read rank 0's complete file
    assert outs[0][0].split('weights')[1] == outs[1][0].split('weights')[1]
    # the same two processes without main_first ...
    raced, _, _ = _two_ranks(tmp_path / 'unguarded', 'unguarded')
    # ... both download into one file (a rank may then read it half-written)
    assert sorted(raced) == ['0', '1']


# ---- item 9: resuming in float16 a run saved without a loss-scaler state ----------------------------------------
def test_resume_in_float16_a_run_saved_without_scaler_state(folder_videos, tmp_path):
    "A float32 run (no GradScaler state in last.pt) continues in float16 (faked on the CPU: CPU autocast + CPU scaler)."
    from mdmf.runs import load_checkpoint
    from mdmf.train import Trainer, train

    cfg = folder_run_config(folder_videos, tmp_path, train_episodes=2, name='fp32')
    train(cfg, quiet=True)
    last = tmp_path / 'fp32' / 'last.pt'
    assert load_checkpoint(last)['scaler'] is None
    with pytest.raises(
        RuntimeError, match='empty'
    ):  # what loading a missing state into an enabled scaler does
        torch.amp.GradScaler('cpu').load_state_dict({})
    fp16 = Runtime(torch.device('cpu'), amp_dtype=torch.float16)
    saved = load_checkpoint(last)['config']
    from mdmf.config import config_from_dict

    t = Trainer(
        config_from_dict(saved).replace(train_episodes=4, split_classes=''),
        fp16,
        tmp_path / 'fp16',
        quiet=True,
    )
    assert t.scaler.is_enabled()
    t.load(last)
    assert t.state['episode'] == 2
    t.fit()
    assert t.state['episode'] == 4 and t.state['step'] == 4 and t.scaler.get_scale() > 0
    assert load_checkpoint(tmp_path / 'fp16' / 'last.pt')['scaler'] is not None  # saved from now on


# ---- item 4 (second half): a saved model comes back offline, from its checkpoint alone ---------------------------
def test_load_model_builds_clip_from_the_checkpoint_without_download(tmp_path):
    "A run trained on 'RN50' (here: a small ResNet under that name) reloads with every download made impossible."
    from mdmf.config import config_to_dict, preset_config
    from mdmf.model import build_model
    from mdmf.runs import load_model, save_checkpoint

    cfg = preset_config('synthetic').replace(backbone='tiny-rn', backbone_seed=2, ffn_dim=32, heads=2)
    model = build_model(cfg.model)
    save_checkpoint(
        tmp_path / 'best.pt',
        dict(config=config_to_dict(cfg.replace(backbone='RN50')), model=model.state_dict()),
    )

    def refuse(*a, **k):
        raise AssertionError('a download was attempted')

    with (
        mock.patch('clip.clip._download', refuse),
        mock.patch('clip.load', refuse),
        mock.patch('urllib.request.urlopen', refuse),
    ):
        loaded, saved = load_model(tmp_path)
    assert saved.model.backbone == 'RN50' and loaded.backbone.is_resnet and loaded.backbone.image_size == 64
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # a truncated file's weights
    broken = {k: v for k, v in model.state_dict().items() if 'attnpool' not in k}
    save_checkpoint(tmp_path / 'cut.pt', dict(config=config_to_dict(cfg), model=broken))
    from mdmf.core import BadInput

    with pytest.raises(BadInput, match='incomplete'):
        load_model(tmp_path / 'cut.pt')


# ---- item 7: what travels to the GPU, and through shared memory --------------------------------------------------
def test_episodes_travel_as_uint8_from_pinned_memory(folder_videos, tmp_path):
    "The training loader serves uint8 frames (4x smaller than float32) and pins them when CUDA is there."
    from mdmf.config import preset_config
    from mdmf.data import episode_data, freeze_split, load_data
    from mdmf.train import to_device

    cfg = preset_config('synthetic').replace(
        dataset='folder', data_root=str(folder_videos), split_classes='2/2/2', way=2, shot=1, train_query=1
    )
    cfg = cfg.replace(data=freeze_split(cfg.data, tmp_path / 'splits'))
    ep = episode_data(cfg.data, load_data(cfg.data, 'train'), 2, 224, 1, 0)[0]
    assert ep['support'].dtype == torch.uint8 and ep['support'].shape[-3:] == (3, 224, 224)
    seen = []
    real = torch.Tensor.to

    def spy(self, *a, **k):
        seen.append((self.dtype, k.get('non_blocking')))
        return real(self, *a, **k)

    with mock.patch.object(torch.Tensor, 'to', spy):
        to_device(ep, 'cpu')
    # asynchronous copies, frames still uint8
    assert (torch.uint8, True) in seen and all(nb for _, nb in seen)


def test_validation_does_not_run_beside_the_training_workers(folder_videos, tmp_path):
    "fit() ends the training loader's workers (and their episodes in shared memory) before a val round starts its own."
    import multiprocessing

    from mdmf.train import Trainer, train

    alive, real = [], Trainer.validate

    def validate(self):
        alive.append(len(multiprocessing.active_children()))
        return real(self)

    cfg = folder_run_config(folder_videos, tmp_path, val_every=2, workers=2, name='')
    with mock.patch.object(Trainer, 'validate', validate):
        train(cfg, quiet=True)
    assert alive and max(alive) == 0, f'training workers alive during validation: {alive}'
