"""The command lines: one ArgumentParser in the package, every command built from the Config sections it uses
plus at most one small dataclass, one default per setting, readable --help, errors that name the flag."""

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from mdmf.ablate import AblateOptions
from mdmf.bench import BenchOptions
from mdmf.config import Config, leaf_sections, preset_config, resolve_config
from mdmf.evaluate import EvaluateOptions
from mdmf.memory import MemoryOptions
from mdmf.pretrain import PretrainConfig
from mdmf.synthetic import SyntheticOptions
from mdmf.train import TrainOptions
from mdmf.visualize import FigureOptions
from mdmf.world import WorldOptions

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ('train', 'evaluate', 'ablate', 'visualize', 'memory', 'pretrain', 'synthetic', 'world', 'bench')
COMMAND_OPTIONS = (
    TrainOptions,
    EvaluateOptions,
    AblateOptions,
    FigureOptions,
    MemoryOptions,
    SyntheticOptions,
    WorldOptions,
    BenchOptions,
)
# the tiny CLIP's own training, not a few-shot run's
PRETRAINING_ONLY = {'seed', 'lr', 'weight_decay', 'workers'}


def test_one_argument_parser_in_the_package():
    "Every command line is made by `command_line`: the package constructs exactly one ArgumentParser."
    found = [
        (p.name, n)
        for p in sorted((ROOT / 'mdmf').glob('*.py'))
        for n, line in enumerate(p.read_text(encoding='utf-8').splitlines(), 1)
        if 'ArgumentParser(' in line
    ]
    assert len(found) == 1 and found[0][0] == 'core.py', found
    core = (ROOT / 'mdmf' / 'core.py').read_text(encoding='utf-8')
    assert re.search(r'def command_line\([^\n]*\n[^\n]*\n\s+p = argparse\.ArgumentParser\(', core)


def test_config_is_the_default_run():
    assert Config() == preset_config('synthetic') == resolve_config([])


@pytest.mark.parametrize('cls', COMMAND_OPTIONS, ids=lambda c: c.__name__)
def test_a_command_does_not_copy_a_section_setting(cls):
    "A command's own dataclass has no field named like a Config section's setting: it takes that setting's flag."
    copies = sorted(f.name for f in fields(cls) if f.name in leaf_sections())
    assert not copies, f'{cls.__name__} has its own {copies}: take them from the Config sections'


def test_pretraining_settings_named_like_run_settings_are_the_pretrainings():
    "PretrainConfig's settings named like a run's have the run's default, or are the pretraining's own."
    d, where = Config(), leaf_sections()
    differ = {
        f.name
        for f in fields(PretrainConfig)
        if f.name in where and getattr(getattr(d, where[f.name]), f.name) != f.default
    }
    assert differ <= PRETRAINING_ONLY, differ


@pytest.mark.parametrize('command', COMMANDS)
def test_every_help_reads(command):
    p = subprocess.run(
        [sys.executable, '-m', f'mdmf.{command}', '--help'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and p.stdout.startswith(f'usage: python -m mdmf.{command}'), p.stderr[-2000:]
    assert '--debug' in p.stdout and 'Traceback' not in p.stderr


@pytest.mark.parametrize(
    'command, argv, says',
    [
        (
            'evaluate',
            ['--checkpoint', 'x', '--episodes', 'many'],
            "argument --episodes: invalid int value: 'many'",
        ),
        ('evaluate', ['--episodes', '3'], 'the following arguments are required: --checkpoint'),
        ('visualize', ['--view', 'sideways'], "argument --view: invalid choice: 'sideways'"),
        ('memory', ['--chunk', '1.5'], "argument --chunk: invalid int value: '1.5'"),
        ('pretrain', ['--steps', '10'], 'the following arguments are required: --out'),
        ('train', ['--lr-steps', '[100'], "argument --lr-steps: invalid JSON value: '[100'"),
        ('ablate', ['--seeds', 'three'], "argument --seeds: invalid int value: 'three'"),
        (
            'synthetic',
            ['--video-size', '15', '--data-root', '/nonexistent/x'],
            'error: the frame size (--video-size) must be even (yuv420p), got 15',
        ),
    ],
)
def test_bad_values_name_the_flag(command, argv, says):
    p = subprocess.run(
        [sys.executable, '-m', f'mdmf.{command}', *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and says in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]


def test_train_prints_its_config():
    "`--print-config` is a field of TrainOptions: it prints the settings the other flags resolve to, and trains nothing."
    import json

    p = subprocess.run(
        [sys.executable, '-m', 'mdmf.train', '--print-config', '--shot', '3', '--runs', '/nonexistent/runs'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = json.loads(p.stdout)
    assert (
        cfg['data']['shot'] == 3
        and cfg['run']['runs'] == '/nonexistent/runs'
        and 'print_config' not in p.stdout
    )


def test_a_reader_that_stops_early_ends_the_command_quietly():
    "`python -m mdmf.train --print-config | head -1`: a closed pipe ends the command with 141 and no traceback."
    code = (
        'import sys\n'
        'from mdmf.core import cli\n'
        'def main(argv):\n'
        '    for i in range(100000):\n'
        '        print("line", i)\n'
        'cli(main)\n'
    )
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # the reader goes away after one line
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and 'Traceback' not in err, (p.returncode, err)
