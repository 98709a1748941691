"""Evaluate a checkpoint on a dataset, or on the open-vocabulary benchmark suite: per-class IoU and
accuracy, mIoU, mIoU(S), mIoU(U), hIoU, pAcc (inference and metrics: inference.py).

    python evaluate.py --checkpoint runs/voc-inductive/last.pt --dataset voc --data-root data/VOCdevkit/VOC2012
    python evaluate.py --checkpoint M.pt --suite a847,pc459,a150,pc59,pas20,pas20b --data-root datasets/
    torchrun --nproc_per_node 8 evaluate.py --checkpoint ... --dataset coco_stuff --data-root ...
"""

import argparse
import math

import torch
import torch.distributed as dist

from checkpoint import INFERENCE_KEYS, load_model, read_checkpoint
from data import DATASETS, SUITE, DatasetError, build_dataset, dataset_info
from inference import Settings, add_arguments, class_text, evaluate, format_table, inference_amp
from runtime import HelpFormatter, agreed_exit, first_error, setup_distributed, write_json
from transforms import eval_transform


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--checkpoint', required=True, help='a train.py or convert.py checkpoint')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--dataset', default=None, choices=sorted(DATASETS), help="(default: the checkpoint's dataset)")
    what.add_argument('--suite', default=None, metavar='A,B,...',
                      help=f"benchmarks to evaluate, each found under --data-root (those not there are skipped): "
                           f"{','.join(SUITE)} (or 'all')")
    p.add_argument('--data-root', default=None, help="dataset folder, or the folder holding the suite's datasets "
                                                     "(default: the checkpoint's)")
    p.add_argument('--split', default='val', choices=['train', 'val'], help='which split to evaluate')
    p.add_argument('--mode', default='slide', choices=['slide', 'whole'], help='sliding windows, or the whole image at once')
    add_arguments(p)
    p.add_argument('--workers', type=int, default=4, help='data loader processes per rank')
    p.add_argument('--out', default=None, help='write the metrics as JSON here')
    return p


def evaluate_checkpoint(checkpoint, device=None, progress=True, **flags):
    """evaluate.py as a function: `flags` are its command-line flags (data_root='data/voc', crop=64),
    every other flag at its default. Returns inference.evaluate's metrics; with `suite`, {benchmark:
    its metrics, or {'skipped': why}}."""
    args = get_parser().parse_args(['--checkpoint', str(checkpoint)])
    unknown = set(flags) - set(vars(args))
    if unknown:
        raise TypeError(f'unknown evaluate.py flags {sorted(unknown)}')
    vars(args).update(flags)
    device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    ckpt = read_checkpoint(args.checkpoint, needs=INFERENCE_KEYS)
    if args.suite is not None and args.data_root is None:
        raise SystemExit('error: --suite needs --data-root, the folder that holds the benchmarks')
    data_root = args.data_root or ckpt.get('args', {}).get('data_root')
    if data_root is None:
        raise SystemExit(f'error: {args.checkpoint} names no dataset folder: pass --data-root')
    if args.suite is not None:
        names = list(SUITE) if args.suite == 'all' else [s.strip() for s in args.suite.split(',') if s.strip()]
        if unknown := [s for s in names if s not in SUITE]:
            raise SystemExit(f"error: --suite: unknown benchmark {unknown[0]!r}; known: {', '.join(SUITE)}")
    model = load_model(ckpt, args.pretrained).to(device)
    if args.suite is None:
        return evaluate_dataset(args, ckpt, model, args.dataset or ckpt['classes']['dataset'], data_root, device,
                                progress)
    results = {}
    for name in names:
        try:
            results[name] = evaluate_dataset(args, ckpt, model, SUITE[name], data_root, device, progress, suite=True)
        except NotThere as e:
            results[name] = {'skipped': str(e)}
            print(f'{name}: skipped: {e}')
    return results


class NotThere(DatasetError):
    """A benchmark of the suite that is not under --data-root (or not readable as its layout)."""


def evaluate_dataset(args, ckpt, model, name, data_root, device, progress, suite=False):
    """The metrics of `model` on dataset `name` at data_root. DESIGN §7: the classes the checkpoint was
    trained on are seen (in the suite, every class of another dataset is unseen); calibration only for
    inductive evaluation on its training dataset, trusty weighting only on its training dataset."""
    try:  # the classes (a folder's classes.txt), the image and label list: found by every rank, or stop
        info = dataset_info(name, data_root)
        trained_on = name == ckpt['classes']['dataset'] and list(info.classes) == list(ckpt['classes']['names'])
        settings = Settings.resolve(args, info, ckpt['polarity'], trained_on, ckpt['setting'] == 'inductive')
        transform = eval_transform(model.mean, model.std, settings.short, settings.resize)
        data, error = build_dataset(name, data_root, args.split, transform), None
        data.check_files()
    except DatasetError as e:
        error = str(e)
    if (error := first_error(error)) is not None:
        raise (NotThere if suite else DatasetError)(error)
    trained = set(ckpt['classes']['seen']) if trained_on or not suite else set()
    seen = [n in trained for n in info.classes]
    text = class_text(model, info.prompt_names or info.classes, settings.templates, args.text_precision,
                      args.text_embeddings, args.text_cache)
    return evaluate(model, data, info.classes, seen, workers=args.workers, progress=progress, text=text,
                    prompt_class=info.prompt_class or None, amp=inference_amp(args.amp, device, model),
                    **settings.predict_kwargs())


def format_suite(results) -> str:
    """One row per benchmark: classes, mIoU, pAcc, and the split's numbers where it has one."""
    num = lambda v: '-' if v is None or math.isnan(v) else f'{v:.2f}'
    rows = [f"{'benchmark':<10} {'dataset':<10} {'classes':>7} {'mIoU':>6} {'pAcc':>6} {'mIoU(S)':>7} {'mIoU(U)':>7} {'hIoU':>6}"]
    for bench, m in results.items():
        if 'skipped' in m:
            rows.append(f"{bench:<10} {SUITE[bench]:<10} skipped: {m['skipped'][:60]}")
            continue
        s, split = m['summary'], any(c['seen'] for c in m['per_class'].values())
        rows.append(f"{bench:<10} {SUITE[bench]:<10} {len(m['per_class']):>7} {num(s['mIoU']):>6} {num(s['pAcc']):>6} "
                    f"{num(s['mIoU(S)'] if split else None):>7} {num(s['mIoU(U)'] if split else None):>7} "
                    f"{num(s['hIoU'] if split else None):>6}")
    return '\n'.join(rows)


def main():
    args = get_parser().parse_args()
    rank, world, device = setup_distributed()
    try:
        metrics = evaluate_checkpoint(**vars(args), device=device)
    except DatasetError as e:
        raise agreed_exit(e) from None
    except FileNotFoundError as e:
        raise SystemExit(f'error: {e}') from None
    if rank == 0:
        if args.suite:
            print(format_suite(metrics))
            summary = {b: m if 'skipped' in m else {'dataset': SUITE[b], 'classes': len(m['per_class']), **m['summary']}
                       for b, m in metrics.items()}
            if args.out:
                write_json({'checkpoint': args.checkpoint, 'suite': summary,
                            'per_class': {b: m['per_class'] for b, m in metrics.items() if 'skipped' not in m}}, args.out)
        else:
            print(format_table(metrics))
            if args.out:
                write_json({k: v for k, v in metrics.items() if k != 'confusion'}, args.out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
