"""Repository hygiene: README.md is made from index.ipynb; notebooks and the package agree."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import make_readme  # noqa: E402


def test_readme_matches_index():
    assert (ROOT / 'README.md').read_text(encoding='utf-8') == make_readme.render(), (
        'README.md differs from index.ipynb: run `python tools/make_readme.py`'
    )
    assert make_readme.main(['--check']) == 0, (
        'README pictures differ from index.ipynb: run `python tools/make_readme.py`'
    )
    assert make_readme.pictures_of(), 'README shows the episode picture of index.ipynb'


def test_readme_has_two_setup_commands():
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert 'pip install -e . && python -m mdmf.train' in text
    assert 'pip install -e ".[dev]" && python -m pytest tests' in text


def test_readme_is_finished():
    "No placeholder left, and every notebook of nbs/ is in README's table of notebooks."
    import re

    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert not re.search(r'TBD|TODO|\u27ea|XXX', text), 'README holds a placeholder'
    missing = [nb.stem for nb in (ROOT / 'nbs').glob('*.ipynb') if f'`{nb.stem}`' not in text]
    assert not missing, f'notebooks missing from README: {missing}'


def test_readme_commands_exist():
    "Every `python -m mdmf.X` README names is a module of the package, and its flags are flags of that module."
    import re
    import subprocess
    import sys

    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    for module, args in sorted(set(re.findall(r'python -m (mdmf\.\w+)([^`\n]*)', text))):
        flags = set(re.findall(r'(?<![\w-])--[a-z][\w-]*', args))
        if not flags:
            continue
        usage = subprocess.run(
            [sys.executable, '-m', module, '--help'], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert usage.returncode == 0, (module, usage.stderr[-500:])
        unknown = [f for f in flags if f not in usage.stdout and f.replace('--no-', '--') not in usage.stdout]
        assert not unknown, f'README gives {module} flags it does not have: {unknown}'


def test_splits_shipped():
    for name, n in [
        ('hmdb51', 4280 + 1194 + 1292),
        ('ucf101', 9154 + 1421 + 2745),
        ('kinetics100', 10000),
        ('ssv2_small', 10000),
        ('ssv2_full', 67013 + 1926 + 2857),
    ]:
        total = sum(
            len((ROOT / 'data/splits' / name / f'{s}.txt').read_text().splitlines())
            for s in ('train', 'val', 'test')
        )
        assert total == n, name


def test_plain_install_ships_the_splits(tmp_path):
    "A non-editable install carries the split lists as package data and finds them there."
    site = tmp_path / 'site'
    subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'install',
            '-q',
            '--no-deps',
            '--no-build-isolation',
            '--target',
            str(site),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        'import mdmf.datasets as e; d = e.splits_dir("hmdb51"); '
        'print(d); print(len(e.read_split(d / "test.txt")))'
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={'PYTHONPATH': str(site), 'PATH': '/usr/bin:/bin'},
        check=True,
    ).stdout.split()
    assert out[0].startswith(str(site)), out
    assert out[1] == '1292'


def _imports(path: Path) -> set:
    "The mdmf modules a module imports (absolute `mdmf.x` or relative `.x`), anywhere in its code."
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                names.add(node.module.split('.')[0])
            elif node.level == 0 and node.module and node.module.startswith('mdmf.'):
                names.add(node.module.split('.')[1])
            elif node.level == 0 and node.module == 'mdmf':
                names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.split('.')[1] for a in node.names if a.name.startswith('mdmf.'))
    return names


def _modules() -> dict:
    pkg = ROOT / 'mdmf'
    mods = {p.stem: p for p in pkg.glob('*.py') if not p.stem.startswith('_')}
    return {m: sorted(_imports(p) & set(mods) - {m}) for m, p in mods.items()}


def test_no_import_cycle():
    "The package's import graph (imports inside functions included) has no cycle."
    graph, state, path = _modules(), {}, []

    def visit(m):
        state[m] = 'open'
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n)
        state[m] = 'done'
        path.pop()

    for m in graph:
        if m not in state:
            visit(m)


def test_imports_follow_the_notebook_order():
    "A module imports only modules exported by earlier notebooks: data flows one way (two notebooks sharing a number, by name)."
    import re

    order = {}
    for nb in sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')):
        m = re.search(r'#\|\s*default_exp\s+(\w+)', nb.read_text(encoding='utf-8'))
        if m:
            order[m.group(1)] = (int(nb.name.split('_')[0]), nb.stem)
    late = [
        (m, n)
        for m, deps in _modules().items()
        for n in deps
        if m in order and n in order and order[n] >= order[m]
    ]
    assert not late, f'modules importing from later notebooks: {late}'


MODULE_LINES = 800  # counted on the formatted package (ruff format, pyproject.toml)
CELL_CODE_LINES = 100  # code lines of one notebook cell, formatted, comments and blank lines not counted


def test_no_module_is_too_long():
    "No module of the package over MODULE_LINES formatted lines (one concern per module)."
    long = {
        p.name: n
        for p in (ROOT / 'mdmf').glob('*.py')
        if not p.name.startswith('_')
        if (n := len(p.read_text(encoding='utf-8').splitlines())) > MODULE_LINES
    }
    assert not long, long


def test_code_is_formatted_and_lint_free():
    "`ruff check` and `ruff format --check` pass on the notebooks, the tests and the tools; `ruff check` on the package."
    import subprocess
    import sys

    paths = ['mdmf', 'nbs', 'index.ipynb', 'tests', 'tools']
    for cmd in (['check'], ['format', '--check']):
        r = subprocess.run(
            [sys.executable, '-m', 'ruff', *cmd, *paths], cwd=ROOT, capture_output=True, text=True
        )
        assert r.returncode == 0, (
            f'ruff {" ".join(cmd)} (run `python tools/export.py` after editing):\n{r.stdout}{r.stderr}'
        )


def test_no_notebook_cell_is_too_long():
    "Cells a reader can hold in their head: at most CELL_CODE_LINES lines of code."
    import json

    long = []
    for nb in sorted((ROOT / 'nbs').glob('*.ipynb')) + [ROOT / 'index.ipynb']:
        for c in json.loads(nb.read_text(encoding='utf-8'))['cells']:
            src = ''.join(c['source']).splitlines()
            code = [l for l in src if l.strip() and not l.lstrip().startswith('#')]
            if c['cell_type'] == 'code' and len(code) > CELL_CODE_LINES:
                long.append((nb.name, len(code), src[0][:60]))
    assert not long, long


def test_every_notebook_opens_in_colab():
    "Each notebook has the current Colab badge and install cell (`python tools/colab_cells.py` writes them)."
    import importlib.util

    spec = importlib.util.spec_from_file_location('colab_cells', ROOT / 'tools' / 'colab_cells.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(['--check']) == 0, 'run `python tools/colab_cells.py && nbdev_clean`'


def _code_lines(text: str) -> list:
    "A module's lines without blank lines and without nbdev's `__all__` statement (nbdev writes both its own way)."
    import ast

    tree = ast.parse(text)
    names = [
        n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == '__all__'
    ]
    skip = {i for n in names for i in range(n.lineno, n.end_lineno + 1)}
    return [l for i, l in enumerate(text.splitlines(), 1) if l.strip() and i not in skip]


def test_the_package_is_the_notebooks_formatted_code(tmp_path):
    "Formatting mdmf/ changes nothing but nbdev's own lines: every line of code in it is formatted in its notebook."
    import shutil
    import subprocess
    import sys

    modules = [p for p in sorted((ROOT / 'mdmf').glob('*.py')) if p.name != '_modidx.py']
    for p in modules:
        shutil.copy(p, tmp_path / p.name)
    cmd = [
        sys.executable,
        '-m',
        'ruff',
        'format',
        '--quiet',
        '--config',
        str(ROOT / 'pyproject.toml'),
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True)
    differ = [
        p.name for p in modules if _code_lines(p.read_text()) != _code_lines((tmp_path / p.name).read_text())
    ]
    assert not differ, f'code in these modules is not formatted (run `python tools/export.py`): {differ}'
