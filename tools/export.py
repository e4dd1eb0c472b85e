"""Export the notebooks into the package, formatted: the one command to run after editing a notebook.

    python tools/export.py

In order: `ruff format` and `ruff check --select I --fix` on the notebooks and index.ipynb (imports sorted, code
formatted where it is written), `nbdev_export` (the package from the notebooks), the same two on the package
(nbdev joins a notebook's cells and adds its own lines, which the formatter settles), then `nbdev_clean` on the
notebooks and index.ipynb. CI runs it and requires the checkout to be unchanged afterwards, then runs
`ruff check` and `ruff format --check` (settings in pyproject.toml).
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
    ruff('mdmf')
    run('nbdev_clean')
    run('nbdev_clean', '--fname', 'index.ipynb')
    print('exported and formatted: mdmf/ from nbs/')


if __name__ == '__main__':
    main()
