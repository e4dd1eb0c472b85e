"""Every notebook runs top to bottom in a real Jupyter kernel, as JupyterLab and Colab run it (cells flagged `slow`,
`gpu` or `eval: false` are skipped), and shows pictures, not `<Figure ...>` text."""

import re
import tempfile
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from test_outputs import draws, pictures

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')) + [ROOT / 'index.ipynb']
SKIPPED = re.compile(r'^\s*#\|\s*(slow|gpu|eval:\s*false)\s*$', re.M)
FIGURE_TEXT = re.compile(r'^<(?:matplotlib\.figure\.)?Figure( size|\b)')


def figure_texts(nb) -> list:
    "Outputs that show a figure's repr instead of the figure (a picture that did not display)."
    return [
        c.source.splitlines()[0][:60]
        for c in nb.cells
        if c.cell_type == 'code'
        for o in c.get('outputs', [])
        if 'image/png' not in o.get('data', {})
        and FIGURE_TEXT.match(''.join(o.get('data', {}).get('text/plain', '')))
    ]


def execute(nb, folder: Path, timeout: int = 900):
    "Run `nb` in a fresh python3 kernel started in `folder`, keeping its outputs (cells that raise raise here)."
    # The kernel talks over Unix sockets, not TCP ports: kernels started at once by parallel test workers
    # cannot pick the same port and end up waiting on each other's messages.
    with tempfile.TemporaryDirectory() as sockets:
        km = KernelManager(kernel_name='python3', transport='ipc', ip=str(Path(sockets) / 'kernel'))
        # widget state is tracked while running (nbclient's Output-widget hook needs it) and dropped afterwards
        NotebookClient(
            nb, km=km, timeout=timeout, store_widget_state=True, resources={'metadata': {'path': str(folder)}}
        ).execute()
    nb.metadata.pop('widgets', None)
    return nb


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    # the kernel draws inline, as in JupyterLab (conftest sets Agg)
    monkeypatch.delenv('MPLBACKEND', raising=False)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == 'code' and SKIPPED.search(cell.source):
            cell.source = ''
    # a cell that raises fails the test with its traceback (nbclient's CellExecutionError)
    execute(nb, path.parent)
    assert not figure_texts(nb), f'{path.name}: figures shown as text, not pictures: {figure_texts(nb)}'
    assert pictures(nb) or not draws(nb), f'{path.name} draws, but no picture was displayed'
