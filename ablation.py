"""The paper's ablation (Tab. 1) on the offline toy world, mean +- std over seeds.

    python ablation.py --seeds 0 1 2 --out runs/ablation/results.json

Rows as in Tab. 1: (a) the ZegCLIP twin (`--no-trusty`: no token, no self-attention; trained with the
same focal weight 20 as TagCLIP, so that only the architecture differs), (b) + the trusty token and
relationship descriptor, (c) + the Trusty Learner, (d) + the Eq. 12 trusty weighting at inference;
then (d) with the authors' focal trusty loss as they set it (alpha 0.25 on the unseen pixels, where
the toy default is 0.75) and with the paper's dice (Eq. 10). (c) and (d) are the same checkpoints
evaluated without and with the weighting; every other row is trained separately. Every run is a plain
`train.py` run on the same cached world and tiny CLIP with the same recipe; only the variant's flags
and the training seed change. Finished runs are reused (their last.pt), so an interrupted ablation
resumes, and several ablation.py processes (other --variants or --seeds) can share one --runs folder.
"""

import argparse
import math
import os
from pathlib import Path

import torch

import train
from evaluate import evaluate_checkpoint
from runtime import HelpFormatter, write_json

VARIANTS = {  # name -> (train.py flags, Eq. 12 trusty weighting at evaluation)
    '(a) ZegCLIP twin (--no-trusty)': (['--no-trusty', '--weight-focal', '20'], 'off'),
    '(b) + trusty token': (['--no-trusty-learner'], 'off'),
    '(c) + Trusty Learner': ([], 'off'),
    '(d) + Eq. 12 weighting = TagCLIP': ([], 'on'),
    "(d) with the authors' trusty alpha 0.25": (['--trusty-alpha', '0.25'], 'on'),
    "(d) with the paper's dice trusty loss (Eq. 10)": (['--trusty-loss', 'dice'], 'on'),
}
LETTERS = 'abcdFD'  # the --variants letter of each VARIANTS row, in order
COLUMNS = ('mIoU(S)', 'mIoU(U)', 'hIoU', 'pAcc', 'A-right(S)', 'A-right(U)')


def run(flags, seed, out_dir, extra):
    """Train one variant (or reuse a finished run) and return its last checkpoint."""
    ckpt = Path(out_dir) / 'last.pt'
    if not ckpt.exists() or torch.load(ckpt, weights_only=True)['step'] < train.get_args(extra).iters:
        train.main([*flags, '--seed', str(seed), '--out-dir', str(out_dir), '--resume', 'auto', '--no-eval', *extra])
    return ckpt


def mean_std(values):
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='training seeds')
    p.add_argument('--runs', default='runs/ablation', help='one train.py output folder per variant and seed')
    p.add_argument('--out', default='runs/ablation/results.json',
                   help="the table's numbers and every run's, as JSON")
    p.add_argument('--train-args', default='',
                   help="extra train.py flags for every run, e.g. '--iters 800' (default: none)")
    p.add_argument('--variants', default=LETTERS, help="rows: a, b, c, d; F: d with alpha 0.25; D: d with the dice trusty loss")
    args = p.parse_args()
    extra = args.train_args.split()
    rows = {k: v for letter, (k, v) in zip(LETTERS, VARIANTS.items()) if letter in args.variants}

    results = {}
    for name, (flags, weighting) in rows.items():
        for seed in args.seeds:
            folder = Path(args.runs) / f"{'-'.join(f.lstrip('-') for f in flags) or 'tagclip'}-seed{seed}"
            ckpt = run(flags, seed, folder, extra)
            m = evaluate_checkpoint(ckpt, trusty_weighting=weighting, workers=0, progress=False)['summary']
            results.setdefault(name, []).append(m)
            print(f'{name} seed {seed}: ' + '  '.join(f'{k} {m[k]:.1f}' for k in COLUMNS if k in m), flush=True)

    lines = [f"| variant | {' | '.join(COLUMNS)} |", '|---' * (len(COLUMNS) + 1) + '|']
    table = {}
    for name, runs in results.items():
        table[name] = {k: mean_std([r[k] for r in runs]) for k in COLUMNS if k in runs[0]}
        lines.append(f'| {name} | ' + ' | '.join(f'{table[name][k][0]:.1f} ± {table[name][k][1]:.1f}'
                                                 if k in table[name] else '–' for k in COLUMNS) + ' |')
    print('\n'.join(lines))
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    write_json({'seeds': args.seeds, 'train_args': extra, 'mean_std': table, 'runs': results}, args.out)


if __name__ == '__main__':
    main()
