"""What PPS hands each family of the mechanism world: on the test episodes of a seed, the fraction of queries
whose drawn prompt is their own class's (chance: 1/way), per family, with the tiny CLIP the frozen runs use.

    python tools/world_pps.py [--root data/synthetic-mech] [--episodes 2000] [--seeds 1896,1897,1898]
"""

import argparse
import json
import sys

import numpy as np
import torch

from mdmf.backbone import load_clip
from mdmf.episodes import EpisodeSampler, episode_generator
from mdmf.pps import PPS
from mdmf.pretrain import class_prompt_features, split_features
from mdmf.world import WORLD_BY_NAME


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--root', default='data/synthetic-mech')
    ap.add_argument('--episodes', type=int, default=2000)
    ap.add_argument('--seeds', default='1896,1897,1898')
    ap.add_argument('--out', default='results/world/pps.json')
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_clip('tiny-pretrained')
    feats, labels, names, _ = split_features(model, a.root, 'test')
    tokens = class_prompt_features(model, names)
    pps, out = PPS(0.005, 'video'), {}
    for shot in (5, 1):
        hits = {f: [] for f in ('order', 'pace', 'attribute')}
        partner, drawn_family = [], {f: [] for f in hits}
        for seed in map(int, a.seeds.split(',')):
            sampler = EpisodeSampler(labels.numpy(), 5, shot, 1, seed, 'test')
            for i in range(a.episodes):
                ep = sampler.episode(i)
                q, tok = feats[torch.from_numpy(ep.query_index)], tokens[torch.from_numpy(ep.class_ids)]
                _, _, drawn = pps(q, tok, generator=episode_generator(seed, 'test', i, 'cpu'))
                for j, c in enumerate(ep.class_ids):
                    w = WORLD_BY_NAME[names[c]]
                    hits[w.family].append(int(drawn[j]) == j)
                    drawn_family[w.family].append(WORLD_BY_NAME[names[ep.class_ids[int(drawn[j])]]].family)
                    if w.partner and w.partner in [names[k] for k in ep.class_ids]:
                        partner.append(
                            (w.family, int(drawn[j]) == j, names[ep.class_ids[int(drawn[j])]] == w.partner)
                        )
        out[f'{shot}-shot'] = {
            f: dict(
                own_prompt=100 * float(np.mean(h)),
                queries=len(h),
                drawn_family={g: 100 * float(np.mean([x == g for x in drawn_family[f]])) for g in hits},
            )
            for f, h in hits.items()
        }
        for f in ('order', 'pace'):
            rows = [(o, p) for fam, o, p in partner if fam == f]
            out[f'{shot}-shot'][f]['with_partner_in_episode'] = dict(
                own=100 * float(np.mean([o for o, _ in rows])),
                partner=100 * float(np.mean([p for _, p in rows])),
                queries=len(rows),
            )
    out['command'] = 'python tools/world_pps.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(out, indent=1))
    with open(a.out, 'w') as f:
        json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
