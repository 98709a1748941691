"""The paper's ablation (Tab. 1) on the offline toy world, mean +- std over seeds:

    python ablation.py --seeds 0 1 2 --out runs/ablation/results.json

ZegCLIP (`--no-trusty`: no token, no self-attention) against TagCLIP with the trusty map trained by
the paper's dice (Eq. 10) or the authors' focal variant, each evaluated with and without the Eq. 12
trusty weighting. Every run is a plain `train.py` run on the same cached world and tiny CLIP; only the
training seed changes. Finished runs are reused (their last.pt), so an interrupted ablation resumes.
"""

import argparse
import math
import os
from pathlib import Path

import torch

import train
from evaluate import evaluate_checkpoint, write_json

VARIANTS = {  # name -> (train.py flags, Eq. 12 trusty weighting at evaluation)
    'ZegCLIP (--no-trusty)': (['--no-trusty'], 'off'),
    'TagCLIP, trusty dice, no weighting': (['--trusty-loss', 'dice'], 'off'),
    'TagCLIP, trusty dice': (['--trusty-loss', 'dice'], 'on'),
    'TagCLIP, trusty focal, no weighting': (['--trusty-loss', 'focal'], 'off'),
    'TagCLIP, trusty focal': (['--trusty-loss', 'focal'], 'on'),
}
COLUMNS = ('mIoU(S)', 'mIoU(U)', 'hIoU', 'pAcc')


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
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='training seeds')
    p.add_argument('--runs', default='runs/ablation', help='one train.py output folder per variant and seed')
    p.add_argument('--out', default='runs/ablation/results.json')
    p.add_argument('--train-args', default='', help="extra train.py flags for every run, e.g. '--iters 800'")
    args = p.parse_args()
    extra = args.train_args.split()

    results = {}
    for name, (flags, weighting) in VARIANTS.items():
        for seed in args.seeds:
            folder = Path(args.runs) / f"{flags[-1].lstrip('-')}-seed{seed}"
            ckpt = run(flags, seed, folder, extra)
            m = evaluate_checkpoint(ckpt, trusty_weighting=weighting, workers=0)['summary']
            results.setdefault(name, []).append(m)
            print(f'{name} seed {seed}: ' + '  '.join(f'{k} {m[k]:.1f}' for k in COLUMNS), flush=True)

    lines = [f"| variant | {' | '.join(COLUMNS)} |", '|---' * (len(COLUMNS) + 1) + '|']
    table = {}
    for name, runs in results.items():
        table[name] = {k: mean_std([r[k] for r in runs]) for k in COLUMNS}
        lines.append(f'| {name} | ' + ' | '.join(f'{m:.1f} ± {s:.1f}' for m, s in table[name].values()) + ' |')
    print('\n'.join(lines))
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    write_json({'seeds': args.seeds, 'train_args': extra, 'mean_std': table, 'runs': results}, args.out)


if __name__ == '__main__':
    main()
