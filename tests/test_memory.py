"""The memory model: live tensor bytes, the stored per-frame figures, predicted peaks, the plan the trainer follows,
the paper's protocol on a 16 GB card, and `python -m mdmf.memory`."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from mdmf.backbone import load_clip
from mdmf.config import preset_config
from mdmf.memory import (
    CARDS,
    FRAGMENTATION,
    WORKSPACE,
    GiB,
    LiveBytes,
    ParamCounts,
    backbone_key,
    fits,
    frame_memory,
    measure_frame_memory,
    memory_table,
    meta_model,
    param_counts,
    plan_memory,
    plan_training,
    predict_peak,
)
from mdmf.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
TABLE = frame_memory()
CUDA_BF16, CUDA_FP16 = (
    Runtime(torch.device('cuda', 0), amp_dtype=d) for d in (torch.bfloat16, torch.float16)
)


def test_live_bytes_counts_new_storages_once():
    lin, x = torch.nn.Linear(100, 400), torch.randn(32, 100, requires_grad=True)
    with LiveBytes() as live:
        y = lin(x)
        v = y.view(-1)  # a view: no new bytes
        assert live.now == 32 * 400 * 4
        y.sum().backward()
    assert live.peak >= 32 * 400 * 4 + 400 * 100 * 4 and v.numel() == 32 * 400
    del y, v
    assert live.now < live.peak


def test_stored_figures_are_what_this_machine_measures():
    "The shipped figures come from measure_frame_memory: the tiny ones re-measured here agree."
    stored = TABLE['backbones']['tiny-rn']
    for precision in ('float32', 'bfloat16'):
        m = measure_frame_memory(
            'tiny-rn', precision, TABLE['measured']['frames'], TABLE['measured']['chunk']
        )
        for k in ('per_frame', 'kept_per_frame', 'checkpointed_per_frame'):
            assert abs(m[k] - stored[precision][k]) <= 0.05 * stored[precision]['per_frame'], (precision, k)
    assert set(TABLE['backbones']) == {'tiny-vit', 'tiny-rn', 'RN50', 'ViT-B/16'}
    assert TABLE['measured']['command'] == 'python -m mdmf.memory --measure'


def test_real_backbones_figures_are_plausible():
    "Activations per 224 px frame (MiB): float32 about twice bfloat16; checkpointing keeps under 1 MiB a frame."
    for key, lo, hi in (('RN50', 80, 110), ('ViT-B/16', 120, 170)):
        f32, bf16 = (TABLE['backbones'][key][p] for p in ('float32', 'bfloat16'))
        assert lo * 2**20 < f32['per_frame'] < hi * 2**20, key
        assert 1.6 < f32['per_frame'] / bf16['per_frame'] < 2.1, key
        assert f32['checkpointed_per_frame'] < 2**20 and bf16['checkpointed_per_frame'] < 2**20, key


def test_backbone_recognised_by_architecture(tmp_path):
    with torch.device('meta'):
        from clip.model import CLIP

        from mdmf.backbone import RANDOM_CONFIGS

        assert backbone_key(CLIP(**RANDOM_CONFIGS['ViT-B/16-random']), TABLE) == 'ViT-B/16'
    m = load_clip('tiny-rn', seed=3)
    torch.save(m.state_dict(), tmp_path / 'w.pt')
    # a weights file: by its shapes
    assert backbone_key(load_clip(str(tmp_path / 'w.pt')), TABLE) == 'tiny-rn'
    assert backbone_key(load_clip('tiny-pretrained'), TABLE) == 'tiny-rn'  # the shipped file: a tiny ResNet
    assert backbone_key(m, dict(backbones={})) is None


def test_predicted_parts():
    fig = TABLE['backbones']['RN50']
    c = ParamCounts(total=100_000_000, trainable=60_000_000, visual_trainable=38_000_000)
    p = predict_peak(fig, 'bfloat16', 400, 224, c)
    assert p['total'] == sum(v for k, v in p.items() if k != 'total')
    assert (
        p['weights'] == 4e8 and p['adam'] == 4.8e8 and p['head_grads'] == 4 * 22e6 and p['ddp_buckets'] == 0
    )
    assert p['visual'] == fig['bfloat16']['fixed'] + 400 * fig['bfloat16']['per_frame']
    assert predict_peak(fig, 'float16', 400, 224, c) == p  # float16: the bfloat16 figures
    assert predict_peak(fig, 'bfloat16', 400, 224, c, world=2)['ddp_buckets'] == 4 * 60e6
    chunks = [predict_peak(fig, 'bfloat16', 400, 224, c, chunk=k)['total'] for k in (1, 16, 64, 256)]
    assert chunks == sorted(chunks) and chunks[-1] < p['total']
    frozen = predict_peak(fig, 'bfloat16', 400, 224, ParamCounts(100_000_000, 10_000_000, 0))
    assert frozen['visual'] == 400 * 3 * 224**2 * 4  # no activations kept: only the float frames
    assert fits(10 * GiB, int(10 * GiB * FRAGMENTATION + WORKSPACE)) and not fits(10 * GiB, 11 * GiB)


@pytest.mark.parametrize('key', ['RN50', 'ViT-B/16'])
@pytest.mark.parametrize('rt', [CUDA_BF16, CUDA_FP16], ids=['bfloat16', 'float16'])
def test_paper_protocol_trains_on_a_16gb_card(key, rt):
    "The issue's target: 5-way 5-shot, 5 queries per class, 8 frames, 224 px fits 16 GB, with checkpointing by itself."
    cfg = preset_config('hmdb51')
    model = meta_model(cfg, key)
    plan = plan_training(model, cfg, rt, budget=CARDS['16 GB'], table=TABLE)
    assert plan.activation_checkpoint and plan.chunk >= 32 and fits(plan.peak, CARDS['16 GB']), plan
    assert not fits(plan.peak_without, CARDS['16 GB'])
    assert (
        'activation checkpointing on because the predicted peak without it' in plan.message
        and key in plan.message
    )
    big = plan_training(model, cfg, rt, budget=CARDS['80 GB'], table=TABLE)
    assert not big.activation_checkpoint and 'no activation checkpointing needed' in big.message


def test_plan_modes_and_unknown_architecture():
    cfg, model = preset_config('hmdb51'), meta_model(preset_config('hmdb51'), 'RN50')
    off = plan_training(
        model, cfg.replace(activation_checkpoint='off'), CUDA_BF16, budget=CARDS['16 GB'], table=TABLE
    )
    assert not off.activation_checkpoint and 'expect CUDA out of memory' in off.message
    on = plan_training(
        model, cfg.replace(activation_checkpoint='on'), CUDA_BF16, budget=CARDS['80 GB'], table=TABLE
    )
    assert on.activation_checkpoint and 'as asked' in on.message
    cpu = plan_training(model, cfg, Runtime(), table=TABLE)  # a CPU: nothing to plan, nothing said
    assert not cpu.activation_checkpoint and cpu.message == '' and cpu.peak > 0
    tiny_card = plan_training(model, cfg, CUDA_BF16, budget=2 * GiB, table=TABLE)
    assert (
        tiny_card.activation_checkpoint
        and tiny_card.chunk == 1
        and 'even so it does not fit' in tiny_card.message
    )
    unknown = plan_training(model, cfg, CUDA_BF16, budget=CARDS['16 GB'], table=dict(backbones={}))
    assert not unknown.activation_checkpoint and 'no measured memory figures' in unknown.message
    with pytest.raises(Exception, match='auto, on or off'):
        plan_memory(None, 'float32', 8, 64, param_counts(model), mode='sometimes')


def test_memory_table_rows_and_cards():
    rows = memory_table(presets=('synthetic', 'hmdb51', 'ucf101'), table=TABLE)
    paper = [r for r in rows if 'hmdb51' in r['presets']]
    assert all(r['presets'] == ['hmdb51', 'ucf101'] and r['frames'] == 400 for r in paper)
    assert {(r['backbone'], r['precision']) for r in paper} == {
        (b, p) for b in ('RN50', 'ViT-B/16') for p in ('float32', 'bfloat16', 'float16')
    }
    for r in paper:
        assert (
            r['checkpointed'] < r['peak'] and '16 GB' in r['checkpointed_fits'] and '16 GB' not in r['fits']
        )
    # the shipped tiny CLIP
    assert any(r['backbone'] == 'tiny-rn' and r['presets'] == ['synthetic'] for r in rows)


def test_trainer_follows_the_plan_and_logs_it(tmp_path):
    "With a budget that the episode does not fit (faked on the CPU), the trainer checkpoints and says so; it still trains."
    from mdmf.data import random_episode
    from mdmf.train import Trainer

    # the encoder trains: its memory
    cfg = preset_config('synthetic').replace(
        backbone='tiny-vit',
        way=2,
        shot=2,
        train_query=2,
        ffn_dim=64,
        progress=False,
        runs=str(tmp_path),
        freeze_visual=False,
    )
    rt = Runtime()
    free = plan_training(meta_model(cfg, 'tiny-vit'), cfg, rt, table=TABLE)  # no budget: the prediction only
    budget = int(free.peak_without * FRAGMENTATION + WORKSPACE) - 1  # just too small for the whole episode
    with mock.patch('mdmf.memory.usable_memory', return_value=budget):
        t = Trainer(cfg, rt, tmp_path / 'run', quiet=True)
    bb = t.model.backbone
    # chunks of the 64 frames
    assert bb.activation_checkpoint and bb.checkpoint_chunk == t.memory.chunk < 2 * 4 * 8
    log = (tmp_path / 'run' / 'train.log').read_text()
    assert 'activation checkpointing on because the predicted peak' in log
    ep = random_episode(way=2, shot=2, query=2, frames=8, size=bb.image_size)
    t.model.train()
    t.episode_loss(0, ep)
    t.step()
    assert t.state['step'] == 1
    with mock.patch('mdmf.memory.usable_memory', return_value=80 * GiB):
        roomy = Trainer(cfg, rt, tmp_path / 'run2', quiet=True)
    assert not roomy.model.backbone.activation_checkpoint


def test_cli_prints_the_table_and_measures(tmp_path):
    p = subprocess.run(
        [sys.executable, '-m', 'mdmf.memory'], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'predicted peak GPU memory' in p.stdout and 'ViT-B/16' in p.stdout and '16 GB' in p.stdout
    out = tmp_path / 'figures.json'
    p = subprocess.run(
        [sys.executable, '-m', 'mdmf.memory', '--measure', '--backbones', 'tiny-vit', '--out', str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    new = json.loads(out.read_text())
    assert set(new['backbones']) == set(TABLE['backbones'])  # tiny-vit measured again, the others kept
    assert (
        new['backbones']['RN50'] == TABLE['backbones']['RN50']
        and new['backbones']['tiny-vit']['float32']['per_frame'] > 0
    )
    bad = subprocess.run(
        [sys.executable, '-m', 'mdmf.memory', '--measure', '--backbones', 'RN18', '--out', str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown backbone 'RN18'" in bad.stderr
