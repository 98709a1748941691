"""Evaluation: batched sliding-window inference with Eq. 12 scores, and exact zero-shot metrics.

Metrics come from one confusion matrix accumulated over the whole set (all-reduced across ranks,
every image counted exactly once): per-class IoU and accuracy, mIoU, mIoU(S), mIoU(U),
hIoU = 2 S U / (S + U), pAcc, mAcc. A class absent from both the labels and the predictions has no
IoU (NaN) and is left out of every mean, as mmsegmentation does.

    python evaluate.py --checkpoint runs/voc/best.pt --dataset voc --data-root data/VOCdevkit/VOC2012
    torchrun --nproc_per_node 8 evaluate.py --checkpoint ... --dataset coco_stuff --data-root ...
"""

import argparse
import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import DATASETS, IGNORE_INDEX, RESIZES, DatasetError, build_dataset, eval_transform
from checkpoint import INFERENCE_KEYS, load_model, read_checkpoint
from model import seen_probability, trusty_scores
from runtime import agreed_exit, first_error, in_step, rank_world, setup_distributed, write_json


# ----------------------------------------------------------------------------- precision

def amp_dtype(name: str, device):
    """The --amp flag as an autocast dtype: 'auto' is bf16 on CUDA and no autocast elsewhere."""
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'off': None,
            'auto': torch.bfloat16 if device.type == 'cuda' else None}[name]


def inference_amp(name: str, device, model):
    """amp_dtype, except that 'auto' stays fp32 for a model whose config asks for it (converted ones)."""
    return None if name == 'auto' and model.cfg.fp32_inference else amp_dtype(name, device)


# ----------------------------------------------------------------------------- inference

def window_grid(h: int, w: int, crop: int, stride: int):
    """mmseg slide windows: (y1, y2, x1, x2) covering an h x w image, last ones flush with the border."""
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def window_scores(model, windows, text, seen, calibration=0.0, trusty_weighting=True, polarity='unseen', amp=None):
    """Eq. 12 scores of a batch of windows (n, 3, h, w) -> (n, C[+1], h, w); the extra last channel,
    when the model has a trusty token, is A = P(pixel belongs to a seen class)."""
    n, _, h, w = windows.shape
    p = model.patch_size
    ph, pw = -h % p, -w % p  # pad to a multiple of the patch size, cut the scores back
    x = F.pad(windows, (0, pw, 0, ph))
    with torch.autocast(x.device.type, dtype=amp) if amp else nullcontext():
        logits = model(x, text)['pred_masks']                        # (n, C[+1], h/p, w/p)
    logits = F.interpolate(logits.float(), size=x.shape[-2:], mode='bilinear', align_corners=False)
    logits = logits[..., :h, :w]                                     # (n, C[+1], h, w)
    S = trusty_scores(logits, seen, calibration, trusty_weighting, polarity)  # (n, C, h, w)
    C = seen.numel()
    if logits.shape[1] == C + 1:
        S = torch.cat([S, seen_probability(logits[:, C:], polarity)], 1)
    return S


@torch.no_grad()
def slide_inference(model, image, text, seen, crop: int, stride: int, chunk: int = 16, **kw):
    """All windows of one image (3, h, w) as one batch (in chunks of `chunk` to bound memory);
    overlapping scores averaged. Returns (C[+1], h, w)."""
    _, h, w = image.shape
    boxes = window_grid(h, w, crop, stride)
    windows = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # (n, 3, crop, crop)
    scores = torch.cat([window_scores(model, windows[i:i + chunk], text, seen, **kw)
                        for i in range(0, len(boxes), chunk)])                   # (n, C[+1], crop, crop)
    total = scores.new_zeros(scores.shape[1], h, w)
    count = scores.new_zeros(1, h, w)
    for s, (y1, y2, x1, x2) in zip(scores, boxes):
        total[:, y1:y2, x1:x2] += s
        count[:, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def predict(model, image, text, seen, out_size, mode='slide', crop=512, stride=426, **kw):
    """Scores (C[+1], H, W) at the original size `out_size` for one normalised, resized image."""
    image = image.to(text.device)
    if mode == 'slide':
        scores = slide_inference(model, image, text, seen, crop, stride, **kw)
    else:
        scores = window_scores(model, image[None], text, seen, **kw)[0]
    return F.interpolate(scores[None], size=tuple(out_size), mode='bilinear', align_corners=False)[0]


def load_text_embeddings(path, class_names, dim: int):
    """A user's (C, d) .npy of text embeddings, rows in the order of `class_names` (e.g. the authors'
    fp16 files). Rows L2-normalised to 1e-2 are used as given (fp16 files are normalised to ~1e-3);
    other rows are normalised, with a note. Returns float32 (C, d); a bad file is a one-line error."""
    try:
        emb = np.load(path, allow_pickle=False)
    except OSError as e:
        raise SystemExit(f'error: --text-embeddings {path}: {e.strerror or e}') from None
    except (ValueError, EOFError) as e:
        raise SystemExit(f"error: --text-embeddings {path}: not a .npy array ({' '.join(str(e).split())})") from None
    if not isinstance(emb, np.ndarray) or emb.dtype.kind != 'f' or emb.ndim != 2:
        what = 'an .npz archive' if not isinstance(emb, np.ndarray) else f'{emb.dtype} {emb.shape}'
        raise SystemExit(f'error: --text-embeddings {path}: {what}, expected a float (C, d) array')
    if emb.shape != (len(class_names), dim):
        raise SystemExit(f'error: --text-embeddings {path}: shape {emb.shape}, expected ({len(class_names)}, {dim}): '
                         f'one row per class ({len(class_names)} classes) of the model\'s width {dim}')
    emb = torch.from_numpy(emb.astype(np.float32))  # fp16 -> fp32 is exact
    norms = emb.norm(dim=-1)
    if not torch.isfinite(emb).all() or (norms == 0).any():
        raise SystemExit(f'error: --text-embeddings {path}: rows with NaN, inf or all zeros')
    if ((norms - 1).abs() > 1e-2).any():
        print(f'note: {path}: rows not L2-normalised (norms {norms.min():.3g}..{norms.max():.3g}); normalising them')
        emb = emb / norms[:, None]
    return emb


def class_text(model, class_names, templates=None, precision='fp32', path=None):
    """(C, d) text embeddings T: read from the .npy at `path`, or computed by the frozen text tower
    in `precision` ('fp32', or 'fp16' as the authors' precomputed files; DESIGN §1, §15)."""
    if path is None:
        return model.encode_text(class_names, templates, precision=precision)
    return load_text_embeddings(path, class_names, model.descriptor.out_features).to(model.prompts.device)


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(pred, label, num_classes: int):
    """(C, C) counts, rows = ground truth, columns = prediction; label-255 pixels are skipped."""
    keep = label != IGNORE_INDEX
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def compute_metrics(conf, class_names, seen):
    """Per-class IoU/Acc and the summary (percentages) from a (C, C) confusion matrix."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float('nan')))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float('nan')))
    seen = torch.as_tensor(seen, dtype=torch.bool)
    mean = lambda v: 100 * v[~v.isnan()].mean().item() if (~v.isnan()).any() else float('nan')
    s, u = mean(iou[seen]), mean(iou[~seen])
    summary = {'pAcc': 100 * (tp.sum() / conf.sum().clamp(min=1)).item(), 'mAcc': mean(acc), 'mIoU': mean(iou),
               'mIoU(S)': s, 'mIoU(U)': u,
               'hIoU': 2 * s * u / (s + u) if (s + u) > 0 and not math.isnan(s + u) else float('nan')}
    per_class = {n: {'IoU': 100 * i, 'Acc': 100 * a, 'seen': bool(k)}
                 for n, i, a, k in zip(class_names, iou.tolist(), acc.tolist(), seen.tolist())}
    return {'summary': summary, 'per_class': per_class}


def eval_loader(dataset, workers=0, persistent=False):
    """One image per item; each rank takes every world-th image: no padding, no duplicates.
    persistent: keep the worker processes between evaluations (periodic evaluation in train.py)."""
    rank, world = rank_world()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    return torch.utils.data.DataLoader(shard, batch_size=None, num_workers=workers,
                                       persistent_workers=persistent and workers > 0)


@torch.no_grad()
def evaluate(model, dataset, class_names, seen, templates=None, workers=0, progress=True, text=None, **kw):
    """Confusion matrix over the whole `dataset` (or an `eval_loader` of it), all-reduced; the text is
    embedded once (or given: `text` (C, d)). Returns compute_metrics(...) + 'confusion'."""
    model.eval()
    rank, world = rank_world()
    device = next(model.parameters()).device
    text = model.encode_text(class_names, templates) if text is None else text  # (C, d), once per evaluation
    seen = torch.as_tensor(seen, dtype=torch.bool, device=device)
    loader = dataset if isinstance(dataset, torch.utils.data.DataLoader) else eval_loader(dataset, workers)
    C = len(class_names)
    conf = torch.zeros(C, C, dtype=torch.long, device=device)
    trusty = torch.zeros(2, 2, dtype=torch.long, device=device)  # rows: unseen/seen pixel; cols: A <= / > 0.5
    for sample in tqdm(in_step(loader, device), desc='eval', total=len(loader), disable=not (progress and rank == 0),
                       dynamic_ncols=True):
        label = sample['label'].to(device)
        scores = predict(model, sample['image'], text, seen, label.shape[-2:], **kw)  # (C[+1], H, W)
        conf += confusion_matrix(scores[:C].argmax(0), label, C)
        if scores.shape[0] > C:  # the trusty map A: is it right about which pixels are seen?
            keep = label != IGNORE_INDEX
            trusty += confusion_matrix(scores[C][keep] > 0.5, seen[label[keep]], 2)
    if world > 1:
        dist.all_reduce(conf)
        dist.all_reduce(trusty)
    metrics = compute_metrics(conf.cpu(), class_names, seen.cpu())
    for key, row in (('A-right(S)', 1), ('A-right(U)', 0)):  # % of seen px with A > 0.5, unseen px with A <= 0.5
        if trusty[row].sum() > 0:
            metrics['summary'][key] = 100 * trusty[row, row].item() / trusty[row].sum().item()
    return {**metrics, 'confusion': conf.cpu().tolist()}


def format_table(metrics) -> str:
    rows = [f"{'class':<24} {'split':<6} {'IoU':>6} {'Acc':>6}"]
    for name, m in metrics['per_class'].items():
        rows.append(f"{name:<24} {'seen' if m['seen'] else 'unseen':<6} {m['IoU']:6.2f} {m['Acc']:6.2f}")
    rows.append('  '.join(f'{k} {v:.2f}' for k, v in metrics['summary'].items()))
    return '\n'.join(rows)


def inference_defaults(ckpt: dict, dataset: str, class_names):
    """DESIGN §7: which classes count as seen, and the default calibration / trusty weighting for
    evaluating `ckpt` on `dataset` (0.1 only for inductive evaluation on the training dataset;
    no trusty weighting across datasets)."""
    trained = set(ckpt['classes']['seen'])
    same = dataset == ckpt['classes']['dataset']
    inductive = ckpt['setting'] == 'inductive' and same
    return [n in trained for n in class_names], (0.1 if inductive else 0.0), same


def evaluate_checkpoint(path, dataset=None, data_root=None, split='val', pretrained=None, mode='slide',
                        crop=None, stride=None, calibration=None, trusty_weighting='auto', templates=None,
                        workers=4, amp='auto', device=None, progress=True, resize='mmseg', text_precision='fp32',
                        text_embeddings=None):
    """Evaluate a train.py checkpoint with the defaults of DESIGN §7 (see `inference_defaults`);
    every argument left None/'auto' takes that default; `resize`, `text_precision` and
    `text_embeddings` (a .npy path) as DESIGN §15. Returns evaluate(...)'s metrics."""
    device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    ckpt = read_checkpoint(path, needs=INFERENCE_KEYS)
    name = dataset or ckpt['classes']['dataset']
    info = DATASETS[name]
    data_root = data_root or ckpt.get('args', {}).get('data_root')
    if data_root is None:
        raise SystemExit(f'error: {path} names no dataset folder: pass --data-root')
    model = load_model(ckpt, pretrained).to(device)
    try:
        data, error = build_dataset(name, data_root, split,
                                    eval_transform(model.mean, model.std, info.eval_short, resize)), None
    except DatasetError as e:
        error = str(e)
    if (error := first_error(error)) is not None:
        raise DatasetError(error)
    seen, default_calibration, same = inference_defaults(ckpt, name, info.classes)
    crop = crop or info.crop
    amp = inference_amp(amp, device, model)
    text = class_text(model, info.classes, templates or info.templates, text_precision, text_embeddings)
    return evaluate(model, data, info.classes, seen, workers=workers, progress=progress, text=text,
                    mode=mode, crop=crop, stride=stride or round(crop * 426 / 512),
                    calibration=default_calibration if calibration is None else calibration,
                    trusty_weighting={'auto': same, 'on': True, 'off': False}[trusty_weighting],
                    polarity=ckpt['polarity'], amp=amp)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='a train.py or convert.py checkpoint')
    p.add_argument('--dataset', default=None, choices=sorted(DATASETS), help="default: the checkpoint's dataset")
    p.add_argument('--data-root', default=None, help="dataset folder (mmseg layout); default: the checkpoint's")
    p.add_argument('--split', default='val')
    p.add_argument('--pretrained', default=None, help='override where the frozen CLIP weights are read from')
    p.add_argument('--mode', default='slide', choices=['slide', 'whole'])
    p.add_argument('--crop', type=int, default=None, help="window size (default: the dataset's crop, 512)")
    p.add_argument('--stride', type=int, default=None, help='window stride (default: 426/512 of the crop)')
    p.add_argument('--calibration', type=float, default=None,
                   help='seen-score calibration (default: 0.1 for inductive evaluation on the training dataset, else 0)')
    p.add_argument('--trusty-weighting', default='auto', choices=['auto', 'on', 'off'],
                   help='Eq. 12 weighting by the trusty map (auto: on unless cross-dataset)')
    p.add_argument('--templates', default=None, choices=['single', 'ensemble'], help="default: the dataset's")
    t = p.add_mutually_exclusive_group()
    t.add_argument('--text-precision', default='fp32', choices=['fp32', 'fp16'],
                   help="text tower precision; fp16: as the authors' precomputed embeddings")
    t.add_argument('--text-embeddings', default=None, metavar='FILE.npy',
                   help="(C, d) text embeddings, one row per class in the dataset's class order (e.g. the authors' files)")
    p.add_argument('--resize', default='mmseg', choices=RESIZES,
                   help="mmseg: short side exactly 512, long side rounded, plain bilinear (the published numbers); "
                        "torchvision: resize(img, [512], antialias=True)")
    p.add_argument('--workers', type=int, default=4, help='data loader processes per rank')
    p.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'off'],
                   help="auto: bf16 on CUDA (off for converted checkpoints: the authors' scores are fp32)")
    p.add_argument('--out', default=None, help='write the metrics JSON here')
    args = p.parse_args()

    rank, world, device = setup_distributed()
    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_root, args.split, args.pretrained,
                                      args.mode, args.crop, args.stride, args.calibration, args.trusty_weighting,
                                      args.templates, args.workers, args.amp, device, resize=args.resize,
                                      text_precision=args.text_precision, text_embeddings=args.text_embeddings)
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
