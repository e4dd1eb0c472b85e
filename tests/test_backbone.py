"""Behaviour of mdmf.backbone that the notebook does not show compactly."""

import pytest
import torch

from mdmf.backbone import TINY_CONFIGS, Backbone, load_clip

NAMES = ['brush hair', 'cartwheel', 'catch']


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize('name', list(TINY_CONFIGS))
def test_shapes_dtype_and_seed(name):
    m = load_clip(name, seed=5)
    assert next(m.parameters()).dtype == torch.float32 and not m.training
    assert _same(m, load_clip(name, seed=5)) and not _same(m, load_clip(name, seed=6))
    bb = Backbone(m)
    assert (bb.dim, bb.image_size) == (64, 64)
    with torch.no_grad():
        f = bb.encode_frames(torch.randn(2, 3, 3, 64, 64))
    assert f.shape == (2, 3, 64) and f.dtype == torch.float32
    assert bb.encode_prompts(NAMES).shape == (3, 64)


def test_global_rng_untouched():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    load_clip('tiny-vit', seed=9)
    b = torch.rand(3)
    assert torch.equal(a, b)


@pytest.mark.parametrize('name', list(TINY_CONFIGS))
def test_state_dict_file_round_trip(name, tmp_path):
    m = load_clip(name, seed=2)
    path = tmp_path / 'w.pt'
    torch.save(m.state_dict(), path)
    m2 = load_clip(str(path))
    assert _same(m, m2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.visual(x), m2.visual(x))


def test_offline_name_error_is_clear(tmp_path):
    root = str(tmp_path / 'nothing_here')
    try:
        load_clip('ViT-B/16', download_root=root)
    except RuntimeError as e:
        msg = str(e)
        assert 'internet' in msg and 'local weights file' in msg and root in msg
    else:
        pytest.skip('this machine can download CLIP weights')
    with pytest.raises(ValueError, match='Unknown CLIP'):
        load_clip('definitely-not-a-model')


def test_prompt_cache_counts_calls():
    bb = Backbone(load_clip('tiny-vit'))
    calls = []
    orig = bb.clip.encode_text
    bb.clip.encode_text = lambda t: (calls.append(t.shape[0]), orig(t))[1]
    a = bb.encode_prompts(NAMES)
    b = bb.encode_prompts(NAMES[::-1] + NAMES)
    assert calls == [3]
    assert torch.equal(b[0], a[2]) and torch.equal(b[3], a[0])
    assert b.requires_grad is False
    # a cached tensor is the very same values after a further call
    c = bb.encode_prompts(NAMES)
    assert torch.equal(c, a) and calls == [3]
    bb.to(torch.float32)  # .to() invalidates
    bb.encode_prompts(NAMES[:1])
    assert calls == [3, 1]
    bb.load_state_dict(bb.state_dict())  # new weights invalidate
    bb.encode_prompts(NAMES[:1])
    assert calls == [3, 1, 1]


def _text_grad(bb):
    bb.zero_grad(set_to_none=True)
    out = bb.encode_prompts(NAMES)
    if out.requires_grad:
        out.pow(2).sum().backward()
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb._text_parameters())


def test_train_text_switch():
    bb = Backbone(load_clip('tiny-vit'))
    assert not _text_grad(bb)
    assert not any(p.requires_grad for p in bb._text_parameters())
    bb.train_text = True
    assert _text_grad(bb)
    assert not bb._cache  # no caching while training the text encoder
    bb2 = Backbone(load_clip('tiny-vit'), train_text=True)
    assert _text_grad(bb2)


def test_visual_trains_and_freezes():
    x = torch.randn(1, 2, 3, 64, 64)
    bb = Backbone(load_clip('tiny-rn'))
    bb.encode_frames(x).sum().backward()
    assert bb.clip.visual.conv1.weight.grad is not None
    bb = Backbone(load_clip('tiny-rn'), freeze_visual=True)
    assert not bb.encode_frames(x).requires_grad


def test_autocast_float32_output():
    bb = Backbone(load_clip('tiny-rn'))
    x = torch.randn(2, 2, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        f = bb.encode_frames(x)
    assert f.dtype == torch.float32 and torch.isfinite(f).all()


def test_batchnorm_mode():
    bb = Backbone(load_clip('tiny-rn')).train()
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    bb.eval().train()
    assert not any(m.training for m in bns)
    bb2 = Backbone(load_clip('tiny-rn'), freeze_bn=False).train()
    assert all(m.training for m in bb2.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_import_is_quiet():
    # a fresh interpreter: clip's pkg_resources deprecation warning must not leak out of the import
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, '-W', 'error', '-c', 'import mdmf.backbone'],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('name', list(TINY_CONFIGS))
def test_uint8_frames_normalised_on_the_device(name):
    "uint8 frames (what the data layer serves) give the features of the float path of the same frames."
    from mdmf.data import random_episode
    from mdmf.video import normalize, to_clip_input

    bb = Backbone(load_clip(name))
    # [2, 3, 3, S, S] uint8
    u = random_episode(way=2, shot=1, query=1, frames=3, size=bb.image_size, seed=4)['support']
    assert u.dtype == torch.uint8
    x = normalize(u.float() / 255)  # the float path: CLIP-normalised by the caller
    assert torch.equal(to_clip_input(u), x)
    with torch.no_grad():
        fu, fx = bb.encode_frames(u), bb.encode_frames(x)
    assert fu.shape == (2, 3, 64) and fu.dtype == torch.float32
    torch.testing.assert_close(fu, fx, rtol=1e-5, atol=1e-5)
    # float input is not rescaled
    assert not torch.allclose(fu, bb.encode_frames(u.float()).detach(), atol=1e-3)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert bb.encode_frames(u).dtype == torch.float32


def test_uint8_frames_move_to_the_device_before_scaling():
    "The uint8 clip is moved to the model's device before it is scaled (the transfer stays 1 byte a pixel)."
    bb = Backbone(load_clip('tiny-vit'))
    seen = []
    real = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append((self.dtype, args[0] if args else kwargs.get('device', kwargs.get('dtype'))))
        return real(self, *args, **kwargs)

    u = torch.zeros(1, 2, 3, 64, 64, dtype=torch.uint8)
    torch.Tensor.to = spy
    try:
        with torch.no_grad():
            bb.encode_frames(u)
    finally:
        torch.Tensor.to = real
    assert seen[0] == (torch.uint8, bb.device)


@pytest.mark.parametrize('name', list(TINY_CONFIGS))
def test_frames_of_the_wrong_size_are_refused_in_one_line(name):
    "Item 5 of issue 11: another size fails at the door, naming both sizes and the fix, not deep inside CLIP."
    from mdmf.core import BadInput

    bb = Backbone(load_clip(name))
    for shape in [(1, 2, 3, 32, 32), (1, 2, 3, 64, 96), (1, 2, 64, 64, 3)]:
        with pytest.raises(BadInput, match='takes 64x64 RGB frames') as e:
            bb.encode_frames(torch.zeros(shape, dtype=torch.uint8))
        assert str(tuple(shape)) in str(e.value) and 'crop them to 64 pixels' in str(e.value)
        assert '\n' not in str(e.value)


def test_activation_checkpoint_renamed_loudly():
    "The old name would silently create a dead attribute; it raises and names the new one."
    bb = Backbone(load_clip('tiny-vit'), activation_checkpoint=True, checkpoint_chunk=3)
    assert bb.activation_checkpoint and bb.checkpoint_chunk == 3
    with pytest.raises(AttributeError, match='activation_checkpoint'):
        bb.checkpoint = False
    assert bb.activation_checkpoint
    with pytest.raises(TypeError):
        Backbone(load_clip('tiny-vit'), checkpoint=True)


def test_activation_checkpointing_in_chunks_keeps_features_and_gradients():
    x = torch.randint(0, 256, (2, 3, 3, 64, 64), dtype=torch.uint8)
    out = []
    for on in (False, True):
        # 6 frames: chunks of 4 and 2
        bb = Backbone(load_clip('tiny-rn'), activation_checkpoint=on, checkpoint_chunk=4)
        f = bb.encode_frames(x)
        f.square().mean().backward()
        out.append((f.detach(), bb.clip.visual.conv1.weight.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-5)


def test_channels_last_resnet_only_same_features():
    x = torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8)
    bb = Backbone(load_clip('tiny-rn'))
    with torch.no_grad():
        ref = bb.encode_frames(x)
        assert bb.is_resnet and bb.use_channels_last().channels_last
        assert all(
            p.is_contiguous(memory_format=torch.channels_last)
            for p in bb.clip.visual.parameters()
            if p.dim() == 4
        )
        torch.testing.assert_close(bb.encode_frames(x), ref, rtol=1e-4, atol=1e-4)
    vit = Backbone(load_clip('tiny-vit'))
    assert not vit.is_resnet and not vit.use_channels_last().channels_last


def test_real_shapes_without_download():
    "RN50-random / ViT-B/16-random have OpenAI's sizes (38.3M and 86.2M visual parameters)."
    from clip.model import CLIP

    from mdmf.backbone import RANDOM_CONFIGS

    for name, visual, D in [('RN50-random', 38.3e6, 1024), ('ViT-B/16-random', 86.2e6, 512)]:
        with torch.device('meta'):
            m = CLIP(**RANDOM_CONFIGS[name])
        assert abs(sum(p.numel() for p in m.visual.parameters()) - visual) < 0.05e6, name
        assert m.text_projection.shape[1] == D and m.visual.input_resolution == 224


@pytest.mark.parametrize('name', list(TINY_CONFIGS))
def test_clip_from_a_state_dict_alone(name):
    from mdmf.backbone import clip_from_state_dict

    m = load_clip(name, seed=4)
    assert _same(clip_from_state_dict(m.state_dict()), m)
