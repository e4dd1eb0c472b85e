"""Inside the two-view models of a mechanism-world study: per family, how often each view alone is right,
and which view the distillation conditions make the teacher (both conditions, as the full model trains).

For the runs of rows `multi-view` (trained without distillation) and `full` (with it), on the first
--episodes test episodes of each run's seed (the same episodes as its test), 5-shot:

    python tools/world_views.py results/world [--episodes 500]
writes <study>/views.json.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mdmf.ablate import load_study
from mdmf.data import load_data
from mdmf.episodes import EpisodeSampler, episode_generator
from mdmf.evaluate import encode_split
from mdmf.runs import load_model
from mdmf.world import WORLD_BY_NAME

FAMILIES = ('order', 'pace', 'attribute')


@torch.no_grad()
def view_stats(model, cfg, split, feats, episodes: int) -> dict:
    model.eval()
    tokens = model.class_tokens(split.class_names)  # [C, D]
    sampler = EpisodeSampler.from_split(split, cfg.data.way, cfg.data.shot, cfg.data.test_query, cfg.run.seed)
    rec = {f: dict(gtc=[], ltc=[], fused=[], g_teaches=[], l_teaches=[], teacher_right=[]) for f in FAMILIES}
    for i in range(episodes):
        ep = sampler.episode(i)
        labels = torch.arange(cfg.data.way).repeat_interleave(cfg.data.test_query)
        out = model.forward_features(
            feats[torch.from_numpy(ep.support_index)],
            torch.arange(cfg.data.way).repeat_interleave(cfg.data.shot),
            feats[torch.from_numpy(ep.query_index)],
            tokens[torch.from_numpy(ep.class_ids)],
            generator=episode_generator(cfg.run.seed, 'test', i, 'cpu'),
        )
        g = out.view_logits['gtc'].argmax(-1).eq(labels)
        l = out.view_logits['ltc'].argmax(-1).eq(labels)
        f_ = out.logits.argmax(-1).eq(labels)
        og, ol = out.extras['omega_g'], out.extras['omega_l']
        for q, y in enumerate(labels.tolist()):
            r = rec[WORLD_BY_NAME[split.class_names[ep.class_ids[y]]].family]
            r['gtc'].append(bool(g[q]))
            r['ltc'].append(bool(l[q]))
            r['fused'].append(bool(f_[q]))
            r['g_teaches'].append(bool(og[q]))
            r['l_teaches'].append(bool(ol[q]))
            if og[q] or ol[q]:
                r['teacher_right'].append(bool(g[q] if og[q] else l[q]))
    pct = lambda x: 100 * float(np.mean(x)) if x else None
    return {f: {k: pct(v) for k, v in r.items()} | dict(queries=len(r['gtc'])) for f, r in rec.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('study')
    ap.add_argument('--episodes', type=int, default=500)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    folder, study = Path(a.study), load_study(a.study)
    out, split, feats = (
        dict(
            command='python tools/world_views.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
            episodes=a.episodes,
            runs={},
        ),
        None,
        None,
    )
    for row in study['rows']:
        if row['row'] not in ('multi-view', 'full'):
            continue
        for seed, name in zip(row['seeds_done'], row['runs']):
            model, cfg = load_model(folder / name)
            if split is None:
                split = load_data(cfg.data, 'test')
                feats = encode_split(model, split, cfg)
            out['runs'][name] = dict(
                row=row['row'], seed=seed, **view_stats(model, cfg, split, feats, a.episodes)
            )
            print(
                name,
                json.dumps(
                    {
                        f: {k: round(v, 1) for k, v in out['runs'][name][f].items() if v is not None}
                        for f in FAMILIES
                    }
                ),
                flush=True,
            )
    (folder / 'views.json').write_text(json.dumps(out, indent=1))
    return out


if __name__ == '__main__':
    main()
