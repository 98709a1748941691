"""Segment your own images with any list of class names (Eq. 12 and the geometry of inference.py).

    python infer.py --checkpoint runs/voc-inductive/best.pt --input photos/ --output out/ \
        --classes "cat,sofa,potted plant,window" --save-trusty

Per image, at its relative path <rel> (extension included) under --output: <rel>.label.png, the label
map at the original size (palette PNG, values index the vocabulary); <rel>.overlay.jpg, the image
blended with the class colours and a legend; with --save-trusty <rel>.trusty.png, a heatmap of
A = P(pixel belongs to a seen class). Distinct inputs never share an output (see output_paths). Plus
summary.json: the vocabulary (classes the checkpoint was trained on are seen, all others unseen), the
fraction of pixels per class present in each image, the skipped files. Outputs are written atomically
and kept unless --overwrite: a restarted run only does what is missing.
"""

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from tqdm import tqdm

from checkpoint import INFERENCE_KEYS, load_model, read_checkpoint
from data import DATASETS, eval_transform
from inference import Settings, add_arguments, class_text, inference_amp, predict, upsample_argmax
from runtime import HelpFormatter, atomic_write

IMAGE_EXTS = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


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
    p.add_argument('--overlay-format', default='jpg', choices=['jpg', 'png'], help='file type of the overlays')
    p.add_argument('--alpha', type=float, default=0.5, help='opacity of the class colours in the overlays')
    p.add_argument('--overwrite', action='store_true', help='redo images whose outputs already exist')
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


def load_rgb(path):
    """Fully decoded (H, W, 3) uint8 RGB: EXIF orientation applied; grey, palette and CMYK converted;
    transparency composited on white; 16/32-bit grey rescaled from its range to 0..255 (not clipped)."""
    with Image.open(path) as img:
        img.load()  # truncated or corrupt files raise here
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith('I') or img.mode == 'F':  # 'I;16', 'I;16B', 'I', 'F'
        a = np.asarray(img, dtype=np.float64)
        ok16 = img.mode != 'F' and a.min() >= 0 and a.max() <= 65535
        lo, hi = (0.0, 65535.0) if ok16 else (a.min(), max(a.max(), a.min() + 1e-12))
        img = Image.fromarray(np.round((a - lo) / (hi - lo) * 255).astype(np.uint8))
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
        img = Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img.convert('RGBA'))
    return np.array(img.convert('RGB'))  # a writable copy


OUTPUTS = {'label': '.label.png', 'overlay': '.overlay.{fmt}', 'trusty': '.trusty.png'}


def output_paths(out: Path, rel: Path, args):
    """out/<rel>.label.png, out/<rel>.overlay.<fmt>[, out/<rel>.trusty.png], <rel> with its extension
    (a.jpg -> a.jpg.label.png). No two inputs share an output: no tag is the end of another, so
    <rel> + tag determines both <rel> and the tag (x.jpg, x.png, x.jpg.label.png: all apart)."""
    tags = {k: v.format(fmt=args.overlay_format) for k, v in OUTPUTS.items() if k != 'trusty' or args.save_trusty}
    return {k: out / rel.parent / f'{rel.name}{tag}' for k, tag in tags.items()}


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
    img = Image.fromarray(label.astype(np.uint8))
    img.putpalette(colours.ravel().tolist())  # 'L' -> 'P'
    return img


def overlay(rgb, label, names, colours, alpha):
    """The image blended with the class colours; on its right a legend of the classes present, by area."""
    H, W = label.shape
    tint = alpha * np.array([n.lower() != 'background' for n in names])[label][..., None]  # (H, W, 1)
    blend = (rgb * (1 - tint) + colours[label] * tint).round().astype(np.uint8)  # (H, W, 3)
    counts = np.bincount(label.ravel(), minlength=len(names))
    rows = [(k, f'{names[k]}  {100 * counts[k] / label.size:.1f}%') for k in np.argsort(-counts, kind='stable') if counts[k]]
    size = max(12, min(48, min(H, W) // 25))
    font, pad = ImageFont.load_default(size), size // 2
    panel = 3 * pad + size + int(max(font.getlength(t) for _, t in rows))
    canvas = Image.new('RGB', (W + panel, max(H, pad + len(rows) * (size + pad))), 'white')
    canvas.paste(Image.fromarray(blend), (0, 0))
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


def save(obj, path: Path, **kw):
    """Atomic (temp file + os.replace): an interrupted run never leaves a half-written output.
    obj: a PIL image, or text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, str):
        atomic_write(path, lambda tmp: tmp.write_text(obj))
    else:
        atomic_write(path, lambda tmp: obj.save(tmp, format={'.png': 'PNG', '.jpg': 'JPEG'}[path.suffix], **kw))


def record(label, label_path: Path, out: Path, names):
    """summary.json entry of one image: its label map and the fraction of pixels per class present."""
    counts = np.bincount(label.ravel(), minlength=len(names))
    return {'label_map': label_path.relative_to(out).as_posix(),
            'fractions': {names[k]: round(float(c) / label.size, 6) for k, c in enumerate(counts) if c}}


# ----------------------------------------------------------------------------- main

def done_before(paths, C: int):
    """The label map (H, W) of an image whose outputs all exist, else None (also for an unreadable
    map, or one with values >= C: made for another vocabulary)."""
    if not all(p.exists() for p in paths.values()):
        return None
    try:
        with Image.open(paths['label']) as img:
            label = np.asarray(img)
        return label if label.max() < C else None
    except Exception:
        return None


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
        label = None if args.overwrite else done_before(paths, len(names))
        if label is None:
            jobs.append((f, rel, paths))
        else:  # no model work: the summary entry comes from the label map on disk
            images[rel.as_posix()] = record(label, paths['label'], out, names)
    up_to_date = len(files) - len(skipped) - len(jobs)
    write_summary()  # the vocabulary is on disk from the start: a restart with other classes is refused

    if jobs:
        device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device)
        model = load_model(ckpt, args.pretrained).to(device).eval()
        amp = inference_amp(args.amp, device, model)
        text = class_text(model, names, run.templates, args.text_precision, args.text_embeddings)  # (C, d)
        seen = torch.tensor([v['seen'] for v in vocabulary], device=device)
        transform, colours = eval_transform(model.mean, model.std, run.short, run.resize), palette(names)
    processed = 0
    for f, rel, paths in tqdm(jobs, desc='segment', unit='img', dynamic_ncols=True, disable=not jobs):
        try:  # whatever fails while decoding a user's file (PIL raises many kinds) skips that file
            rgb = load_rgb(f)  # (H, W, 3) uint8
        except UnidentifiedImageError:
            skip(rel, 'not an image PIL can read')
            continue
        except Exception as e:
            skip(rel, f"unreadable image ({' '.join(str(e).split()) or type(e).__name__})")
            continue
        image, _ = transform(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)), tv_tensors.Mask(torch.zeros(1, 1)))
        scores = predict(model, image, text, seen, image.shape[-2:], amp=amp,
                         **run.predict_kwargs())                          # (C[+1], h', w') at the resized size
        label, A = upsample_argmax(scores, len(names), rgb.shape[:2])     # (H, W), (H, W) or None
        label = label.cpu().numpy()
        if 'trusty' in paths:
            save(Image.fromarray(heatmap(A.cpu().numpy())), paths['trusty'])
        save(overlay(rgb, label, names, colours, args.alpha), paths['overlay'], **({'quality': 90} if args.overlay_format == 'jpg' else {}))
        save(label_png(label, colours), paths['label'])  # last: it marks the image as done
        images[rel.as_posix()] = record(label, paths['label'], out, names)
        processed += 1

    summary = write_summary(processed=processed, up_to_date=up_to_date)
    print(f'{processed} processed, {up_to_date} up to date, {len(skipped)} skipped; outputs in {out}')
    if processed + up_to_date == 0:
        raise SystemExit(f'error: none of the {len(files)} files could be segmented (see the skip lines above)')
    return summary


if __name__ == '__main__':
    main()
