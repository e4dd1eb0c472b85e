"""Write README.md from index.ipynb: markdown cells as they are, code cells as fenced Python.

Cells marked `#| hide` are left out, as are nbdev directive lines. `--check` exits 1 when
README.md differs from what index.ipynb gives.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source(cell):
    src = cell['source']
    return ''.join(src) if isinstance(src, list) else src


def render(nb_path=ROOT / 'index.ipynb') -> str:
    nb = json.loads(Path(nb_path).read_text(encoding='utf-8'))
    parts = []
    for cell in nb['cells']:
        text = _source(cell).strip('\n')
        lines = text.splitlines()
        if any(l.strip().replace(' ', '') in ('#|hide', '#|hide_input') for l in lines):
            continue
        lines = [l for l in lines if not l.lstrip().startswith('#|')]
        text = '\n'.join(lines).strip('\n')
        if not text:
            continue
        if cell['cell_type'] == 'markdown':
            parts.append(text)
        elif cell['cell_type'] == 'code':
            parts.append('```python\n' + text + '\n```')
    return '\n\n'.join(parts) + '\n'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--check', action='store_true', help='only check that README.md is up to date')
    args = ap.parse_args(argv)
    text = render()
    readme = ROOT / 'README.md'
    if args.check:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            print('README.md is out of date: run `python tools/make_readme.py`', file=sys.stderr)
            return 1
        return 0
    readme.write_text(text, encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
