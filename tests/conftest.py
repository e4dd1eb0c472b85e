import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('MPLBACKEND', 'Agg')
# Tiny tensors: one thread per test process is faster than two threads fighting over two cores.
os.environ.setdefault('OMP_NUM_THREADS', '1')
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
