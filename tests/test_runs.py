"""Nothing lost, nothing executed: run folders are never overwritten by accident, two live runs cannot share a folder,
checkpoints are written atomically and loaded without running code."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdmf.config import config_to_dict, preset_config
from mdmf.core import BadInput, MissingInput
from mdmf.runs import (
    LAST,
    LOCK,
    RunLock,
    load_checkpoint,
    load_model,
    open_run,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mdmf.synthetic import make_synthetic
from mdmf.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
    'OMP_NUM_THREADS': '1',
}
TINY = dict(
    backbone='tiny-vit',
    short_side=64,
    shot=1,
    train_query=1,
    train_episodes=4,
    accum=2,
    val_every=2,
    val_episodes=6,
    test_episodes=6,
    checkpoint_every=2,
    log_every=2,
    threads=1,
    workers=0,
    progress=False,
    ffn_dim=64,
    heads=2,
    return_attention=False,
)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    make_synthetic(root, videos_per_class=8, frames=8, size=32, workers=1)
    return root


def _digest(folder: Path) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_second_run_leaves_the_first_byte_identical(data_root, tmp_path):
    cfg = preset_config().replace(**TINY, data_root=str(data_root), runs=str(tmp_path), name='same')
    train(cfg, quiet=True)
    first = _digest(tmp_path / 'same')
    assert {'best.pt', 'last.pt', 'metrics.json', 'config.json'} <= set(first)
    r = subprocess.run(
        [
            sys.executable,
            '-m',
            'mdmf.train',
            '--data-root',
            str(data_root),
            '--runs',
            str(tmp_path),
            '--name',
            'same',
            '--backbone',
            'tiny-vit',
            '--short-side',
            '64',
            '--shot',
            '1',
            '--train-query',
            '1',
            '--train-episodes',
            '2',
            '--val-every',
            '0',
            '--val-episodes',
            '4',
            '--test-episodes',
            '4',
            '--workers',
            '0',
            '--no-progress',
            '--ffn-dim',
            '64',
            '--heads',
            '2',
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert _digest(tmp_path / 'same') == first
    assert (tmp_path / 'same-2' / 'metrics.json').exists()
    assert 'already holds a finished run' in r.stdout and 'same-2' in r.stdout
    # --overwrite replaces the run on purpose
    train(cfg.replace(overwrite=True, train_episodes=2), quiet=True)
    assert json.loads((tmp_path / 'same' / 'metrics.json').read_text())['train']['episodes'] == 2


def test_a_locked_folder_is_refused(tmp_path):
    cfg = preset_config().replace(runs=str(tmp_path), name='busy')
    folder, lock, _ = open_run(cfg)
    try:
        for again in (cfg.replace(overwrite=True),):
            with pytest.raises(BadInput, match='is in use by process'):
                open_run(again)
        (folder / LAST).write_bytes(b'')
        with pytest.raises(BadInput, match='is in use by process'):
            open_run(cfg.replace(resume=True))
        f2, lock2, note = open_run(cfg)  # a plain new run goes next door
        assert f2.name == 'busy-2' and lock2 is not None
        lock2.release()
    finally:
        lock.release()
    assert not (folder / LOCK).exists()


def test_a_dead_process_lock_is_taken_over(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    dead = subprocess.run(
        [sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True
    )
    import socket

    (folder / LOCK).write_text(
        json.dumps(dict(pid=int(dead.stdout), host=socket.gethostname(), since='earlier'))
    )
    with RunLock(folder) as lock:
        assert lock.owner()['pid'] == os.getpid()


class _Plant:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


def _evil_checkpoint(path: Path, plant: Path, data_root):
    "A checkpoint whose unpickling would create `plant`; otherwise a valid run checkpoint."
    cfg = preset_config().replace(**TINY, data_root=str(data_root))
    from mdmf.model import build_model

    torch.save(
        dict(config=config_to_dict(cfg), model=build_model(cfg.model).state_dict(), extra=_Plant(plant)), path
    )


def test_checkpoints_that_would_run_code_are_refused(data_root, tmp_path):
    plant = tmp_path / 'planted.txt'
    run = tmp_path / 'runs' / 'evil'
    run.mkdir(parents=True)
    _evil_checkpoint(run / 'best.pt', plant, data_root)
    _evil_checkpoint(run / 'last.pt', plant, data_root)
    (run / 'config.json').write_text(
        json.dumps(config_to_dict(preset_config().replace(**TINY, data_root=str(data_root))))
    )
    # evaluate (the CLI)
    r = subprocess.run(
        [sys.executable, '-m', 'mdmf.evaluate', '--checkpoint', str(run / 'best.pt')],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and 'could run code' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    # resume
    cfg = preset_config().replace(
        **TINY, data_root=str(data_root), runs=str(tmp_path / 'runs'), name='evil', resume=True
    )
    with pytest.raises(BadInput, match='could run code'):
        train(cfg, quiet=True)
    # the loader the visualisations use
    with pytest.raises(BadInput, match='could run code'):
        load_model(run)
    assert not plant.exists()


def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path):
    path = tmp_path / 'last.pt'
    save_checkpoint(path, dict(w=torch.ones(3), rng=rng_state()))
    before = path.read_bytes()

    class Boom:  # torch.save fails half-way through writing the file
        def __reduce__(self):
            raise OSError('disk full')

    with pytest.raises(OSError, match='disk full'):
        save_checkpoint(path, dict(w=torch.zeros(10_000), boom=Boom()))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['last.pt'], 'no temporary file left behind'
    ck = load_checkpoint(path)
    assert torch.equal(ck['w'], torch.ones(3))
    set_rng_state(ck['rng'])  # the random states load with weights_only and restore


def test_old_checkpoints_load_or_say_why(data_root, tmp_path):
    "A best.pt of the earlier flat config loads; an earlier last.pt (NumPy random state pickled) gets a clear message."
    import numpy as np

    from mdmf.model import ModelConfig, build_model

    old_cfg = {
        'preset': 'synthetic',
        'dataset': 'synthetic',
        'data_root': str(data_root),
        'shot': 1,
        'image_size': 64,
        'model': 'mdmf',
        'backbone': 'tiny-vit',
        'frames': 8,
        'inject_nan_at': -1,
        'mdmf': dict(vars(ModelConfig(backbone='tiny-vit', ffn_dim=64, heads=2))),
    }
    model = build_model(ModelConfig(backbone='tiny-vit', ffn_dim=64, heads=2))
    torch.save(
        dict(config=old_cfg, model=model.state_dict(), episode=4, val_accuracy=50.0), tmp_path / 'best.pt'
    )
    loaded, cfg = load_model(tmp_path / 'best.pt')
    assert cfg.model.ffn_dim == 64 and cfg.data.shot == 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save(dict(config=old_cfg, rng=[dict(numpy=np.random.get_state())]), tmp_path / 'last.pt')
    with pytest.raises(BadInput, match='older mdmf last.pt'):
        load_checkpoint(tmp_path / 'last.pt')


def test_a_checkpoint_that_does_not_fit_its_config(data_root, tmp_path):
    cfg = preset_config().replace(**TINY, data_root=str(data_root))
    from mdmf.model import build_model

    sd = build_model(cfg.model).state_dict()
    torch.save(dict(config=config_to_dict(cfg.replace(ffn_dim=32)), model=sd), tmp_path / 'best.pt')
    with pytest.raises(BadInput, match='do not fit'):
        load_model(tmp_path / 'best.pt')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(MissingInput, match='no best.pt or last.pt'):
        load_model(tmp_path / 'empty')
    with pytest.raises(MissingInput, match='does not exist'):
        load_model(tmp_path / 'nothing.pt')
