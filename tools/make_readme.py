"""Write README.md from index.ipynb: markdown cells as they are, code cells as fenced Python followed by the
pictures they stored (written to docs/readme/, since GitHub shows no inline images in a README).

Cells marked `#| hide` are left out, as are nbdev directive lines. `--check` exits 1 when
README.md or its pictures differ from what index.ipynb gives.
"""

import argparse
import base64
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURES = Path('docs') / 'readme'  # relative to ROOT


def _source(cell):
    src = cell['source']
    return ''.join(src) if isinstance(src, list) else src


def pictures_of(nb_path=ROOT / 'index.ipynb') -> dict:
    "The PNG files README shows: {path relative to ROOT: bytes}, one per stored picture of a shown code cell."
    return render_all(nb_path)[1]


def render(nb_path=ROOT / 'index.ipynb') -> str:
    return render_all(nb_path)[0]


def render_all(nb_path=ROOT / 'index.ipynb') -> tuple:  # (README text, {picture path: bytes})
    nb = json.loads(Path(nb_path).read_text(encoding='utf-8'))
    parts, files = [], {}
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
            for out in cell.get('outputs', []):
                png = out.get('data', {}).get('image/png')
                if png is None:
                    continue
                path = (PICTURES / f'index-{len(files) + 1}.png').as_posix()
                files[path] = base64.b64decode(''.join(png) if isinstance(png, list) else png)
                parts.append(f'![output of the cell above]({path})')
    return '\n\n'.join(parts) + '\n', files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--check', action='store_true', help='only check that README.md is up to date')
    args = ap.parse_args(argv)
    text, files = render_all()
    readme = ROOT / 'README.md'
    if args.check:
        stale = not readme.exists() or readme.read_text(encoding='utf-8') != text
        stale |= any(not (ROOT / p).exists() or (ROOT / p).read_bytes() != b for p, b in files.items())
        if stale:
            print(
                'README.md or its pictures are out of date: run `python tools/make_readme.py`',
                file=sys.stderr,
            )
            return 1
        return 0
    readme.write_text(text, encoding='utf-8')
    (ROOT / PICTURES).mkdir(parents=True, exist_ok=True)
    for old in (ROOT / PICTURES).glob('index-*.png'):
        if old.relative_to(ROOT).as_posix() not in files:
            old.unlink()
    for p, b in files.items():
        (ROOT / p).write_bytes(b)
    return 0


if __name__ == '__main__':
    sys.exit(main())
