"""Export the notebooks into the package, formatted: the one command to run after editing a notebook.

    python tools/export.py

In order: `ruff format`, `ruff check --select I --fix` and `ruff format` again on the notebooks and index.ipynb
(code formatted and imports sorted where they are written), then `nbdev_export` (the package, exactly as nbdev
writes it from the notebooks) and `nbdev_clean` (the notebooks and index.ipynb without execution noise).

The package is not formatted after the export: it must stay what `nbdev_export` writes. nbdev adds two things of
its own, which the formatter would change: one blank line between the cells it joins, and its `__all__` list.
Everything else in mdmf/ is the notebooks' formatted code; tests/test_repo.py checks exactly that. CI runs this
script, requires the checkout to be unchanged afterwards, then runs `ruff check` and `ruff format --check`
(settings in pyproject.toml).
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ['nbs', 'index.ipynb']


def run(*cmd: str):
    "Run one step from the repository root; stop with its output when it fails."
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f'{" ".join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}')


def ruff(*paths: str):
    "Format, sort the imports (a formatted file has every import on a line of its own), format what that moved."
    run(sys.executable, '-m', 'ruff', 'format', '--quiet', *paths)
    run(sys.executable, '-m', 'ruff', 'check', '--select', 'I', '--fix', '--quiet', *paths)
    run(sys.executable, '-m', 'ruff', 'format', '--quiet', *paths)


def main():
    ruff(*NOTEBOOKS)
    run('nbdev_export')
    run('nbdev_clean')
    run('nbdev_clean', '--fname', 'index.ipynb')
    print('formatted the notebooks and exported mdmf/ from them')


if __name__ == '__main__':
    main()
