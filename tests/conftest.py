import os
import sys
from pathlib import Path

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
