"""Per-family accuracy of the runs of a study on the mechanism world (`python -m mdmf.world`).

Every run of the study folder is loaded from its best.pt (selected on val) and tested again on the same test
episodes as its metrics.json (same seed: the overall accuracy must match it), once with the run's shot and once
1-shot. Each query is counted in the family of its true class (order, pace, attribute). Rows are then compared
with a reference row seed by seed on the same episodes: the mean difference and its t 95% interval over seeds.

    python tools/world_families.py results/world/study [--shots 5,1] [--ref full]
writes <study>/families.json and <study>/families.md.
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
    r = evaluate(model, cfg, 'test', cfg.eval.test_episodes, shot=shot, data=split, features=feats, progress=False)
    sampler = EpisodeSampler.from_split(split, cfg.data.way, shot, cfg.data.test_query, cfg.run.seed)
    q = cfg.data.test_query
    hit = {f: [] for f in FAMILIES}
    for i in range(r.episodes):
        ep = sampler.episode(i)
        for j, c in enumerate(ep.class_ids):
            fam = WORLD_BY_NAME[split.class_names[c]].family
            hit[fam] += list(r.predictions[i, j * q:(j + 1) * q] == j)
    out = {f: 100 * float(np.mean(h)) for f, h in hit.items()}
    return dict(all=r.accuracy, **out)

def t_interval(x: list) -> tuple:
    a = np.asarray(x, float)
    if len(a) < 2: return float(a.mean()), None
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))

@torch.no_grad()
def zero_shot(model, cfg) -> dict:
    "Text side alone: top-1 of the prompt nearest to the mean frame feature, among the classes of each family."
    model.eval()
    feats, labels, names, _ = split_features(model.backbone, cfg.data.data_root, 'test', frames=cfg.model.frames)
    tokens = class_prompt_features(model.backbone, names)
    sim = torch.nn.functional.normalize(feats.mean(1), dim=-1) @ torch.nn.functional.normalize(tokens, dim=-1).T
    out = {}
    for f in FAMILIES:
        cls = [i for i, n in enumerate(names) if WORLD_BY_NAME[n].family == f]
        vid = [v for v, l in enumerate(labels.tolist()) if l in cls]
        pred = torch.tensor(cls)[sim[vid][:, cls].argmax(-1)]
        out[f] = dict(top1=100 * pred.eq(labels[vid]).float().mean().item(), chance=100 / len(cls), classes=len(cls))
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('study', help='study folder of `python -m mdmf.ablate` on the mechanism world')
    ap.add_argument('--shots', default='5,1', help='shots to test each run with (default: 5,1)')
    ap.add_argument('--ref', default='full', help='the row the others are compared with (default: full)')
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    folder, t0 = Path(a.study), time.time()
    study = load_study(folder)
    shots = [int(s) for s in a.shots.split(',')]
    runs = {}  # (row, seed, shot) -> family accuracy
    split, feats, zs = None, None, None
    for row in study['rows']:
        for seed, name in zip(row['seeds_done'], row['runs']):
            model, cfg = load_model(folder / name)
            if split is None:
                split = load_data(cfg.data, 'test')
                zs = zero_shot(model, cfg)
                print('zero-shot top-1 per family:', zs, flush=True)
            for shot in shots:
                runs[row['row'], seed, shot] = family_accuracy(model, cfg, shot, split=split)
            print(row['row'], seed, {s: {k: round(v, 2) for k, v in runs[row['row'], seed, s].items()} for s in shots},
                  flush=True)
    table = []
    for row in study['rows']:
        for shot in shots:
            seeds = [s for s in row['seeds_done'] if (row['row'], s, shot) in runs]
            rec = dict(row=row['row'], shot=shot, seeds=seeds)
            for f in ('all',) + FAMILIES:
                vals = [runs[row['row'], s, shot][f] for s in seeds]
                rec[f] = dict(mean=float(np.mean(vals)), sd=float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                              per_seed=vals)
                ref = [s for s in seeds if (a.ref, s, shot) in runs]
                if row['row'] != a.ref and ref:
                    m, ci = t_interval([runs[row['row'], s, shot][f] - runs[a.ref, s, shot][f] for s in ref])
                    rec[f]['delta_ref'] = dict(mean=m, ci95=ci, shows=ci is not None and abs(m) > ci)
            table.append(rec)
    out = dict(study=str(folder), ref=a.ref, shots=shots, zero_shot=zs, rows=table,
               seconds=round(time.time() - t0, 1))
    (folder / 'families.json').write_text(json.dumps(out, indent=1))
    print(f'written {folder / "families.json"} in {out["seconds"]} s')
    return out

if __name__ == '__main__':
    main()
