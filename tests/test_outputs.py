"""Stored outputs: what a reader sees on the repository page, in nbviewer or Colab before running anything.

A notebook that draws keeps its pictures; no stored output is an error, a traceback or the text of a figure that
did not display (`<Figure size ... with N Axes>`); stored outputs stay small enough to review. Outputs are stored by
`python tools/store_outputs.py NOTEBOOK...` (a real kernel, then nbdev_clean), which keeps them on `nbdev_clean`.
"""
import copy
import json
import re
import sys
from pathlib import Path

import pytest
from nbdev.clean import clean_nb

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')) + [ROOT / 'index.ipynb']

# Notebooks whose outputs have not been stored yet: exempt from "a notebook that draws keeps a picture" (every other
# check applies). Run `python tools/store_outputs.py nbs/NAME.ipynb` and remove the name here; the list ends empty.
PENDING = []  # notebooks whose outputs are not stored yet: none

NOTEBOOK_BUDGET = 1_000_000  # bytes of stored outputs in one notebook, widget state included
PICTURE_BUDGET = 200_000  # bytes of one stored picture (base64, as in the file)

DRAWS = re.compile(r'\bplt\.|\bplot_\w+\(|\.imshow\(|EpisodeExplorer\(|display\(Image|new_figure\(')  # code that draws
FIGURE_TEXT = re.compile(r'^<(?:matplotlib\.figure\.)?Figure( size|\b)')


def _nb(path: Path) -> dict: return json.loads(path.read_text(encoding='utf-8'))


def _code(nb: dict) -> list: return [c for c in nb['cells'] if c['cell_type'] == 'code']


def _text(x) -> str: return ''.join(x) if isinstance(x, list) else (x or '')


def draws(nb: dict) -> bool:
    "Whether a notebook's own demo code (not its exported definitions) draws a picture."
    return any(DRAWS.search(_text(c['source'])) for c in _code(nb) if not _text(c['source']).lstrip().startswith('#| export'))


def pictures(nb: dict) -> list:
    "The stored pictures (base64 strings) of a notebook."
    return [v for c in _code(nb) for o in c.get('outputs', []) for k, v in o.get('data', {}).items()
            if k.startswith('image/')]


def problems(nb: dict) -> list:
    "Stored outputs a reader should not see: errors, tracebacks, figures shown as text."
    out = []
    for i, c in enumerate(_code(nb)):
        for o in c.get('outputs', []):
            data = o.get('data', {})
            if o['output_type'] == 'error': out.append(f'code cell {i}: error {o.get("ename")}: {o.get("evalue")}')
            if 'Traceback (most recent call last)' in _text(o.get('text')):
                out.append(f'code cell {i}: a traceback in {o.get("name")}')
            if FIGURE_TEXT.match(_text(data.get('text/plain'))) and not any(k.startswith('image/') for k in data):
                out.append(f'code cell {i}: a figure shown as text: {_text(data["text/plain"])[:60]}')
    return out


def stored_bytes(nb: dict) -> int:
    return sum(len(json.dumps(o)) for c in _code(nb) for o in c.get('outputs', [])) + \
        len(json.dumps(nb.get('metadata', {}).get('widgets', {})))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_no_error_or_figure_text_is_stored(path):
    bad = problems(_nb(path))
    assert not bad, f'{path.name} stores outputs a reader should not see (run it again and store it): ' + '; '.join(bad)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_a_notebook_that_draws_keeps_its_pictures(path):
    nb = _nb(path)
    if path.name in PENDING: pytest.skip(f'{path.name}: outputs not stored yet (PENDING)')
    if draws(nb):
        assert pictures(nb), (f'{path.name} draws but stores no picture: run `python tools/store_outputs.py '
                              f'nbs/{path.name}`')


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_small(path):
    nb = _nb(path)
    size = stored_bytes(nb)
    assert size <= NOTEBOOK_BUDGET, f'{path.name} stores {size:,} bytes of outputs, over the budget of {NOTEBOOK_BUDGET:,}'
    big = [len(p) for p in pictures(nb) if len(p) > PICTURE_BUDGET]
    assert not big, f'{path.name} stores pictures of {big} bytes, over {PICTURE_BUDGET:,} each: draw them smaller'


def test_pending_names_exist():
    names = {p.name for p in NOTEBOOKS}
    assert not set(PENDING) - names, f'PENDING names notebooks that do not exist: {sorted(set(PENDING) - names)}'


def test_nbdev_clean_keeps_the_pictures():
    settings = (ROOT / 'settings.ini').read_text()
    assert re.search(r'^clear_all\s*=\s*False', settings, re.M), 'settings.ini must keep outputs: clear_all = False'
    done = [p for p in NOTEBOOKS if p.name not in PENDING and pictures(_nb(p))]
    assert done, 'no notebook stores a picture yet'
    nb = _nb(done[0])
    cleaned = copy.deepcopy(nb)
    clean_nb(cleaned, clear_all=False)
    assert pictures(cleaned) == pictures(nb) and cleaned == nb  # a stored notebook is already clean


def test_the_checks_catch_what_they_should():
    cell = lambda *outs: dict(cell_type='code', source=['plot_episode(ep)'], outputs=list(outs))
    figure = dict(output_type='execute_result', data={'text/plain': ['<Figure size 640x480 with 1 Axes>']})
    picture = dict(output_type='display_data', data={'image/png': 'iVBOR', 'text/plain': ['<Picture size 6x4>']})
    error = dict(output_type='error', ename='SystemExit', evalue='2', traceback=[])
    assert draws(dict(cells=[cell()])) and not pictures(dict(cells=[cell(figure)]))
    assert len(problems(dict(cells=[cell(figure, error)]))) == 2 and not problems(dict(cells=[cell(picture)]))


def test_store_outputs_runs_a_notebook_in_a_kernel(tmp_path):
    "tools/store_outputs.py: outputs stored and clean, flagged cells left unrun, a bare Figure caught."
    import nbformat
    sys.path.insert(0, str(ROOT / 'tools'))
    from store_outputs import store
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell('print(6 * 7)'), nbformat.v4.new_code_cell('#| slow\nprint("minutes")'),
                nbformat.v4.new_code_cell('from matplotlib.figure import Figure\nFigure()')]
    path = tmp_path / 'nb.ipynb'
    nbformat.write(nb, path)
    r = store(path)
    stored = _nb(path)
    cells = _code(stored)
    assert _text(cells[0]['outputs'][0]['text']) == '42\n' and cells[1]['outputs'] == [] and r['skipped'] == 1
    assert '#| slow' in _text(cells[1]['source'])  # the flagged cell's source is kept
    assert len(r['problems']) == 1 and 'figure shown as text' in r['problems'][0]
    assert all(c['execution_count'] is None for c in cells)  # nbdev_clean ran
