"""Segment your own images with any list of class names (Eq. 12 and the geometry of inference.py).

    python infer.py --checkpoint runs/voc-inductive/best.pt --input photos/ --output out/ \
        --classes "cat,sofa,potted plant,window" --save-trusty

Per image, at its relative path <rel> (extension included) under --output: <rel>.label.png, the label
map at the original size (palette PNG, values index the vocabulary); <rel>.overlay.jpg, the image
blended with the class colours and a legend; with --save-trusty <rel>.trusty.png, a heatmap of
A = P(pixel belongs to a seen class). Distinct inputs never share an output (see output_paths). Plus
summary.json: the vocabulary (classes the checkpoint was trained on are seen, all others unseen), the
fraction of pixels per class present in each image, the skipped files with the reason. Outputs are
written atomically and kept unless --overwrite: a restarted run only does what is missing.

Memory follows budgets, not the image: --max-pixels for the decoded image (read from the file header
before decoding), --max-score-gb for the class scores at the inference size (short side 512: a 48 x
66000 strip would be 512 x 704000); larger ones are skipped with the reason, or shrunk to fit with
--downscale. The resize to the original size and its argmax go tile by tile (inference.upsample_argmax),
overlays and heatmaps band by band. Whatever fails while reading, segmenting or writing one image
(a corrupt file, a full disk, an output a format cannot hold) skips that image, its partial outputs
removed; an overlay beyond JPEG's 65,500 pixels is written as PNG instead, and the run says so.
"""

import argparse
import json
import math
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from tqdm import tqdm

from checkpoint import INFERENCE_KEYS, load_model, read_checkpoint
from data import DATASETS
from inference import Settings, add_arguments, class_text, image_scores, inference_amp, upsample_argmax
from runtime import HelpFormatter, atomic_write
from transforms import eval_transform, mmseg_test_size

IMAGE_EXTS = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
MAX_PIXELS = 40_000_000  # well below PIL's 89.5 MP warning: ~15 bytes per pixel at the peak (decoding, resizing)
MAX_SCORE_GB = 2.0       # the class scores at the inference size, (C[+1], h', w') float32
JPEG_MAX = 65500         # libjpeg's largest width or height
BAND = 1 << 20           # pixels per band of rows in the overlay, heatmap and counts


class Skip(Exception):
    """An image infer.py does not segment; the message is the reason (one line)."""


def one_line(e):
    return ' '.join(str(e).split()) or type(e).__name__


def pixels(value):
    return int(float(value))  # 40e6 as well as 40000000


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--checkpoint', required=True, help='a train.py checkpoint (last.pt / best.pt) or a convert.py one')
    p.add_argument('--input', required=True, help='an image file, or a folder searched recursively')
    p.add_argument('--output', required=True, help="output folder; mirrors the input's sub-folders")
    v = p.add_mutually_exclusive_group()
    v.add_argument('--classes', default=None, help="comma-separated class names (default: the checkpoint's dataset classes)")
    v.add_argument('--classes-file', default=None, help='text file with one class name per line')
    add_arguments(p)
    p.add_argument('--save-trusty', action='store_true', help='also write <rel>.trusty.png, a heatmap of A')
    p.add_argument('--overlay-format', default='jpg', choices=['jpg', 'png'],
                   help="file type of the overlays (one over JPEG's 65,500 px is PNG)")
    p.add_argument('--alpha', type=float, default=0.5, help='opacity of the class colours in the overlays')
    p.add_argument('--overwrite', action='store_true', help='redo images whose outputs already exist')
    p.add_argument('--max-pixels', type=pixels, default=MAX_PIXELS,
                   help='largest image, width x height as its file header says (checked before decoding); '
                        'larger ones are skipped, or shrunk to it with --downscale')
    p.add_argument('--max-score-gb', type=float, default=MAX_SCORE_GB,
                   help="largest class scores at the inference size, (C+1) x h' x w' float32 with the short side "
                        "at --short: extreme aspect ratios need the most; larger are skipped, or inferred at a "
                        "smaller size with --downscale")
    p.add_argument('--downscale', action='store_true',
                   help='instead of skipping: shrink an image over --max-pixels to it (its outputs at that size), '
                        'infer at a smaller short side where the scores would pass --max-score-gb; summary.json notes it')
    p.add_argument('--device', default='auto', help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs

def list_inputs(path: Path, out: Path):
    """(root, sorted files): the file itself, or every non-hidden file under the folder except --output."""
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise SystemExit(f'error: {path}: no such file or folder')
    out = out.resolve()
    if out == path.resolve():
        raise SystemExit('error: --output must be another folder than --input')
    files = sorted(f for f in path.rglob('*') if f.is_file() and out not in f.resolve().parents
                   and not any(s.startswith('.') for s in f.relative_to(path).parts))
    if not files:
        raise SystemExit(f'error: {path}: empty folder, no images to segment')
    return path, files


def read_vocabulary(args, default):
    """Class names from --classes, --classes-file or the checkpoint; blanks dropped, duplicates refused."""
    if args.classes_file:
        try:
            names = Path(args.classes_file).read_text().splitlines()
        except OSError as e:
            raise SystemExit(f'error: --classes-file {args.classes_file}: {e.strerror}') from None
    else:
        names = args.classes.split(',') if args.classes is not None else list(default)
    names = [' '.join(n.split()) for n in names if n.strip()]
    count = Counter(n.lower() for n in names)
    dupes = sorted({n for n in names if count[n.lower()] > 1})
    if not names or dupes:
        raise SystemExit(f"error: {'duplicate class names: ' + ', '.join(dupes) if dupes else 'no class names given'}")
    return names


def bands(H: int, W: int):
    """Slices of rows covering an H x W image, about BAND pixels each (at least one row)."""
    step = max(1, BAND // max(W, 1))
    return [slice(r, r + step) for r in range(0, H, step)]


def decode(path, max_pixels=None, downscale=False):
    """PIL's part of reading a file: the header's width x height against max_pixels (over it: Skip,
    or with downscale a JPEG decoded at 1/2, 1/4 or 1/8 scale, still above the limit), then the
    pixels decoded (corrupt or truncated files raise here, as PIL does) and the EXIF orientation
    applied. Returns (image, (width, height) of the file)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # the size is checked here instead
        img = Image.open(path)
    with img:  # leaving it closes the file and keeps the pixels
        size = img.size
        if max_pixels and size[0] * size[1] > max_pixels:
            if not downscale:
                raise Skip(f'{size[0]} x {size[1]} = {size[0] * size[1] / 1e6:.1f} MP, over --max-pixels '
                           f'{max_pixels / 1e6:g} MP (--downscale shrinks it)')
            f = math.sqrt(max_pixels / (size[0] * size[1]))
            img.draft(None, (max(1, math.ceil(size[0] * f)), max(1, math.ceil(size[1] * f))))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    return img, size


def to_rgb(img, max_pixels=None):
    """A decoded image -> (H, W, 3) uint8 RGB: grey, palette and CMYK converted; transparency
    composited on white; 16/32-bit grey rescaled from its range to 0..255 (not clipped); shrunk
    (bilinear, aspect kept) to at most max_pixels when given."""
    if img.mode.startswith('I') or img.mode == 'F':  # 'I;16', 'I;16B', 'I', 'F'
        a = np.asarray(img)
        lo, hi = float(a.min()), float(a.max())
        lo, hi = (0.0, 65535.0) if img.mode != 'F' and lo >= 0 and hi <= 65535 else (lo, max(hi, lo + 1e-12))
        grey = np.empty(a.shape, np.uint8)
        for rows in bands(*a.shape):
            grey[rows] = np.round((a[rows].astype(np.float64) - lo) / (hi - lo) * 255)
        img = Image.fromarray(grey)
    if max_pixels and img.width * img.height > max_pixels:
        if img.mode in ('1', 'P', 'PA'):  # PIL resizes these by nearest neighbour only
            img = img.convert('L' if img.mode == '1' else 'RGBA')
        f = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * f)), max(1, int(img.height * f))), Image.Resampling.BILINEAR,
                         reducing_gap=3.0)
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
        img = Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img.convert('RGBA'))
    return np.array(img.convert('RGB'))  # a writable copy


def load_rgb(path, max_pixels=None, downscale=False):
    """decode + to_rgb: (H, W, 3) uint8 RGB, EXIF orientation applied (see both)."""
    return to_rgb(decode(path, max_pixels, downscale)[0], max_pixels if downscale else None)


def inference_size(H: int, W: int, short: int, resize: str):
    """(h', w'): the size eval_transform resizes an H x W image to (transforms.resize_short)."""
    if resize == 'mmseg':
        return mmseg_test_size(H, W, short)
    return (short, int(short * W / H)) if H <= W else (int(short * H / W), short)  # torchvision's rule


def inference_short(H: int, W: int, short: int, resize: str, channels: int, max_gb: float, downscale: bool):
    """The short side to infer an H x W image at: `short`, if the class scores there, channels x h' x w'
    float32, fit in max_gb; else Skip, or with downscale the largest short side where they fit."""
    gb = lambda s: 4 * channels * math.prod(inference_size(H, W, s, resize)) / 1e9
    if gb(short) <= max_gb:
        return short
    h, w = inference_size(H, W, short, resize)
    need = f'at the inference size {w} x {h} px (short side {short}) its {channels} score maps would take {gb(short):.1f} GB'
    if not downscale:
        raise Skip(f'{need}, over --max-score-gb {max_gb:g} (--downscale infers at a smaller size)')
    s = int(short * math.sqrt(max_gb / gb(short)))
    while s > 1 and gb(s) > max_gb:
        s -= 1
    if s < 1 or gb(s) > max_gb:
        raise Skip(f'{need}, over --max-score-gb {max_gb:g} even at short side 1')
    return s


OUTPUTS = {'label': '.label.png', 'overlay': '.overlay.{fmt}', 'trusty': '.trusty.png'}


def output_paths(out: Path, rel: Path, args):
    """out/<rel>.label.png, out/<rel>.overlay.<fmt>[, out/<rel>.trusty.png], <rel> with its extension
    (a.jpg -> a.jpg.label.png). No two inputs share an output: no tag is the end of another, so
    <rel> + tag determines both <rel> and the tag (x.jpg, x.png, x.jpg.label.png: all apart). An
    overlay too large for JPEG is <rel>.overlay.png instead (see `fallback`), as with --overlay-format png."""
    tags = {k: v.format(fmt=args.overlay_format) for k, v in OUTPUTS.items() if k != 'trusty' or args.save_trusty}
    return {k: out / rel.parent / f'{rel.name}{tag}' for k, tag in tags.items()}


def fallback(path: Path):
    """Where an output goes when its format cannot hold it: a JPEG overlay as PNG."""
    return path.with_suffix('.png')


# ----------------------------------------------------------------------------- outputs

def palette(names):
    """(C, 3) uint8 distinct colours: the PASCAL VOC bit-interleaved colour map without its black 0;
    a class named 'background' gets VOC's black (and is left untinted in the overlays)."""
    ids, rgb = np.arange(1, len(names) + 1), np.zeros((len(names), 3), np.int64)
    for b in range(8):
        for c in range(3):
            rgb[:, c] |= ((ids >> (3 * b + c)) & 1) << (7 - b)
    rgb[[n.lower() == 'background' for n in names]] = 0
    return rgb.astype(np.uint8)


def label_png(label, colours):
    """(H, W) class indices -> a palette PNG image (a 16-bit grey one above 256 classes)."""
    if len(colours) > 256:
        return Image.fromarray(label.astype(np.uint16))
    img = Image.fromarray(label.astype(np.uint8, copy=False))
    img.putpalette(colours.ravel().tolist())  # 'L' -> 'P'
    return img


def class_counts(label, C: int):
    """(C,) pixels per class of an (H, W) label map, band by band (bincount copies its input to int64)."""
    return sum(np.bincount(label[rows].ravel(), minlength=C) for rows in bands(*label.shape))


def overlay(rgb, label, names, colours, alpha):
    """The image blended with the class colours, band by band into the canvas (no full-size float
    copies); on its right a legend of the classes present, by area."""
    H, W = label.shape
    tinted = alpha * np.array([n.lower() != 'background' for n in names])  # (C,)
    counts = class_counts(label, len(names))
    rows = [(k, f'{names[k]}  {100 * counts[k] / label.size:.1f}%') for k in np.argsort(-counts, kind='stable') if counts[k]]
    size = max(12, min(48, min(H, W) // 25))
    font, pad = ImageFont.load_default(size), size // 2
    panel = 3 * pad + size + int(max(font.getlength(t) for _, t in rows))
    canvas = Image.new('RGB', (W + panel, max(H, pad + len(rows) * (size + pad))), 'white')
    for band in bands(H, W):
        lab = label[band]
        tint = tinted[lab][..., None]                                                      # (h, W, 1)
        blend = (rgb[band] * (1 - tint) + colours[lab] * tint).round().astype(np.uint8)   # (h, W, 3)
        canvas.paste(Image.fromarray(blend), (0, band.start))
    draw = ImageDraw.Draw(canvas)
    for i, (k, text) in enumerate(rows):
        y = pad + i * (size + pad)
        draw.rectangle([W + pad, y, W + pad + size, y + size], fill=tuple(colours[k].tolist()), outline='black')
        draw.text((W + 2 * pad + size, y), text, fill='black', font=font)
    return canvas


def heatmap(A):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, viridis-like (dark = 0, yellow = 1)."""
    x = np.clip(A, 0, 1) * (len(VIRIDIS) - 1)
    return np.stack([np.interp(x, np.arange(len(VIRIDIS)), VIRIDIS[:, c]) for c in range(3)], -1).round().astype(np.uint8)


def heatmap_image(A):
    """heatmap(A) as an RGB image, made band by band (no full-size float64 copies)."""
    H, W = A.shape
    img = Image.new('RGB', (W, H))
    for band in bands(H, W):
        img.paste(Image.fromarray(heatmap(A[band])), (0, band.start))
    return img


def save(obj, path: Path, **kw):
    """Atomic (temp file + os.replace): an interrupted run never leaves a half-written output.
    obj: a PIL image, or text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, str):
        atomic_write(path, lambda tmp: tmp.write_text(obj))
    else:
        atomic_write(path, lambda tmp: obj.save(tmp, format={'.png': 'PNG', '.jpg': 'JPEG'}[path.suffix], **kw))


def record(label, paths, out: Path, names, notes=()):
    """summary.json entry of one image: the files written, the fraction of pixels per class present,
    and any notes (a fallback format, a shrunk image)."""
    counts = class_counts(label, len(names))
    entry = {('label_map' if k == 'label' else k): p.relative_to(out).as_posix() for k, p in paths.items()}
    entry['fractions'] = {names[k]: round(float(c) / label.size, 6) for k, c in enumerate(counts) if c}
    return {**entry, 'notes': list(notes)} if notes else entry


# ----------------------------------------------------------------------------- main

def done_before(paths, C: int):
    """(label map (H, W), the files as written) of an image whose outputs all exist (an overlay in
    the planned format or its fallback), else None (also for an unreadable map, or one with values
    >= C: made for another vocabulary)."""
    if not paths['overlay'].exists() and fallback(paths['overlay']).exists():
        paths = {**paths, 'overlay': fallback(paths['overlay'])}
    if not all(p.exists() for p in paths.values()):
        return None
    try:
        with Image.open(paths['label']) as img:
            label = np.asarray(img)
        return (label, paths) if label.max() < C else None
    except Exception:
        return None


def discard(paths):
    """Remove what an image that failed may have written (and older outputs of it: it is redone anyway)."""
    for p in {*paths.values(), fallback(paths['overlay'])}:
        p.unlink(missing_ok=True)


def main(argv=None):
    args = get_args(argv)
    out = Path(args.output)
    root, files = list_inputs(Path(args.input), out)
    ckpt = read_checkpoint(args.checkpoint, needs=INFERENCE_KEYS)
    info = DATASETS[ckpt['classes']['dataset']]
    names = read_vocabulary(args, ckpt['classes']['names'])
    trained = {n.lower() for n in ckpt['classes']['seen']}  # the CLIP tokenizer lower-cases anyway
    vocabulary = [{'name': n, 'seen': n.lower() in trained} for n in names]
    print(f"{len(names)} classes; unseen (not trained on): {', '.join(v['name'] for v in vocabulary if not v['seen']) or 'none'}")
    if args.save_trusty and not ckpt['config']['trusty']:
        print('note: this checkpoint has no trusty token, so no trusty maps')
        args.save_trusty = False
    # a vocabulary of the user's is no benchmark: no calibration by default, trusty weighting on
    run = Settings.resolve(args, info, ckpt['polarity'], same_dataset=True, inductive=False)
    settings = {'checkpoint': os.path.abspath(args.checkpoint), 'templates': run.templates,
                'calibration': run.calibration, 'trusty_weighting': run.trusty_weighting,
                'short': run.short, 'resize': run.resize, 'crop': run.crop, 'stride': run.stride,
                'text': os.path.abspath(args.text_embeddings) if args.text_embeddings else args.text_precision}
    try:
        previous = json.loads((out / 'summary.json').read_text())
    except (OSError, ValueError):
        previous = {}
    same = (previous.get('vocabulary'), previous.get('settings')) == (vocabulary, settings)
    if previous and not same and not args.overwrite:
        raise SystemExit(f'error: {out} holds outputs of another vocabulary or settings; pass --overwrite or another --output')
    images, skipped, jobs = previous.get('images', {}) if same else {}, [], []  # images: merged with the last run's

    def skip(rel, reason):
        tqdm.write(f'skip {root / rel}: {reason}', file=sys.stderr)
        skipped.append({'file': rel.as_posix(), 'reason': reason})
        images.pop(rel.as_posix(), None)

    def write_summary(**counts):
        summary = {'settings': settings, 'vocabulary': vocabulary, **counts, 'images': images, 'skipped': skipped}
        save(json.dumps(summary, indent=1), out / 'summary.json')
        return summary

    for f in files:
        rel = f.relative_to(root)
        if f.suffix.lower() not in IMAGE_EXTS:
            skip(rel, f"not an image ({f.suffix or 'no extension'})")
            continue
        paths = output_paths(out, rel, args)
        done = None if args.overwrite else done_before(paths, len(names))
        if done is None:
            jobs.append((f, rel, paths))
        else:  # no model work: the summary entry comes from the label map on disk (and the last summary's notes)
            key = rel.as_posix()
            images[key] = {**images.get(key, {}), **record(*done, out, names)}
    up_to_date = len(files) - len(skipped) - len(jobs)
    write_summary()  # the vocabulary is on disk from the start: a restart with other classes is refused

    if jobs:
        device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device)
        model = load_model(ckpt, args.pretrained).to(device).eval()
        amp = inference_amp(args.amp, device, model)
        text = class_text(model, names, run.templates, args.text_precision, args.text_embeddings,
                          args.text_cache)  # (C, d)
        seen = torch.tensor([v['seen'] for v in vocabulary], device=device)
        channels, colours = len(names) + bool(ckpt['config']['trusty']), palette(names)

    def segment(f, rel, paths):
        """One image read within --max-pixels, inferred within --max-score-gb, its outputs written (the
        label map last: it marks the image as done). Returns its summary entry; raises Skip."""
        notes = []
        try:  # PIL's decoders on a user's file raise many kinds of errors: each one skips that file
            img, (w0, h0) = decode(f, args.max_pixels, args.downscale)
        except Skip:
            raise
        except UnidentifiedImageError:
            raise Skip('not an image PIL can read') from None
        except Exception as e:
            raise Skip(f'unreadable image ({one_line(e)})') from None
        rgb = to_rgb(img, args.max_pixels if args.downscale else None)                 # (H, W, 3) uint8
        del img
        H, W = rgb.shape[:2]
        if H * W < w0 * h0:
            w0, h0 = (w0, h0) if (W >= H) == (w0 >= h0) else (h0, w0)  # as displayed (EXIF)
            notes.append(f'shrunk from {w0} x {h0} to {W} x {H} px to fit --max-pixels {args.max_pixels / 1e6:g} MP; '
                         'outputs at that size')
        short = inference_short(H, W, run.short, run.resize, channels, args.max_score_gb, args.downscale)
        if short != run.short:
            h, w = inference_size(H, W, short, run.resize)
            notes.append(f'inferred at {w} x {h} px (short side {short}, not {run.short}) to fit '
                         f'--max-score-gb {args.max_score_gb:g}')
        image, _ = eval_transform(model.mean, model.std, short, run.resize)(
            tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)), tv_tensors.Mask(torch.zeros(1, 1)))
        scores = image_scores(model, image, text, seen, amp=amp, **run.predict_kwargs())  # (C[+1], h', w')
        del image
        label, A = upsample_argmax(scores, len(names), (H, W))    # (H, W) uint8/int32, (H, W) or None, tile by tile
        del scores
        label = label.cpu().numpy()
        if 'trusty' in paths:
            save(heatmap_image(A.cpu().numpy()), paths['trusty'])
        del A
        canvas = overlay(rgb, label, names, colours, args.alpha)
        del rgb
        if paths['overlay'].suffix == '.jpg' and max(canvas.size) > JPEG_MAX:
            notes.append(f"overlay {canvas.width} x {canvas.height} px, over JPEG's {JPEG_MAX:,} px: written as PNG")
            paths = {**paths, 'overlay': fallback(paths['overlay'])}
        save(canvas, paths['overlay'], **({'quality': 90} if paths['overlay'].suffix == '.jpg' else {}))
        del canvas
        save(label_png(label, colours), paths['label'])
        for note in notes:
            tqdm.write(f'note {root / rel}: {note}', file=sys.stderr)
        return record(label, paths, out, names, notes)

    processed = 0
    for f, rel, paths in tqdm(jobs, desc='segment', unit='img', dynamic_ncols=True, disable=not jobs):
        try:  # what reading, resizing, inferring and writing one image can raise skips that image
            images[rel.as_posix()] = segment(f, rel, paths)
            processed += 1
            continue
        except Skip as e:
            reason = str(e)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            reason = f'failed ({one_line(e)})'
        except (MemoryError, torch.OutOfMemoryError) as e:
            reason = f'out of memory ({one_line(e)}); see --max-pixels, --max-score-gb'
            torch.cuda.empty_cache()
        discard(paths)
        skip(rel, reason)

    summary = write_summary(processed=processed, up_to_date=up_to_date)
    print(f'{processed} processed, {up_to_date} up to date, {len(skipped)} skipped; outputs in {out}')
    if processed + up_to_date == 0:
        raise SystemExit(f'error: none of the {len(files)} files could be segmented (see the skip lines above)')
    return summary


if __name__ == '__main__':
    main()
