"""Give every notebook an "Open in Colab" badge and a first code cell that installs the package when it runs in Colab.

The badge is a markdown cell right after the notebook's title cell; the install cell follows it. Both are marked
so that running this again updates them instead of adding more. `--check` exits 1 when a notebook lacks them or
holds an outdated copy (the tests call it). Run `nbdev_clean` afterwards.
"""

import argparse
import configparser
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BADGE_MARK = '<!-- colab badge -->'
INSTALL_MARK = '# Colab:'


def repo_url() -> str:
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    return cfg['DEFAULT']['git_url'].rstrip('/'), cfg['DEFAULT'].get('branch', 'main')


def badge_cell(nb: Path) -> dict:
    url, branch = repo_url()
    path = nb.relative_to(ROOT).as_posix()
    colab = (
        url.replace('https://github.com/', 'https://colab.research.google.com/github/')
        + f'/blob/{branch}/{path}'
    )
    text = (
        f'{BADGE_MARK}\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab})'
    )
    return dict(cell_type='markdown', metadata={}, source=text.splitlines(keepends=True))


def install_cell(widgets: bool) -> dict:
    url, _ = repo_url()
    # written as `ruff format` leaves it (tools/export.py formats every notebook)
    lines = [
        '#| hide',
        f'{INSTALL_MARK} install mdmf (and its requirements) first; anywhere else this cell does nothing.',
        'import subprocess',
        'import sys',
        '',
        "if 'google.colab' in sys.modules:",
        '    subprocess.run(',
        f"        [sys.executable, '-m', 'pip', 'install', '-q', 'git+{url}.git'], check=True",
        '    )',
    ]
    if widgets:
        lines += [
            '    from google.colab import output',
            '',
            '    output.enable_custom_widget_manager()  # ipywidgets 8 in Colab',
        ]
    return dict(
        cell_type='code',
        execution_count=None,
        metadata={},
        outputs=[],
        source='\n'.join(lines).splitlines(True),
    )


def _is_badge(c):
    return c['cell_type'] == 'markdown' and ''.join(c['source']).startswith(BADGE_MARK)


def _is_install(c):
    lines = ''.join(c['source']).splitlines()
    return c['cell_type'] == 'code' and len(lines) > 1 and lines[1].startswith(INSTALL_MARK)


def wanted(nb: Path, cells: list) -> list:
    "The notebook's cells with the badge after the title cell and the install cell after the badge."
    rest = [c for c in cells if not (_is_badge(c) or _is_install(c))]
    title = next(
        i
        for i, c in enumerate(rest)
        if c['cell_type'] == 'markdown' and ''.join(c['source']).lstrip().startswith('# ')
    )
    widgets = 'ipywidgets' in json.dumps(rest) or 'Explorer' in json.dumps(rest)
    new = [badge_cell(nb), install_cell(widgets)]
    for c, old in zip(new, [next((x for x in cells if f(x)), None) for f in (_is_badge, _is_install)]):
        if old is not None and 'id' in old:
            c['id'] = old['id']
    return rest[: title + 1] + new + rest[title + 1 :]


def notebooks() -> list:
    return sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')) + [ROOT / 'index.ipynb']


def _key(cells):
    return [(c['cell_type'], ''.join(c['source'])) for c in cells]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--check', action='store_true', help='only check; exit 1 when a notebook needs the cells')
    args = ap.parse_args(argv)
    stale = []
    for nb in notebooks():
        data = json.loads(nb.read_text(encoding='utf-8'))
        cells = wanted(nb, data['cells'])
        if _key(cells) == _key(data['cells']):
            continue
        stale.append(nb.name)
        if not args.check:
            data['cells'] = cells
            nb.write_text(json.dumps(data, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    if args.check and stale:
        print(
            'notebooks without an up-to-date Colab badge and install cell: '
            + ', '.join(stale)
            + '\nrun `python tools/colab_cells.py && nbdev_clean`',
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
