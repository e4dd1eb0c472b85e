"""Repository hygiene: README.md is made from index.ipynb; notebooks and the package agree."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import make_readme  # noqa: E402


def test_readme_matches_index():
    assert (ROOT / 'README.md').read_text(encoding='utf-8') == make_readme.render(), \
        'README.md differs from index.ipynb: run `python tools/make_readme.py`'


def test_readme_has_two_setup_commands():
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert 'pip install -e . && python -m mdmf.train' in text
    assert 'pip install -e ".[dev]" && python -m pytest tests' in text


def test_splits_shipped():
    for name, n in [('hmdb51', 4280 + 1194 + 1292), ('ucf101', 9154 + 1421 + 2745),
                    ('kinetics100', 10000), ('ssv2_small', 10000), ('ssv2_full', 67013 + 1926 + 2857)]:
        total = sum(len((ROOT / 'data/splits' / name / f'{s}.txt').read_text().splitlines())
                    for s in ('train', 'val', 'test'))
        assert total == n, name


def test_plain_install_ships_the_splits(tmp_path):
    "A non-editable install carries the split lists as package data and finds them there."
    site = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                    '--target', str(site), str(ROOT)], check=True, capture_output=True)
    code = ('import mdmf.episodes as e; d = e.splits_dir("hmdb51"); '
            'print(d); print(len(e.read_split(d / "test.txt")))')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                         env={'PYTHONPATH': str(site), 'PATH': '/usr/bin:/bin'}, check=True).stdout.split()
    assert out[0].startswith(str(site)), out
    assert out[1] == '1292'
