"""Test-time inference: Eq. 12 scores of a whole image by sliding windows, and exact zero-shot metrics.

evaluate.py (a dataset), infer.py (a folder of images), train.py (periodic evaluation) and
benchmark.py all run inference through this file; `add_arguments` / `Settings` are the command-line
flags evaluate.py and infer.py share, with their defaults (DESIGN §7, §15):
  - geometry: the short side resized to the dataset's size (512) as mmseg does, 512 x 512 windows
    with stride 426, window scores averaged where windows overlap (a running sum, a batch of windows
    at a time), then resized bilinearly to the original size, where the labels are (labels are never
    resized); the resize and its argmax go piece by piece, bit for bit the full resize (upsampled),
    so memory follows TILE_BYTES and WINDOW_BYTES, not C x H x W;
  - Eq. 12: seen scores minus 0.1 (only for inductive evaluation on the training dataset), then
    weighted by the trusty map (not across datasets).
Metrics come from one confusion matrix accumulated over the whole set (all-reduced across ranks,
every image counted exactly once): per-class IoU and accuracy, mIoU, mIoU(S), mIoU(U),
hIoU = 2 S U / (S + U), pAcc, mAcc. A class absent from both the labels and the predictions has no
IoU (NaN) and is left out of every mean, as mmsegmentation does.
"""

import hashlib
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from model import TEMPLATES, seen_probability
from runtime import atomic_write, lockstep, rank_world
from transforms import RESIZES

STRIDE = 426 / 512   # window stride as a fraction of the window (mmseg's 426 for 512)
CALIBRATION = 0.1    # subtracted from the seen scores in inductive evaluation on the training dataset
WINDOW_BYTES = 1 << 30  # scores of one batch of windows, (n, C[+1], crop, crop) float32: fewer windows beyond
TILE_BYTES = 64 << 20   # one piece of the resize to the original size and its argmax (upsampled)
CLASS_BLOCK = 64        # classes whose Eq. 12 scores window_scores computes at a time


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
    p.add_argument('--text-cache', default='~/.cache/tagclip/text', metavar='DIR',
                   help="keep computed text embeddings here, keyed by text tower weights, templates and names ('' : off)")
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


def text_cache_key(model, class_names, templates, precision) -> str:
    """What text embeddings depend on: the frozen text tower's weights, the prompts, the precision."""
    h = hashlib.sha256(json.dumps([model.cfg.clip_model, list(TEMPLATES[templates or model.cfg.templates]),
                                   list(class_names), precision]).encode())
    for k, v in model.clip.state_dict().items():
        if not k.startswith('visual.'):
            h.update(k.encode())
            h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def class_text(model, class_names, templates=None, precision='fp32', path=None, cache=None):
    """(C, d) text embeddings T: read from the .npy at `path`, or computed by the frozen text tower
    in `precision` ('fp32', or 'fp16' as the authors' precomputed files; DESIGN §1, §15). cache: a
    folder where computed embeddings are kept as <text_cache_key>.npy and found again (rank 0 writes)."""
    device = model.prompts.device
    if path is not None:
        return load_text_embeddings(path, class_names, model.descriptor.out_features).to(device)
    file = Path(cache).expanduser() / f'{text_cache_key(model, class_names, templates, precision)}.npy' if cache else None
    if file is not None and file.is_file():
        try:
            emb = np.load(file, allow_pickle=False)
            if emb.shape == (len(class_names), model.descriptor.out_features):
                return torch.from_numpy(emb).to(device)
        except (OSError, ValueError, EOFError):
            pass  # unreadable: computed again and rewritten
    emb = model.encode_text(class_names, templates, precision=precision)  # (C, d)
    if file is not None and rank_world()[0] == 0:
        file.parent.mkdir(parents=True, exist_ok=True)
        array = emb.cpu().numpy()

        def write(tmp):
            with open(tmp, 'wb') as f:
                np.save(f, array)
        atomic_write(file, write)
    return emb


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
    when the model has a trusty token, is A = P(pixel belongs to a seen class). model.trusty_scores,
    computed in place on the upsampled logits, CLASS_BLOCK classes at a time: the same numbers, and
    one (n, C[+1], h, w) tensor (0.9 GB for a 512 x 512 window at 847 classes) instead of five."""
    n, _, h, w = windows.shape
    p = model.patch_size
    ph, pw = -h % p, -w % p  # pad to a multiple of the patch size, cut the scores back
    x = F.pad(windows, (0, pw, 0, ph))
    with torch.autocast(x.device.type, dtype=amp) if amp else nullcontext():
        logits = model(x, text)['pred_masks']                        # (n, C[+1], h/p, w/p)
    scores = F.interpolate(logits.float(), size=x.shape[-2:], mode='bilinear', align_corners=False)
    scores = scores[..., :h, :w]                                     # (n, C[+1], h, w) logits, then scores
    C = seen.numel()
    seen = seen.to(scores.device)
    A = seen_probability(scores[:, C:], polarity) if scores.shape[1] == C + 1 else None  # (n, 1, h, w)
    for c0 in range(0, C, CLASS_BLOCK):
        S, k = scores[:, c0:min(c0 + CLASS_BLOCK, C)], seen[c0:c0 + CLASS_BLOCK].view(1, -1, 1, 1)
        S.sigmoid_().sub_(calibration * k)
        if trusty_weighting and A is not None:
            S.mul_(torch.where(k, A, 1 - A))  # S[seen] *= A, S[unseen] *= 1 - A
    if A is not None:
        scores[:, C:] = A
    return scores


@torch.no_grad()
def slide_inference(model, image, text, seen, crop: int, stride: int, chunk: int = 16, **kw):
    """All windows of one image (3, h, w), `chunk` at a time (fewer when their scores would pass
    WINDOW_BYTES); each batch's scores are added to a running sum and count as they come, so memory is
    the (C[+1], h, w) sum plus one batch, however many windows there are. Overlapping scores averaged.
    Returns (C[+1], h, w)."""
    _, h, w = image.shape
    boxes = window_grid(h, w, crop, stride)
    chunk = max(1, min(chunk, WINDOW_BYTES // (4 * (text.shape[0] + 1) * min(crop, h) * min(crop, w))))
    total = count = None
    for i in range(0, len(boxes), chunk):
        batch = boxes[i:i + chunk]
        windows = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in batch])  # (n, 3, crop, crop)
        scores = window_scores(model, windows, text, seen, **kw)                      # (n, C[+1], crop, crop)
        if total is None:
            total, count = scores.new_zeros(scores.shape[1], h, w), scores.new_zeros(1, h, w)
        for s, (y1, y2, x1, x2) in zip(scores, batch):
            total[:, y1:y2, x1:x2] += s
            count[:, y1:y2, x1:x2] += 1
    return total.div_(count)


@torch.no_grad()
def image_scores(model, image, text, seen, mode='slide', crop=512, stride=426, **kw):
    """Scores (C[+1], h, w) of one normalised, resized image (3, h, w), at its size."""
    image = image.to(text.device)
    if mode == 'slide':
        return slide_inference(model, image, text, seen, crop, stride, **kw)
    return window_scores(model, image[None], text, seen, **kw)[0]


@torch.no_grad()
def predict(model, image, text, seen, out_size, **kw):
    """Scores (C[+1], H, W) at the original size `out_size`, all in memory at once: for small images.
    evaluate and infer.py resize and reduce them tile by tile instead (upsample_argmax)."""
    return upsample(image_scores(model, image, text, seen, **kw), out_size)


# ----------------------------------------------------------------------------- to the original size, in tiles

def upsample(scores, size):
    """Bilinear resize (align_corners=False) of (k, h, w) to (k, *size)."""
    return F.interpolate(scores[None], size=tuple(size), mode='bilinear', align_corners=False)[0]


def channel_chunks(n: int, k: int, split_three: bool = True):
    """[i, j) ranges of at most k of n channels; split_three: none of exactly three (on one thread
    PyTorch resizes three channels with its separable kernel, whose results differ in the last bits)."""
    k, i = max(1, 2 if k == 3 and split_three else k), 0
    while i < n:
        j = min(i + k, n)
        j -= split_three and j - i == 3
        yield i, j
        i = j


def upsampled(scores, size, budget: int = TILE_BYTES, chunk: int = 32):
    """upsample(scores, size) in pieces: yields (i, j, c0, c1, u), u (j - i, H, c1 - c0) equal bit for
    bit to upsample(scores[i:j], size)[:, :, c0:c1], each piece with its argmax about `budget` bytes
    (4 (k + 4) per pixel of k channels: the scores, the max, its int64 index, the mask).
    Whole frames of up to `chunk` channels when they fit. Else two passes of the same kernel, which is
    what it computes, since the bilinear weights of an unchanged axis are exactly 1 and 0: across, rows
    unchanged (k, h, W); then down, columns unchanged, on strips of columns. Each pass spans the whole
    axis it resizes, so its source indices and weights are those of the full resize. PyTorch resizes
    outputs of H + W <= 128 pixels with its separable kernel, whose last bits depend on how channels
    are grouped: those stay whole frames of `chunk` channels."""
    n, h, w = scores.shape
    H, W = size
    fit = budget // (4 * H * W) - 4
    if fit >= 1 or H + W <= 128 or h + W <= 128:
        k = max(1, min(chunk, fit)) if H + W > 128 else chunk
        for i, j in channel_chunks(n, k, split_three=H + W > 128):
            yield i, j, 0, W, upsample(scores[i:j], size)
        return
    narrowest = min(W, max(1, 129 - H))  # a strip H x s takes the generic kernel when H + s > 128
    k = max(1, min(chunk, budget // 2 // (4 * h * W), budget // 2 // (4 * H * narrowest) - 4))
    for i, j in channel_chunks(n, k):
        across = upsample(scores[i:j], (h, W))                                      # (k, h, W)
        strips = max(1, W // max(narrowest, budget // 2 // (4 * (j - i + 4) * H)))
        edges = [W * q // strips for q in range(strips + 1)]
        for c0, c1 in zip(edges, edges[1:]):
            yield i, j, c0, c1, upsample(across[:, :, c0:c1].contiguous(), (H, c1 - c0))  # (k, H, c1 - c0)


def upsample_argmax(scores, C: int, size, budget: int = TILE_BYTES):
    """predict's last step (bilinear resize to the original size) and the argmax over the C classes,
    piece by piece (`upsampled`): memory ~`budget` beside the results, not C x H x W. Ties keep the
    lower index, as argmax does. scores (C[+1], h, w) -> label (H, W) uint8 (int32 above 256 classes)
    and the trusty map A (H, W) float32 or None."""
    H, W = size
    best = torch.full((H, W), -float('inf'), device=scores.device)
    label = torch.zeros((H, W), dtype=torch.uint8 if C <= 256 else torch.int32, device=scores.device)
    for i, _, c0, c1, u in upsampled(scores[:C], size, budget):
        v, k = u.max(0)                          # (H, c1 - c0): the first of equal maxima, as argmax
        b, l = best[:, c0:c1], label[:, c0:c1]   # views: written in place
        better = v > b                           # strictly: ties keep the earlier chunk
        b.copy_(torch.where(better, v, b))
        l.copy_(torch.where(better, (k + i).to(label.dtype), l))
    if scores.shape[0] == C:
        return label, None
    del best
    A = torch.empty((H, W), device=scores.device)
    for _, _, c0, c1, u in upsampled(scores[C:C + 1], size, budget):
        A[:, c0:c1] = u[0]
    return label, A


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(pred, label, num_classes: int):
    """(C, C) counts, rows = ground truth, columns = prediction; ignored pixels (label >= C: 255, or
    65535 for 16-bit datasets) are skipped."""
    keep = label < num_classes
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
def evaluate(model, dataset, class_names, seen, templates=None, workers=0, progress=True, text=None,
             prompt_class=None, **kw):
    """Confusion matrix over the whole `dataset` (or an `eval_loader` of it), all-reduced; the text is
    embedded once (or given: `text` (C, d)). kw: `predict`'s. Scores are resized to the labels' size and
    reduced to labels piece by piece (upsample_argmax), never C x H x W at once. prompt_class: with
    `text` (P, d) of P prompts, the class each one's prediction counts as (e.g. extra names that stand
    for background). Returns compute_metrics(...) + 'confusion'."""
    model.eval()
    rank, world = rank_world()
    device = next(model.parameters()).device
    text = model.encode_text(class_names, templates) if text is None else text  # (C, d), once per evaluation
    seen = torch.as_tensor(seen, dtype=torch.bool, device=device)
    if prompt_class is not None:
        prompt_class = torch.as_tensor(prompt_class, device=device)                    # (P,) class of each prompt
    prompt_seen = seen if prompt_class is None else seen[prompt_class]                  # (P,)
    loader = dataset if isinstance(dataset, torch.utils.data.DataLoader) else eval_loader(dataset, workers)
    C = len(class_names)
    conf = torch.zeros(C, C, dtype=torch.long, device=device)
    trusty = torch.zeros(2, 2, dtype=torch.long, device=device)  # rows: unseen/seen pixel; cols: A <= / > 0.5
    for sample in tqdm(lockstep(loader, device), desc='eval', total=len(loader),
                       disable=not (progress and rank == 0), dynamic_ncols=True):
        label = sample['label'].to(device)                                    # (H, W)
        scores = image_scores(model, sample['image'], text, prompt_seen, **kw)  # (P[+1], h, w), P = C by default
        pred, A = upsample_argmax(scores, len(prompt_seen), label.shape[-2:])  # (H, W), tile by tile
        del scores
        if prompt_class is not None:
            pred = prompt_class[pred.long()]  # (a uint8 index would read as a mask)
        conf += confusion_matrix(pred, label, C)
        if A is not None:  # the trusty map A: is it right about which pixels are seen?
            keep = label < C
            trusty += confusion_matrix(A[keep] > 0.5, seen[label[keep]], 2)
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
