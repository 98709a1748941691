"""Test-time inference: Eq. 12 scores of a whole image by sliding windows, and exact zero-shot metrics.

evaluate.py (a dataset), infer.py (a folder of images), train.py (periodic evaluation) and
benchmark.py all run inference through this file; `add_arguments` / `Settings` are the command-line
flags evaluate.py and infer.py share, with their defaults (DESIGN §7, §15):
  - geometry: the short side resized to the dataset's size (512) as mmseg does, 512 x 512 windows
    with stride 426, window scores averaged where windows overlap, then resized bilinearly to the
    original size, where the labels are (labels are never resized);
  - Eq. 12: seen scores minus 0.1 (only for inductive evaluation on the training dataset), then
    weighted by the trusty map (not across datasets).
Metrics come from one confusion matrix accumulated over the whole set (all-reduced across ranks,
every image counted exactly once): per-class IoU and accuracy, mIoU, mIoU(S), mIoU(U),
hIoU = 2 S U / (S + U), pAcc, mAcc. A class absent from both the labels and the predictions has no
IoU (NaN) and is left out of every mean, as mmsegmentation does.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE_INDEX, RESIZES
from model import TEMPLATES, seen_probability, trusty_scores
from runtime import lockstep, rank_world

STRIDE = 426 / 512   # window stride as a fraction of the window (mmseg's 426 for 512)
CALIBRATION = 0.1    # subtracted from the seen scores in inductive evaluation on the training dataset


def default_stride(crop: int) -> int:
    return round(crop * STRIDE)


# ----------------------------------------------------------------------------- settings and flags

def amp_dtype(name: str, device):
    """The --amp flag as an autocast dtype: 'auto' is bf16 on CUDA and no autocast elsewhere."""
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'off': None,
            'auto': torch.bfloat16 if device.type == 'cuda' else None}[name]


def inference_amp(name: str, device, model):
    """amp_dtype, except that 'auto' stays fp32 for a model whose config asks for it (converted ones)."""
    return None if name == 'auto' and model.cfg.fp32_inference else amp_dtype(name, device)


def add_arguments(p):
    """The inference flags of evaluate.py and infer.py (None / 'auto': see `Settings.resolve`)."""
    p.add_argument('--pretrained', default=None, help="open_clip tag or file of the frozen CLIP weights "
                   "(default: the checkpoint's, or the CLIP it stores)")
    p.add_argument('--templates', default=None, choices=sorted(TEMPLATES), help="prompt templates (default: the dataset's)")
    t = p.add_mutually_exclusive_group()
    t.add_argument('--text-precision', default='fp32', choices=['fp32', 'fp16'],
                   help="text tower precision; fp16: as the authors' precomputed embeddings")
    t.add_argument('--text-embeddings', default=None, metavar='FILE.npy',
                   help="(C, d) text embeddings, one row per class in the order of the class list (e.g. the authors' files)")
    p.add_argument('--calibration', type=float, default=None,
                   help=f'subtracted from the seen scores (default: {CALIBRATION} for inductive evaluation on the '
                        'training dataset, else 0)')
    p.add_argument('--trusty-weighting', default='auto', choices=['auto', 'on', 'off'],
                   help='Eq. 12: seen scores times A, unseen times 1 - A (auto: on, except on another dataset than the training one)')
    p.add_argument('--short', type=int, default=None, help="resize the short side to this (default: the dataset's, 512)")
    p.add_argument('--resize', default='mmseg', choices=RESIZES,
                   help="mmseg: short side exactly --short, long side rounded, plain bilinear (the published numbers); "
                        "torchvision: resize(img, [short], antialias=True)")
    p.add_argument('--crop', type=int, default=None, help="sliding window size (default: the dataset's crop, 512)")
    p.add_argument('--stride', type=int, default=None, help=f'sliding window stride (default: {STRIDE * 512:.0f}/512 of the window)')
    p.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'off'],
                   help="autocast (auto: bf16 on CUDA, off on CPU and for converted checkpoints, whose scores are fp32)")


@dataclass
class Settings:
    """How one model is run on one vocabulary: everything `predict` needs besides the model and text."""
    crop: int
    stride: int
    short: int
    resize: str
    calibration: float
    trusty_weighting: bool
    polarity: str
    templates: str
    mode: str = 'slide'

    @classmethod
    def resolve(cls, args, info, polarity: str, same_dataset: bool, inductive: bool):
        """The flags of `add_arguments` with their defaults filled in for the dataset entry `info`:
        calibration 0.1 only for inductive evaluation on the training dataset; trusty weighting off
        across datasets."""
        crop = args.crop or info.crop
        return cls(crop=crop, stride=args.stride or default_stride(crop), short=args.short or info.eval_short,
                   resize=args.resize, templates=args.templates or info.templates,
                   calibration=(CALIBRATION if inductive and same_dataset else 0.0) if args.calibration is None
                   else args.calibration,
                   trusty_weighting={'auto': same_dataset, 'on': True, 'off': False}[args.trusty_weighting],
                   polarity=polarity, mode=getattr(args, 'mode', 'slide'))

    def predict_kwargs(self):
        return dict(mode=self.mode, crop=self.crop, stride=self.stride, calibration=self.calibration,
                    trusty_weighting=self.trusty_weighting, polarity=self.polarity)


# ----------------------------------------------------------------------------- text

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


# ----------------------------------------------------------------------------- windows and Eq. 12

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


def upsample_argmax(scores, C: int, size, chunk: int = 32):
    """predict's last step (bilinear resize to the original size), then the argmax over the C classes,
    a few channels at a time: memory (chunk, H, W), not (C, H, W). scores (C[+1], h, w) -> label
    (H, W) and the trusty map A (H, W) or None."""
    up = lambda s: F.interpolate(s[None], size=tuple(size), mode='bilinear', align_corners=False)[0]
    best = torch.full(tuple(size), -float('inf'), device=scores.device)
    label = torch.zeros(tuple(size), dtype=torch.long, device=scores.device)
    for i in range(0, C, chunk):
        v, j = up(scores[i:min(i + chunk, C)]).max(0)  # (H, W); ties keep the lower index, as argmax does
        better = v > best
        best, label = torch.where(better, v, best), torch.where(better, j + i, label)
    return label, (up(scores[C:])[0] if scores.shape[0] > C else None)


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
                                       persistent_workers=persistent and workers > 0,
                                       generator=torch.Generator())  # its workers' seed: not from the global RNG


@torch.no_grad()
def evaluate(model, dataset, class_names, seen, templates=None, workers=0, progress=True, text=None, **kw):
    """Confusion matrix over the whole `dataset` (or an `eval_loader` of it), all-reduced; the text is
    embedded once (or given: `text` (C, d)). kw: `predict`'s. Returns compute_metrics(...) + 'confusion'."""
    model.eval()
    rank, world = rank_world()
    device = next(model.parameters()).device
    text = model.encode_text(class_names, templates) if text is None else text  # (C, d), once per evaluation
    seen = torch.as_tensor(seen, dtype=torch.bool, device=device)
    loader = dataset if isinstance(dataset, torch.utils.data.DataLoader) else eval_loader(dataset, workers)
    C = len(class_names)
    conf = torch.zeros(C, C, dtype=torch.long, device=device)
    trusty = torch.zeros(2, 2, dtype=torch.long, device=device)  # rows: unseen/seen pixel; cols: A <= / > 0.5
    for sample in tqdm(lockstep(loader, device), desc='eval', total=len(loader),
                       disable=not (progress and rank == 0), dynamic_ncols=True):
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
