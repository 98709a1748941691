"""Evaluate a checkpoint on a dataset: per-class IoU and accuracy, mIoU, mIoU(S), mIoU(U), hIoU, pAcc
(inference and metrics: inference.py).

    python evaluate.py --checkpoint runs/voc/best.pt --dataset voc --data-root data/VOCdevkit/VOC2012
    torchrun --nproc_per_node 8 evaluate.py --checkpoint ... --dataset coco_stuff --data-root ...
"""

import argparse

import torch
import torch.distributed as dist

from checkpoint import INFERENCE_KEYS, load_model, read_checkpoint
from data import DATASETS, DatasetError, build_dataset, eval_transform
from inference import Settings, add_arguments, class_text, evaluate, format_table, inference_amp
from runtime import HelpFormatter, agreed_exit, first_error, setup_distributed, write_json


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--checkpoint', required=True, help='a train.py or convert.py checkpoint')
    p.add_argument('--dataset', default=None, choices=sorted(DATASETS), help="(default: the checkpoint's dataset)")
    p.add_argument('--data-root', default=None, help="dataset folder (mmseg layout) (default: the checkpoint's)")
    p.add_argument('--split', default='val', choices=['train', 'val'], help='which split to evaluate')
    p.add_argument('--mode', default='slide', choices=['slide', 'whole'], help='sliding windows, or the whole image at once')
    add_arguments(p)
    p.add_argument('--workers', type=int, default=4, help='data loader processes per rank')
    p.add_argument('--out', default=None, help='write the metrics as JSON here')
    return p


def evaluate_checkpoint(checkpoint, device=None, progress=True, **flags):
    """evaluate.py as a function: `flags` are its command-line flags (data_root='data/voc', crop=64),
    every other flag at its default. Returns inference.evaluate's metrics."""
    args = get_parser().parse_args(['--checkpoint', str(checkpoint)])
    unknown = set(flags) - set(vars(args))
    if unknown:
        raise TypeError(f'unknown evaluate.py flags {sorted(unknown)}')
    vars(args).update(flags)
    device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    ckpt = read_checkpoint(args.checkpoint, needs=INFERENCE_KEYS)
    name = args.dataset or ckpt['classes']['dataset']
    info = DATASETS[name]
    data_root = args.data_root or ckpt.get('args', {}).get('data_root')
    if data_root is None:
        raise SystemExit(f'error: {args.checkpoint} names no dataset folder: pass --data-root')
    # DESIGN §7: the classes the checkpoint was trained on are seen; calibration only for inductive
    # evaluation on its training dataset, trusty weighting only on its training dataset
    trained_on = name == ckpt['classes']['dataset']
    settings = Settings.resolve(args, info, ckpt['polarity'], trained_on, ckpt['setting'] == 'inductive')
    seen = [n in set(ckpt['classes']['seen']) for n in info.classes]
    model = load_model(ckpt, args.pretrained).to(device)
    try:
        transform = eval_transform(model.mean, model.std, settings.short, settings.resize)
        data, error = build_dataset(name, data_root, args.split, transform), None
    except DatasetError as e:
        error = str(e)
    if (error := first_error(error)) is not None:
        raise DatasetError(error)
    text = class_text(model, info.classes, settings.templates, args.text_precision, args.text_embeddings)
    return evaluate(model, data, info.classes, seen, workers=args.workers, progress=progress, text=text,
                    amp=inference_amp(args.amp, device, model), **settings.predict_kwargs())


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
        print(format_table(metrics))
        if args.out:
            write_json({k: v for k, v in metrics.items() if k != 'confusion'}, args.out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
