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

from mdmf.distill import view_posterior
from mdmf.otam import frame_cost, otam_bidirectional, otam_distance
from mdmf.runtime import (Runtime, amp_dtype, backend_flags, ddp_device_ids, init_runtime, pick_device, set_tf32,
                          tf32_enabled)

ROOT = Path(__file__).resolve().parents[1]


# ---- items 1-2: device, LOCAL_RANK, DDP ids, AMP dtype by compute capability --------------------------------------
def _fake_gpus(n, capability=(7, 5)):
    return [mock.patch('torch.cuda.is_available', return_value=n > 0), mock.patch('torch.cuda.device_count', return_value=n),
            mock.patch('torch.cuda.get_device_capability', return_value=capability)]


@pytest.mark.parametrize('name, local_rank, want', [('cuda', 0, 0), ('cuda', 3, 3), ('auto', 1, 1), ('auto', 5, 1),
                                                    ('cuda:2', 3, 2)])
def test_cuda_device_always_has_an_index(name, local_rank, want):
    with mock.patch('torch.cuda.is_available', return_value=True), mock.patch('torch.cuda.device_count', return_value=4):
        dev = pick_device(name, local_rank)
    assert dev == torch.device('cuda', want) and dev.index == want


def test_torchrun_second_process_gets_its_gpu_nccl_and_device_ids():
    env = dict(WORLD_SIZE='2', RANK='1', LOCAL_RANK='1')
    patches = _fake_gpus(2, (8, 0)) + [mock.patch.dict(os.environ, env), mock.patch('torch.cuda.set_device'),
                                        mock.patch('torch.distributed.is_initialized', return_value=False),
                                        mock.patch('torch.distributed.init_process_group')]
    with backend_flags(Runtime()):  # init_runtime sets the process's flags: restore them after the test
        for p in patches: p.start()
        try:
            rt = init_runtime('cuda')
            torch.cuda.set_device.assert_called_once_with(torch.device('cuda', 1))
            torch.distributed.init_process_group.assert_called_once_with('nccl')
            assert torch.backends.cudnn.benchmark and tf32_enabled()  # bfloat16 card: the fast path's flags
        finally:
            for p in patches: p.stop()
    assert (rt.device, rt.rank, rt.world, rt.local_rank, rt.amp_dtype) == (torch.device('cuda', 1), 1, 2, 1, torch.bfloat16)
    assert ddp_device_ids(rt) == [1] and ddp_device_ids(Runtime()) is None


@pytest.mark.parametrize('capability, want', [((7, 5), torch.float16), ((7, 0), torch.float16), ((6, 1), torch.float16),
                                              ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_dtype_by_compute_capability_not_by_emulated_bf16(capability, want):
    cuda = torch.device('cuda', 0)
    with mock.patch('torch.cuda.is_bf16_supported', return_value=True):  # what a T4 answers (emulated bfloat16)
        assert amp_dtype(cuda, capability=capability) == want
        with mock.patch('torch.cuda.get_device_capability', return_value=capability):
            assert amp_dtype(cuda) == want
    assert amp_dtype(cuda, enabled=False, capability=capability) is None and amp_dtype(torch.device('cpu')) is None


def test_tf32_policy_honest_float32():
    "TF32 only with autocast on the fast path; --no-amp and the benchmark's baseline are IEEE float32."
    cuda = torch.device('cuda', 0)
    before = tf32_enabled()
    for rt, want in [(Runtime(cuda, amp_dtype=torch.bfloat16), True), (Runtime(cuda, amp_dtype=None), False),
                     (Runtime(cuda, amp_dtype=torch.float16, fast=False), False), (Runtime(), False)]:
        set_tf32(not want)
        with backend_flags(rt):
            assert tf32_enabled() == want, rt
            assert torch.backends.cudnn.benchmark == (rt.fast and rt.device.type == 'cuda')
    set_tf32(before)


# ---- item 6: the cosine costs stay float32 under autocast ------------------------------------------------------
def _near_ties(Q=100, N=5, T=8, D=1024, noise=5e-4, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = F.normalize(torch.randn(N, T, D, generator=g), dim=-1)  # [N, T, D]
    q = 0.5 * (p[torch.arange(Q) % N] + p[(torch.arange(Q) + 1) % N]) + noise * torch.randn(Q, T, D, generator=g)
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
    qt, pt, dist = torch.randn(25, 1024, generator=g), torch.randn(5, 1024, generator=g), torch.rand(25, 5, generator=g)
    ref = view_posterior(dist, qt, pt)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        amp = view_posterior(dist, qt, pt)
    assert amp.text.dtype == torch.float32
    torch.testing.assert_close(amp.text, ref.text, rtol=0, atol=1e-6)
    torch.testing.assert_close(amp.t, ref.t, rtol=0, atol=1e-6)
