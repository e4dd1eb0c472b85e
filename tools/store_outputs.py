"""Run notebooks in a real Jupyter kernel and store their outputs, as a reader will see them on the repository page.

    python tools/store_outputs.py nbs/22_plots.ipynb nbs/23_explorer.ipynb
    python tools/store_outputs.py --all

Each notebook runs top to bottom in a fresh `python3` kernel from its own folder (what `jupyter nbconvert --to
notebook --execute --inplace` does, with the same engine, nbclient), except that cells flagged `#| slow` or
`#| gpu` (nbdev's flags, which the tests skip too) are not run and keep no output. Widget state is not stored (it
would hold every picture a widget showed); a widget that should show something on a page without a kernel gives a
picture of its own in its display data, as `mdmf.explorer.EpisodeExplorer` does. Then `nbdev_clean` tidies the file (it keeps outputs:
settings.ini has `clear_all = False`), and the size of what was stored is printed beside the budget that
tests/test_outputs.py checks. The notebooks read the example runs of `mdmf.examples.example_run` (trained models),
made under $MDMF_HOME on first use.

What a reader does not need is left out of the stored text, and only that: lines that native libraries (FFmpeg,
decord) write straight to the process's stderr when a test opens a broken video on purpose, and the machine's own
folder prefixes, written as `~` (the home folder) and `…` (a temporary folder), so that `/tmp/tmpab12cd/broken.mp4`
is stored as `…/broken.mp4`. tests/test_outputs.py checks that no such text is stored.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
from test_notebooks import execute  # noqa: E402  the same kernel as the tests
from test_outputs import NOTEBOOK_BUDGET, problems, stored_bytes  # noqa: E402  the same checks as the tests

# FFmpeg, decord
NATIVE_NOISE = re.compile(r'^\[(?:mov,mp4|\d\d:\d\d:\d\d\] \S+\.cc:\d+)|^\[\w+ @ 0x[0-9a-f]+\]')
_TMP = re.compile(re.escape(tempfile.gettempdir()) + r'/(?:tmp|pytest-of-)[\w.-]*(?:/|\b)')


def tidy(text: str) -> str:
    "Text as a reader should see it: no native libraries' log lines, no machine folder prefixes."
    lines = [l for l in text.splitlines(keepends=True) if not NATIVE_NOISE.match(l)]
    text = _TMP.sub('…/', ''.join(lines))
    return text.replace(str(Path.home()) + '/', '~/')


def _tidy_outputs(nb) -> None:
    for cell in nb.cells:
        outputs = []
        for o in cell.get('outputs', []):
            if o.output_type == 'stream':
                o.text = tidy(o.text)
                if not o.text.strip():
                    continue  # only noise
            for k, v in o.get('data', {}).items():
                if k.startswith('text/'):
                    o.data[k] = tidy(v)
            outputs.append(o)
        if cell.cell_type == 'code':
            cell.outputs = outputs


SKIPPED = re.compile(r'^\s*#\|\s*(slow|gpu)\s*$', re.M)  # nbdev flags of cells the tests skip


def store(path: Path, timeout: int = 1200) -> dict:
    "Execute `path` in place with its outputs; flagged cells are left unrun. Returns what was stored."
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop('widgets', None)  # the state of an earlier run
    held = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == 'code' and SKIPPED.search(cell.source):
            held[i], cell.source = cell.source, ''
    t0 = time.perf_counter()
    execute(nb, path.parent, timeout)
    for i, source in held.items():
        nb.cells[i].source, nb.cells[i].outputs = source, []
    _tidy_outputs(nb)
    nbformat.write(nb, path)
    subprocess.run(['nbdev_clean', '--fname', str(path)], check=True, cwd=ROOT)
    stored = nbformat.read(path, as_version=4)
    return dict(
        seconds=time.perf_counter() - t0,
        bytes=stored_bytes(stored),
        skipped=len(held),
        problems=problems(stored),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('notebooks', nargs='*', type=Path, help='notebooks to run and store')
    p.add_argument('--all', action='store_true', help='every numbered notebook and index.ipynb')
    p.add_argument('--timeout', type=int, default=1200, help='seconds one cell may take (default: 1200)')
    a = p.parse_args(argv)
    paths = a.notebooks + (
        (sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')) + [ROOT / 'index.ipynb']) if a.all else []
    )
    if not paths:
        p.error('name the notebooks to store, or pass --all')
    failed = 0
    for path in paths:
        r = store(path.resolve(), a.timeout)
        over = r['bytes'] > NOTEBOOK_BUDGET
        failed += over or bool(r['problems'])
        print(
            f'{path.name}: {r["seconds"]:.0f} s, {r["bytes"]:,} bytes stored (budget {NOTEBOOK_BUDGET:,})'
            + (f', {r["skipped"]} flagged cells not run' if r['skipped'] else '')
            + (' OVER BUDGET' if over else '')
            + ''.join(f'\n  {x}' for x in r['problems'])
        )
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
