"""Stored outputs: what a reader sees on the repository page, in nbviewer or Colab before running anything.

A notebook that draws keeps its pictures; no stored output is an error, a traceback or the text of a figure that
did not display (`<Figure size ... with N Axes>`); stored outputs stay small enough to review. Every picture is
legible at its stored size (drawn by `mdmf.core.new_figure`, whose PNG records its smallest letters: at least 9 px;
at least 400 px on its short side unless it is a thumbnail strip); every cell that prints or ends in a value keeps
what it showed; no stored text holds a machine's folders, native libraries' log lines, the machine's load, or a
line repeated. Outputs are stored by
`python tools/store_outputs.py NOTEBOOK...` (a real kernel, then nbdev_clean), which keeps them on `nbdev_clean`.
"""

import ast
import base64
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

# Notebooks whose outputs were stored before the legibility and kept-value checks below existed, and that are
# being changed elsewhere: those two checks skip them until they are stored again (then remove the name here).
RESTORE = []  # none: every notebook's outputs were stored with these checks in place

NOTEBOOK_BUDGET = 1_000_000  # bytes of stored outputs in one notebook, widget state included
PICTURE_BUDGET = 200_000  # bytes of one stored picture (base64, as in the file)

# code that draws
DRAWS = re.compile(r'\bplt\.|\bplot_\w+\(|\.imshow\(|EpisodeExplorer\(|display\(Image|new_figure\(')
FIGURE_TEXT = re.compile(r'^<(?:matplotlib\.figure\.)?Figure( size|\b)')


def _nb(path: Path) -> dict:
    return json.loads(path.read_text(encoding='utf-8'))


def _code(nb: dict) -> list:
    return [c for c in nb['cells'] if c['cell_type'] == 'code']


def _text(x) -> str:
    return ''.join(x) if isinstance(x, list) else (x or '')


def draws(nb: dict) -> bool:
    "Whether a notebook's own demo code (not its exported definitions) draws a picture."
    return any(
        DRAWS.search(_text(c['source']))
        for c in _code(nb)
        if not _text(c['source']).lstrip().startswith('#| export')
    )


def pictures(nb: dict) -> list:
    "The stored pictures (base64 strings) of a notebook."
    return [
        v
        for c in _code(nb)
        for o in c.get('outputs', [])
        for k, v in o.get('data', {}).items()
        if k.startswith('image/')
    ]


def problems(nb: dict) -> list:
    "Stored outputs a reader should not see: errors, tracebacks, figures shown as text."
    out = []
    for i, c in enumerate(_code(nb)):
        for o in c.get('outputs', []):
            data = o.get('data', {})
            if o['output_type'] == 'error':
                out.append(f'code cell {i}: error {o.get("ename")}: {o.get("evalue")}')
            if 'Traceback (most recent call last)' in _text(o.get('text')):
                out.append(f'code cell {i}: a traceback in {o.get("name")}')
            if FIGURE_TEXT.match(_text(data.get('text/plain'))) and not any(
                k.startswith('image/') for k in data
            ):
                out.append(f'code cell {i}: a figure shown as text: {_text(data["text/plain"])[:60]}')
    return out


MIN_TEXT_PX, MIN_SIDE_PX = 9, 400  # the smallest letters and the shortest side of a stored picture, in pixels


def picture_problems(nb: dict) -> list:
    "Stored pictures a reader cannot read at their size: letters under 9 px, a short side under 400 px (not a strip)."
    from mdmf.core import png_facts, png_size

    out = []
    for i, c in enumerate(_code(nb)):
        for o in c.get('outputs', []):
            if 'image/png' not in o.get('data', {}):
                continue
            png = base64.b64decode(_text(o['data']['image/png']))
            (w, h), facts = png_size(png), png_facts(png)
            if not facts:
                out.append(
                    f'code cell {i}: a {w}x{h} picture not drawn by mdmf.core.new_figure (its '
                    'letters cannot be checked)'
                )
                continue
            if facts['text_px'] is not None and facts['text_px'] < MIN_TEXT_PX:
                out.append(f'code cell {i}: letters of {facts["text_px"]} px (at least {MIN_TEXT_PX})')
            if min(w, h) < MIN_SIDE_PX and not facts['strip']:
                out.append(
                    f'code cell {i}: {w}x{h} px, under {MIN_SIDE_PX} px on its short side and not a strip'
                )
    return out


# cells that are not run when outputs are stored
FLAGGED = re.compile(r'^\s*#\|\s*(slow|gpu|eval:\s*false)\s*$', re.M)


def shows_something(source: str) -> bool:
    "Whether a cell prints at its top level or ends in an expression that is not a call (a value Jupyter shows)."
    if FLAGGED.search(source):
        return False
    try:
        body = ast.parse(
            '\n'.join(l for l in source.splitlines() if not l.lstrip().startswith(('%', '!')))
        ).body
    except SyntaxError:
        return False
    prints = any(
        isinstance(s, ast.Expr)
        and isinstance(s.value, ast.Call)
        and getattr(s.value.func, 'id', '') == 'print'
        for s in body
    )
    last = body[-1] if body else None
    value = (
        isinstance(last, ast.Expr)
        and not isinstance(last.value, (ast.Call, ast.Constant, ast.Await))
        and not source.rstrip().endswith(';')
    )
    return prints or value


def silent_cells(nb: dict) -> list:
    "Cells that print or end in a value but store no output."
    return [
        f'code cell {i}: {_text(c["source"]).strip().splitlines()[-1][:60]!r}'
        for i, c in enumerate(_code(nb))
        if shows_something(_text(c['source'])) and not c.get('outputs')
    ]


MACHINE = re.compile(r'(?<![\w.~])(?:/root/|/home/\w|/Users/\w|/tmp/|/var/folders/|[A-Z]:\\\\Users)')
NOISE = re.compile(r'video_reader\.cc|^\[mov,mp4|^\[\w+ @ 0x[0-9a-f]+\]', re.M)


def text_problems(nb: dict) -> list:
    "Stored text a reader should not see: machine folders, native libraries' log lines, load, a line twice in a row."
    out = []
    for i, c in enumerate(_code(nb)):
        for o in c.get('outputs', []):
            texts = [_text(o.get('text'))] + [
                _text(v) for k, v in o.get('data', {}).items() if k.startswith('text/')
            ]
            for t in texts:
                if m := MACHINE.search(t):
                    out.append(f'code cell {i}: a machine folder {t[m.start() : m.start() + 40]!r}')
                if m := NOISE.search(t):
                    out.append(f'code cell {i}: native log or load text {t[m.start() : m.start() + 40]!r}')
                lines = [l for l in t.splitlines() if l.strip()]
                if any(a == b and len(a) > 8 for a, b in zip(lines, lines[1:])):
                    out.append(f'code cell {i}: a line printed twice in a row')
    return out


def stored_bytes(nb: dict) -> int:
    return sum(len(json.dumps(o)) for c in _code(nb) for o in c.get('outputs', [])) + len(
        json.dumps(nb.get('metadata', {}).get('widgets', {}))
    )


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_no_error_or_figure_text_is_stored(path):
    bad = problems(_nb(path))
    assert not bad, (
        f'{path.name} stores outputs a reader should not see (run it again and store it): ' + '; '.join(bad)
    )


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_a_notebook_that_draws_keeps_its_pictures(path):
    nb = _nb(path)
    if path.name in PENDING:
        pytest.skip(f'{path.name}: outputs not stored yet (PENDING)')
    if draws(nb):
        assert pictures(nb), (
            f'{path.name} draws but stores no picture: run `python tools/store_outputs.py nbs/{path.name}`'
        )


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_stored_pictures_are_legible(path):
    if path.name in PENDING + RESTORE:
        pytest.skip(f'{path.name}: outputs stored before this check (RESTORE)')
    bad = picture_problems(_nb(path))
    assert not bad, f'{path.name}: draw with mdmf.core.new_figure and store it again: ' + '; '.join(bad)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_every_picture_is_read(path):
    "A stored picture is followed (within two cells) by a markdown paragraph starting '**Reading:**'."
    cells = _nb(path)['cells']
    unread = [
        i
        for i, c in enumerate(cells)
        if c['cell_type'] == 'code'
        and pictures(dict(cells=[c]))
        and not any(
            x['cell_type'] == 'markdown' and _text(x['source']).startswith('**Reading:**')
            for x in cells[i + 1 : i + 3]
        )
    ]
    assert not unread, f'{path.name}: pictures without a reading under them (cells {unread})'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_cells_that_show_something_keep_it(path):
    if path.name in PENDING + RESTORE:
        pytest.skip(f'{path.name}: outputs stored before this check (RESTORE)')
    bad = silent_cells(_nb(path))
    assert not bad, f'{path.name} stores no output for cells that print or end in a value: ' + '; '.join(bad)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_stored_text_holds_no_machine_detail(path):
    bad = text_problems(_nb(path))
    assert not bad, f'{path.name} (store it with tools/store_outputs.py, which tidies these): ' + '; '.join(
        bad
    )


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_small(path):
    nb = _nb(path)
    size = stored_bytes(nb)
    assert size <= NOTEBOOK_BUDGET, (
        f'{path.name} stores {size:,} bytes of outputs, over the budget of {NOTEBOOK_BUDGET:,}'
    )
    big = [len(p) for p in pictures(nb) if len(p) > PICTURE_BUDGET]
    assert not big, (
        f'{path.name} stores pictures of {big} bytes, over {PICTURE_BUDGET:,} each: draw them smaller'
    )


def test_pending_names_exist():
    names = {p.name for p in NOTEBOOKS}
    assert not set(PENDING) - names, (
        f'PENDING names notebooks that do not exist: {sorted(set(PENDING) - names)}'
    )
    assert not set(RESTORE) - names, (
        f'RESTORE names notebooks that do not exist: {sorted(set(RESTORE) - names)}'
    )


def test_the_legibility_and_text_checks_catch_what_they_should():
    from mdmf.core import figure_png, new_figure

    def nb_of(*outs, source='x'):
        return dict(cells=[dict(cell_type='code', source=[source], outputs=list(outs))])

    def shown(fig):
        return dict(
            output_type='display_data', data={'image/png': base64.b64encode(figure_png(fig)).decode()}
        )

    good = new_figure(5, 4)
    good.subplots().set_title('title')
    small = new_figure(5, 4)
    small.subplots().set_title('tiny', fontsize=5)
    strip = new_figure(6, 1, strip=True)
    strip.subplots().set_title('frames')
    assert not picture_problems(nb_of(shown(good), shown(strip)))
    assert 'letters of 6.9 px' in picture_problems(nb_of(shown(small)))[0]
    short = new_figure(6, 1)
    short.set_size_inches(6, 1)
    short.strip = False
    assert 'short side' in picture_problems(nb_of(shown(short)))[0]
    assert shows_something('x = 1\nx') and shows_something('print(1)') and shows_something('a.b[0]')
    assert not shows_something('x = f()') and not shows_something('f(x)') and not shows_something('x;')
    assert not shows_something('#| slow\nprint(1)') and not shows_something('if a: print(1)')
    assert silent_cells(nb_of(source='print(3)')) and not silent_cells(
        nb_of(dict(output_type='stream', text='3'), source='print(3)')
    )
    stream = lambda t: dict(output_type='stream', name='stderr', text=t)
    assert (
        len(text_problems(nb_of(stream('/tmp/tmpx/broken.mp4\n[mov,mp4,m4a @ 0x55] moov atom not found'))))
        == 2
    )
    assert text_problems(nb_of(stream('epoch 1 done\nepoch 1 done\n')))
    assert not text_problems(nb_of(stream('…/broken.mp4 in ~/.cache/mdmf, run with tmp/x\n')))


def test_nbdev_clean_keeps_the_pictures():
    settings = (ROOT / 'settings.ini').read_text()
    assert re.search(r'^clear_all\s*=\s*False', settings, re.M), (
        'settings.ini must keep outputs: clear_all = False'
    )
    done = [p for p in NOTEBOOKS if p.name not in PENDING and pictures(_nb(p))]
    assert done, 'no notebook stores a picture yet'
    nb = _nb(done[0])
    cleaned = copy.deepcopy(nb)
    clean_nb(cleaned, clear_all=False)
    assert pictures(cleaned) == pictures(nb) and cleaned == nb  # a stored notebook is already clean


def test_the_checks_catch_what_they_should():
    cell = lambda *outs: dict(cell_type='code', source=['plot_episode(ep)'], outputs=list(outs))
    figure = dict(output_type='execute_result', data={'text/plain': ['<Figure size 640x480 with 1 Axes>']})
    picture = dict(
        output_type='display_data', data={'image/png': 'iVBOR', 'text/plain': ['<Picture size 6x4>']}
    )
    error = dict(output_type='error', ename='SystemExit', evalue='2', traceback=[])
    assert draws(dict(cells=[cell()])) and not pictures(dict(cells=[cell(figure)]))
    assert len(problems(dict(cells=[cell(figure, error)]))) == 2 and not problems(dict(cells=[cell(picture)]))


def test_store_outputs_runs_a_notebook_in_a_kernel(tmp_path):
    "tools/store_outputs.py: outputs stored and clean, flagged cells left unrun, a bare Figure caught."
    import nbformat

    sys.path.insert(0, str(ROOT / 'tools'))
    from store_outputs import store

    nb = nbformat.v4.new_notebook(
        metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell('print(6 * 7)'),
        nbformat.v4.new_code_cell('#| slow\nprint("minutes")'),
        nbformat.v4.new_code_cell('from matplotlib.figure import Figure\nFigure()'),
    ]
    path = tmp_path / 'nb.ipynb'
    nbformat.write(nb, path)
    r = store(path)
    stored = _nb(path)
    cells = _code(stored)
    assert _text(cells[0]['outputs'][0]['text']) == '42\n' and cells[1]['outputs'] == [] and r['skipped'] == 1
    assert '#| slow' in _text(cells[1]['source'])  # the flagged cell's source is kept
    assert len(r['problems']) == 1 and 'figure shown as text' in r['problems'][0]
    assert all(c['execution_count'] is None for c in cells)  # nbdev_clean ran


OUTSIDE = re.compile(r'METHOD\.md|/work/|/root/|~/\.claude')  # files that are not part of the repository


def test_nothing_refers_to_files_outside_the_repository():
    "Notebook sources, README, index and the stored studies name no file outside the repository."
    paths = (
        sorted((ROOT / 'nbs').glob('*.ipynb'))
        + [ROOT / 'index.ipynb', ROOT / 'README.md']
        + sorted((ROOT / 'results').glob('**/*.md'))
    )
    bad = []
    for p in paths:
        texts = (
            [_text(c['source']) for c in _nb(p)['cells']]
            if p.suffix == '.ipynb'
            else [p.read_text(encoding='utf-8')]
        )
        bad += [f'{p.relative_to(ROOT)}: {m.group()}' for t in texts for m in OUTSIDE.finditer(t)]
    assert not bad, 'references outside the repository: ' + '; '.join(bad)


def test_colab_setup_can_run_twice():
    "nbs/colab.ipynb clones only when the clone is absent and changes to an absolute folder."
    setup = next(
        _text(c['source'])
        for c in _code(_nb(ROOT / 'nbs' / 'colab.ipynb'))
        if 'git clone' in _text(c['source'])
    )
    lines = setup.splitlines()
    clone = next(i for i, l in enumerate(lines) if 'git clone' in l)
    assert lines[clone].startswith((' ', '\t')) and lines[clone - 1].lstrip().startswith(
        'if not os.path.isdir('
    ), setup
    assert any(re.match(r'%cd /\S+', l) for l in lines), (
        f'the setup cell changes to a relative folder:\n{setup}'
    )
