"""`python -m mdmf.ablate`: which rows run, the plan, resuming a study, the statistics and the study's files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdmf.ablate import (
    PAPER_ABLATIONS,
    STUDY_SCHEDULE,
    TABLES,
    load_study,
    main,
    paired_delta,
    plan_study,
    read_study,
    seed_stats,
    slug,
    study_markdown,
    study_rows,
)
from mdmf.config import preset_config
from mdmf.core import BadInput, MissingInput
from mdmf.model import ABLATIONS
from mdmf.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
    'OMP_NUM_THREADS': '1',
}


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    make_synthetic(root, videos_per_class=8, frames=8, size=32, workers=1)
    return root


def tiny(root, out, *more):
    return [
        '--out',
        str(out),
        '--data-root',
        str(root),
        '--backbone',
        'tiny-vit',
        '--shot',
        '1',
        '--train-query',
        '1',
        '--ffn-dim',
        '32',
        '--heads',
        '2',
        '--train-episodes',
        '4',
        '--train-draws',
        '2',
        '--val-every',
        '4',
        '--val-episodes',
        '6',
        '--test-episodes',
        '10',
        '--workers',
        '0',
        '--checkpoint-every',
        '2',
        *more,
    ]


def test_tables_hold_every_row_once():
    assert TABLES['3'] == ('GTC', 'GTC+PPS', 'LTC', 'LTC+PPS', 'NTC', 'NTC+PPS')
    assert TABLES['4'] == ('multi-view', 'multi-view+PPS', 'multi-view+distill', 'full')
    assert len(TABLES['5']) == 12 and all(r.startswith('T5 ') for r in TABLES['5'])
    assert sorted(sum(TABLES.values(), ())) == sorted(ABLATIONS)
    assert study_rows('all') == list(ABLATIONS)
    assert study_rows('3,4') == list(ABLATIONS)[:10]
    assert study_rows('5', 'NTC') == ['NTC'] + list(TABLES['5'])
    assert study_rows('none', lambdas='2, 0.5,2') == ['full λ=2', 'full λ=0.5']
    for bad, msg in [
        (('7',), 'the tables are'),
        (('none', 'GTC+distill'), 'is not a row'),
        (('none', '', 'a,b'), 'numbers'),
        (('none',), 'nothing to run'),
    ]:
        with pytest.raises(BadInput, match=msg):
            study_rows(*bad)


def test_paper_numbers_are_those_of_method_md():
    assert PAPER_ABLATIONS['GTC+PPS'] == dict(hmdb51=82.4, kinetics100=93.2, ssv2_small=58.6)
    assert PAPER_ABLATIONS['full'] == dict(hmdb51=83.0, kinetics100=93.5, ssv2_small=60.4)
    # the paper reports no Table 5 numbers for these columns
    assert not any(r.startswith('T5') for r in PAPER_ABLATIONS)
    assert 'multi-view+PPS' not in PAPER_ABLATIONS and 'multi-view+distill' not in PAPER_ABLATIONS


def test_plan_shares_identical_runs_and_names_folders_apart():
    rows = study_rows('all', lambdas='0,1,2')
    plan = plan_study(preset_config('synthetic'), rows, 3, True, 'out')
    assert len(plan) == 3 * 25 and len({r.folder for r in plan}) == len(plan)
    assert len({slug(r) for r in rows}) == len(rows)
    shared = [(r.row, r.same_as.name) for r in plan if r.same_as is not None]
    assert sorted(shared) == sorted(
        [
            (row, f'full-s{s}')
            for s in (1896, 1897, 1898)
            for row in ('T5 bidirectional v+t-compare', 'full λ=1')
        ]
    )
    r = next(r for r in plan if r.row == 'T5 up->down v-compare' and r.seed == 1897)
    assert (r.cfg.model.distill_condition, r.cfg.model.distill_direction) == ('v', 'gtc_teaches_ltc')
    assert (
        r.cfg.model.freeze_visual
        and r.cfg.run.seed == 1897
        and r.folder == Path('out/t5-up-to-down-v-compare-s1897')
    )
    assert not plan_study(preset_config('synthetic'), ['NTC'], 1, False, 'o')[0].cfg.model.freeze_visual


def test_statistics():
    s = seed_stats([60.0, 64.0], [2.0, 2.0])
    assert (
        s['mean'] == 62.0 and s['std'] == pytest.approx(2**1.5) and s['pooled_ci95'] == pytest.approx(2**0.5)
    )
    assert s['seed_ci95'] == pytest.approx(12.706 * 2**1.5 / 2**0.5, rel=1e-3)
    assert seed_stats([70.0], [1.0])['std'] is None
    d = paired_delta({1: 70.0, 2: 71.0, 3: 69.0}, {1: 70.5, 2: 70.0, 3: 70.0})
    assert d['n'] == 3 and d['mean'] == pytest.approx(-1 / 6) and not d['excludes_zero']


def test_schedule_applies_unless_given(data_root, tmp_path):
    plan = main(['--plan', '--table', '3', '--seeds', '2', '--out', str(tmp_path)])
    c = plan[0].cfg
    sched = STUDY_SCHEDULE['frozen']
    assert (c.optim.train_episodes, c.optim.train_draws, c.eval.test_episodes) == (
        sched['train_episodes'],
        sched['train_draws'],
        sched['test_episodes'],
    )
    c = main(['--plan', '--table', '3', '--out', str(tmp_path), '--test-episodes', '123', '--finetune'])[
        0
    ].cfg
    assert c.eval.test_episodes == 123 and not c.model.freeze_visual
    # the fine-tuned regime keeps the run defaults
    assert c.eval.val_every == preset_config('synthetic').eval.val_every


def test_study_runs_resumes_and_never_reruns(data_root, tmp_path):
    out = tmp_path / 'study'
    args = tiny(data_root, out, '--table', 'none', '--rows', 'NTC,full', '--lambdas', '1', '--seeds', '2')
    study = main(args)
    assert (study['runs_total'], study['runs_done'], study['trained_now']) == (6, 6, 4)
    rows = read_study(out)
    assert [r['row'] for r in rows] == ['NTC', 'full', 'full λ=1']
    ntc = rows[0]
    for key in (
        'table',
        'changes',
        'overrides',
        'seeds',
        'runs',
        'test',
        'ci95',
        'val',
        'mean',
        'std',
        'pooled_ci95',
        'seed_ci95',
        'delta_full',
        'paper',
        'distill_lambda',
        'done',
    ):
        assert key in ntc, key
    assert ntc['seeds'] == [1896, 1897] and ntc['done'] == 2 and ntc['paper'] == PAPER_ABLATIONS['NTC']
    assert ntc['mean'] == pytest.approx(sum(ntc['test']) / 2)
    assert rows[2]['test'] == rows[1]['test'] and rows[2]['runs'] == rows[1]['runs']
    # λ=1 is the full model again: compared with nothing; every row names the reference it is compared with
    assert rows[2]['delta_full'] is None and {r['reference'] for r in rows} == {'full'}
    finished = out / 'full-s1896' / 'metrics.json'
    stamp = finished.stat().st_mtime_ns
    (out / 'ntc-s1897' / 'metrics.json').unlink()  # interrupted after its last checkpoint: resumed
    again = main(args)
    assert again['trained_now'] == 1 and finished.stat().st_mtime_ns == stamp
    assert read_study(out)[0]['test'] == ntc['test']
    log = (out / 'ntc-s1897' / 'train.log').read_text()
    assert 'resumed from' in log
    md = (out / 'study.md').read_text()
    assert '| NTC | 3 |' in md and '81.7' in md and 'seed sd' in md
    assert load_study(out / 'study.json')['regime'] == 'frozen'
    with pytest.raises(BadInput, match='other settings'):
        main([a if a != '10' else '12' for a in args])


def test_study_markdown_blanks_what_the_paper_does_not_give(data_root, tmp_path):
    out = tmp_path / 'small'
    study = main(tiny(data_root, out, '--table', 'none', '--rows', 'T5 up->down t-compare', '--seeds', '1'))
    md = study_markdown(study)
    row = next(l for l in md.splitlines() if l.startswith('| T5 up->down t-compare'))
    assert row.rstrip(' |').endswith('— | — | —')
    with pytest.raises(MissingInput, match='run the study first'):
        read_study(tmp_path / 'nothing')


def test_cli_errors_and_plan(tmp_path):
    p = subprocess.run(
        [sys.executable, '-m', 'mdmf.ablate', '--table', '9', '--out', str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2 and 'error: --table' in p.stderr and 'Traceback' not in p.stderr
    p = subprocess.run(
        [
            sys.executable,
            '-m',
            'mdmf.ablate',
            '--plan',
            '--table',
            '4',
            '--seeds',
            '2',
            '--out',
            str(tmp_path / 's'),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 8 and all(l.endswith('new') for l in lines) and 'multi-view+distill' in lines[2]
