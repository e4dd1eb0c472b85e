"""Per-family accuracy of the runs of a study on the mechanism world (`python -m mdmf.world`).

Every run of the study folder is loaded from its best.pt (selected on val) and tested again on the same test
episodes as its metrics.json (same seed: the overall accuracy must match it), once with the run's shot and once
1-shot. Each query is counted in the family of its true class (order, pace, attribute). Rows are then compared
row by row on the same episodes (`CONTRASTS`): the mean difference, its t 95% interval over seeds, and the
95% interval over all paired queries (same episode, same query, both rows).

    python tools/world_families.py results/world/study [--shots 5,1]
writes <study>/families.json.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from mdmf.ablate import load_study
from mdmf.data import load_data
from mdmf.episodes import EpisodeSampler
from mdmf.evaluate import evaluate
from mdmf.pretrain import class_prompt_features, split_features
from mdmf.runs import load_model
from mdmf.world import WORLD_BY_NAME

FAMILIES = ('order', 'pace', 'attribute')


def family_accuracy(model, cfg, shot: int, feats=None, split=None) -> dict:
    "Accuracy (percent) per family and overall on the run's test episodes, and the per-episode accuracy."
    split = split or load_data(cfg.data, 'test')
    r = evaluate(
        model, cfg, 'test', cfg.eval.test_episodes, shot=shot, data=split, features=feats, progress=False
    )
    sampler = EpisodeSampler.from_split(split, cfg.data.way, shot, cfg.data.test_query, cfg.run.seed)
    q = cfg.data.test_query
    hit = {f: [] for f in FAMILIES}
    for i in range(r.episodes):
        ep = sampler.episode(i)
        for j, c in enumerate(ep.class_ids):
            fam = WORLD_BY_NAME[split.class_names[c]].family
            hit[fam] += list(r.predictions[i, j * q : (j + 1) * q] == j)
    out = {f: 100 * float(np.mean(h)) for f, h in hit.items()}
    return dict(all=r.accuracy, **out), {f: np.asarray(h, bool) for f, h in hit.items()}


def t_interval(x: list) -> tuple:
    a = np.asarray(x, float)
    if len(a) < 2:
        return float(a.mean()), None
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))


@torch.no_grad()
def zero_shot(model, cfg) -> dict:
    "Text side alone: top-1 of the prompt nearest to the mean frame feature, among the classes of each family."
    model.eval()
    feats, labels, names, _ = split_features(
        model.backbone, cfg.data.data_root, 'test', frames=cfg.model.frames
    )
    tokens = class_prompt_features(model.backbone, names)
    sim = (
        torch.nn.functional.normalize(feats.mean(1), dim=-1) @ torch.nn.functional.normalize(tokens, dim=-1).T
    )
    out = {}
    for f in FAMILIES:
        cls = [i for i, n in enumerate(names) if WORLD_BY_NAME[n].family == f]
        vid = [v for v, l in enumerate(labels.tolist()) if l in cls]
        pred = torch.tensor(cls)[sim[vid][:, cls].argmax(-1)]
        out[f] = dict(
            top1=100 * pred.eq(labels[vid]).float().mean().item(), chance=100 / len(cls), classes=len(cls)
        )
    return out


CONTRASTS = [  # (claim, row, minus row)
    ('temporal context', 'multi-view', 'NTC'),
    ('temporal context', 'GTC', 'NTC'),
    ('temporal context', 'LTC', 'NTC'),
    ('global against local view', 'GTC', 'LTC'),
    ('two views over one', 'multi-view', 'GTC'),
    ('two views over one', 'multi-view', 'LTC'),
    ('PPS', 'GTC+PPS', 'GTC'),
    ('PPS', 'LTC+PPS', 'LTC'),
    ('PPS', 'NTC+PPS', 'NTC'),
    ('PPS', 'multi-view+PPS', 'multi-view'),
    ('PPS', 'full', 'multi-view+distill'),
    ('distillation', 'multi-view+distill', 'multi-view'),
    ('distillation', 'full', 'multi-view+PPS'),
    ('full model', 'full', 'multi-view'),
]


def row_claim(row: str) -> str:
    "The claim a row other than those of CONTRASTS tests against the full model (Table 5, the lambda sweep)."
    return 'distillation weight' if 'λ' in row else 'distillation variant' if row.startswith('T5') else 'row'


def contrast(runs: dict, hits: dict, a: str, b: str, shot: int, fam: str) -> dict:
    "Row a minus row b on the same episodes: t interval over seeds, and the interval over all paired queries."
    seeds = sorted(s for (r, s, k) in runs if r == a and k == shot and (b, s, shot) in runs)
    if not seeds:
        return {}
    m, ci = t_interval([runs[a, s, shot][fam] - runs[b, s, shot][fam] for s in seeds])
    fams = FAMILIES if fam == 'all' else (fam,)
    d = np.concatenate([hits[a, s, shot][f].astype(float) - hits[b, s, shot][f] for s in seeds for f in fams])
    q = 100 * 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    return dict(
        seeds=seeds,
        mean=m,
        seed_ci95=ci,
        shows_seeds=ci is not None and abs(m) > ci,
        query_ci95=float(q),
        shows_queries=bool(abs(m) > q),
        queries=len(d),
    )


def _pm(m, ci):
    return f'{m:+.2f}' + (f' ± {ci:.2f}' if ci is not None else '')


def families_markdown(out: dict) -> str:
    "The per-family table (mean over seeds, seed sd) and the contrasts, as Markdown."
    md = [
        f"`{out['command']}`\n",
        '| row | shot | all | order (GTC) | pace (LTC) | attribute (PPS) |',
        '|---|---|---|---|---|---|',
    ]
    for r in out['rows']:
        cell = lambda f: f"{r[f]['mean']:.2f}" + (f" ({r[f]['sd']:.2f})" if r[f]['sd'] is not None else '')
        md.append(f"| {r['row']} | {r['shot']} | " + ' | '.join(cell(f) for f in ('all',) + FAMILIES) + ' |')
    md += [
        '',
        '| claim | row − row | shot | all | order | pace | attribute |',
        '|---|---|---|---|---|---|---|',
    ]
    by = {
        (c['claim'], c['row'], c['minus'], c['shot'], c['family']): c
        for c in out['contrasts']
        if c.get('seeds')
    }
    for claim, a, b, shot in dict.fromkeys(
        (c['claim'], c['row'], c['minus'], c['shot']) for c in out['contrasts']
    ):
        cells = []
        for f in ('all',) + FAMILIES:
            c = by.get((claim, a, b, shot, f))
            if not c:
                cells.append('')
                continue
            t = f"{c['mean']:+.2f} ± {c['seed_ci95']:.2f} / ± {c['query_ci95']:.2f}"
            cells.append(f'**{t}**' if c['shows_seeds'] else f'*{t}*' if c['shows_queries'] else t)
        md.append(f'| {claim} | {a} − {b} | {shot} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(md) + '\n'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('study', help='study folder of `python -m mdmf.ablate` on the mechanism world')
    ap.add_argument('--shots', default='5,1', help='shots to test each run with (default: 5,1)')
    ap.add_argument('--markdown', action='store_true', help='only write families.md again from families.json')
    a = ap.parse_args(argv)
    if a.markdown:
        out = json.loads((Path(a.study) / 'families.json').read_text())
        (Path(a.study) / 'families.md').write_text(families_markdown(out))
        return out
    torch.set_num_threads(1)
    folder, t0 = Path(a.study), time.time()
    study = load_study(folder)
    shots = [int(s) for s in a.shots.split(',')]
    runs, hits, split, zs = {}, {}, None, None  # (row, seed, shot) -> accuracy per family / correct per query
    for row in study['rows']:
        for seed, name in zip(row['seeds_done'], row['runs']):
            model, cfg = load_model(folder / name)
            if split is None:
                split, zs = load_data(cfg.data, 'test'), zero_shot(model, cfg)
                print('zero-shot top-1 per family:', zs, flush=True)
            for shot in shots:
                runs[row['row'], seed, shot], hits[row['row'], seed, shot] = family_accuracy(
                    model, cfg, shot, split=split
                )
            if (
                abs(runs[row['row'], seed, cfg.data.shot]['all'] - row['test'][row['seeds_done'].index(seed)])
                > 1e-6
            ):
                raise RuntimeError(f'{name}: the test accuracy differs from its metrics.json')
            print(
                row['row'],
                seed,
                {s: {k: round(v, 2) for k, v in runs[row['row'], seed, s].items()} for s in shots},
                flush=True,
            )
    table = []
    for row in study['rows']:
        for shot in shots:
            seeds = [s for s in row['seeds_done'] if (row['row'], s, shot) in runs]
            rec = dict(row=row['row'], shot=shot, seeds=seeds)
            for f in ('all',) + FAMILIES:
                vals = [runs[row['row'], s, shot][f] for s in seeds]
                rec[f] = dict(
                    mean=float(np.mean(vals)),
                    sd=float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                    per_seed=vals,
                )
            table.append(rec)
    pairs = [
        (c, x, y)
        for c, x, y in CONTRASTS
        if any(r == x for r, _, _ in runs) and any(r == y for r, _, _ in runs)
    ]
    # every other row against the study's full model (its row `full`, or the first row run with its settings);
    # a row without a difference to it (the full model's runs again, as λ=1) is left out
    full = study['rows'][0].get('reference')
    paired = {r for _, x, y in pairs for r in (x, y)}
    pairs += [
        (row_claim(r['row']), r['row'], full)
        for r in study['rows']
        if full and r['row'] not in paired | {full} and r.get('delta_full') is not None
    ]
    contrasts = [
        dict(claim=c, row=x, minus=y, shot=shot, family=f, **contrast(runs, hits, x, y, shot, f))
        for c, x, y in pairs
        for shot in shots
        for f in ('all',) + FAMILIES
    ]
    out = dict(
        study=str(folder),
        command='python tools/world_families.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
        shots=shots,
        zero_shot=zs,
        rows=table,
        contrasts=contrasts,
        seconds=round(time.time() - t0, 1),
    )
    (folder / 'families.json').write_text(json.dumps(out, indent=1))
    (folder / 'families.md').write_text(families_markdown(out))
    print(f'written {folder / "families.json"} in {out["seconds"]} s')
    return out


if __name__ == '__main__':
    main()
