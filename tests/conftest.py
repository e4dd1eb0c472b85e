import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('MPLBACKEND', 'Agg')
# Tiny tensors: one thread per test process is faster than two threads fighting over two cores.
os.environ.setdefault('OMP_NUM_THREADS', '1')
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def random_class_folders(
    root: Path, classes: int = 6, per_class: int = 3, frames: int = 4, size: int = 32, seed: int = 0
) -> Path:
    "`root/action <c>/video<v>/`: JPEG frame folders of random pixels, the smallest `folder` dataset."
    import numpy as np

    from mdmf.video import write_frames

    rng = np.random.default_rng(seed)
    for c in range(classes):
        for v in range(per_class):
            write_frames(
                root / f'action {c}' / f'video{v}',
                rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
            )
    return root


@pytest.fixture(scope='module')
def folder_videos(tmp_path_factory):
    "Six classes of three 4-frame videos (32 px JPEG frame folders), dealt 2/2/2 into train/val/test classes."
    return random_class_folders(tmp_path_factory.mktemp('videos'), per_class=3)


def folder_run_config(folder_videos: Path, runs: Path, **kw):
    "The smallest fine-tuning run on `folder_videos`: 2-way 1-shot, 2 frames, 4 episodes, a checkpoint every 2."
    from mdmf.config import preset_config

    tiny = dict(
        dataset='folder',
        data_root=str(folder_videos),
        split_classes='2/2/2',
        backbone='tiny-vit',
        way=2,
        shot=1,
        train_query=1,
        test_query=1,
        frames=2,
        train_episodes=4,
        checkpoint_every=2,
        val_every=0,
        val_episodes=2,
        test_episodes=2,
        workers=0,
        progress=False,
        ffn_dim=32,
        heads=2,
        runs=str(runs),
        name='run',
        freeze_visual=False,  # the encoder trains: its weights are in Adam's state
    )
    return preset_config('synthetic').replace(**{**tiny, **kw})
