"""Run notebooks in a real Jupyter kernel and store their outputs, as a reader will see them on the repository page.

    python tools/store_outputs.py nbs/22_plots.ipynb nbs/23_explorer.ipynb
    python tools/store_outputs.py --all

Each notebook runs top to bottom in a fresh `python3` kernel from its own folder (what `jupyter nbconvert --to
notebook --execute --inplace` does, with the same engine, nbclient), except that cells flagged `#| slow` or
`#| gpu` (nbdev's flags, which the tests skip too) are not run and keep no output. Widget state is not stored (it
would hold every picture a widget showed); a widget that should show something on a page without a kernel gives a
picture of its own in its display data, as `mdmf.explorer.EpisodeExplorer` does. Then `nbdev_clean` tidies the file (it keeps outputs:
settings.ini has `clear_all = False`), and the size of what was stored is printed beside the budget that
tests/test_outputs.py checks. The notebooks read the example runs of `mdmf.inspect.example_run` (trained models),
made under $MDMF_HOME on first use.
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
from test_notebooks import execute  # noqa: E402  the same kernel as the tests
from test_outputs import NOTEBOOK_BUDGET, problems, stored_bytes  # noqa: E402  the same checks as the tests

SKIPPED = re.compile(r'^\s*#\|\s*(slow|gpu)\s*$', re.M)  # nbdev flags of cells the tests skip


def store(path: Path, timeout: int = 1200) -> dict:
    "Execute `path` in place with its outputs; flagged cells are left unrun. Returns what was stored."
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop('widgets', None)  # the state of an earlier run
    held = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == 'code' and SKIPPED.search(cell.source): held[i], cell.source = cell.source, ''
    t0 = time.perf_counter()
    execute(nb, path.parent, timeout)
    for i, source in held.items(): nb.cells[i].source, nb.cells[i].outputs = source, []
    nbformat.write(nb, path)
    subprocess.run(['nbdev_clean', '--fname', str(path)], check=True, cwd=ROOT)
    stored = nbformat.read(path, as_version=4)
    return dict(seconds=time.perf_counter() - t0, bytes=stored_bytes(stored), skipped=len(held), problems=problems(stored))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('notebooks', nargs='*', type=Path, help='notebooks to run and store')
    p.add_argument('--all', action='store_true', help='every numbered notebook and index.ipynb')
    p.add_argument('--timeout', type=int, default=1200, help='seconds one cell may take (default: 1200)')
    a = p.parse_args(argv)
    paths = a.notebooks + ((sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')) + [ROOT / 'index.ipynb']) if a.all else [])
    if not paths: p.error('name the notebooks to store, or pass --all')
    failed = 0
    for path in paths:
        r = store(path.resolve(), a.timeout)
        over = r['bytes'] > NOTEBOOK_BUDGET
        failed += over or bool(r['problems'])
        print(f'{path.name}: {r["seconds"]:.0f} s, {r["bytes"]:,} bytes stored (budget {NOTEBOOK_BUDGET:,})'
              + (f', {r["skipped"]} flagged cells not run' if r['skipped'] else '') + (' OVER BUDGET' if over else '')
              + ''.join(f'\n  {x}' for x in r['problems']))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
