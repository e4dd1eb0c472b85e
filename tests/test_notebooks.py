"""Every notebook runs top to bottom (cells flagged `slow` or `gpu` are skipped), so pytest counts them."""
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')) + [ROOT / 'index.ipynb']


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(nb):
    ok, _secs = run_notebook(nb, skip_flags=['slow', 'gpu'], do_print=False, showerr=True)
    assert ok, f'{nb.name} failed; its error is printed above'
