"""Offline toy world: a synthetic segmentation dataset plus a tiny CLIP pretrained on it.

A newcomer without a GPU, weights or datasets can run TagCLIP end to end in minutes
(DESIGN §12). 25 classes = 5 colours x 5 surface patterns ("red striped"); 1-2 circles or
squares (radius 13-20 px) per 64 x 64 image. A tiny open_clip ViT (toy_clip.json) learns all 25
concepts contrastively, seen and unseen alike, as a real CLIP has; TagCLIP then trains on the seen
classes only. Unseen objects do appear in training images (their pixels are masked by the
training code), the standard inductive protocol.

    python toy.py                        # generate data/toy and pretrain the tiny CLIP (cached)
    python toy.py --preview docs/toy.png # also write a grid of images and label maps
"""
import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data import DATASETS, TOY_COLOURS, TOY_PATTERNS
from runtime import HelpFormatter, atomic_write

CLIP_NAME = 'toy_clip'
CLIP_CONFIG = Path(__file__).with_name('toy_clip.json')
# Default pretraining length. Measured on 2 idle CPU cores (0.6 s/step): ~4.3 min, zero-shot 96%
# (seen 97%, unseen 93%); 350 steps reached 87% and 300 steps 81%: the patterns click late.
# On world 2 (bigger objects) and with 'background': zero-shot seen 99.7%, unseen 98.7%.
CLIP_STEPS = 400
PERIOD = (4, 6)  # pattern period in pixels: smallest, largest (patch size 8)
WORLD_VERSION = 2  # bump when the renderer changes, so cached worlds are regenerated (2: bigger objects, <= 2)
CLIP_VERSION = 3   # bump when CLIP pretraining changes (2: empty images captioned 'background'; 3: world 2)
RGB = torch.tensor([  # one row per TOY_COLOURS entry: red, green, blue, yellow, purple
    [0.86, 0.14, 0.12], [0.14, 0.68, 0.20], [0.16, 0.30, 0.90], [0.92, 0.84, 0.12], [0.60, 0.18, 0.74]])


def class_names():
    """The 25 object class names; index = colour_index * 5 + pattern_index = raw label value on disk
    (data.py adds 'background', raw 255, as class 0 in front of them)."""
    names = [f'{c} {p}' for c in TOY_COLOURS for p in TOY_PATTERNS]
    assert ['background'] + names == list(DATASETS['toy'].classes), 'toy.py and data.py disagree on the class order'
    return names


def clip_path(root, steps=CLIP_STEPS, seed=0):
    """Where prepare() caches the tiny CLIP pretrained for `steps` steps with `seed`."""
    return Path(root) / f'toy_clip_v{CLIP_VERSION}_s{steps}_seed{seed}.pt'


def register_clip():
    """Register toy_clip.json with open_clip under the name 'toy_clip' (idempotent)."""
    if CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIG)


def _pattern(kind, x, y, period, phase_x, phase_y):
    """Boolean "ink" mask (n, H, W) of pattern kind[i] (index into TOY_PATTERNS) for each image i.

    x, y: pixel-centre coordinates (H, W); period, phase_x, phase_y: (n, 1, 1) in pixels.
    """
    u, v = (x + phase_x) % period, (y + phase_y) % period  # position inside the pattern's cell
    half = period / 2
    dot = (u - half).square() + (v - half).square() <= (0.3 * period).square()
    stripe, bar = u < half, v < half
    masks = torch.stack([torch.ones_like(dot), stripe, bar, stripe ^ bar, dot])  # (5, n, H, W)
    return masks[kind, torch.arange(len(kind))]  # solid, striped (|||), barred (≡), checkered, dotted


def render(n, size=64, generator=None, min_objects=1, max_objects=2, classes=None):
    """Draw n toy images with one generator: deterministic given its state.

    classes: optional (n, max_objects) class indices to draw instead of random ones.

    Returns images (n, 3, size, size) uint8, labels (n, size, size) uint8 (class index, 255 =
    background), objects (n, max_objects) long: each drawn object's class, or -1 if absent or
    fully occluded. Later objects occlude earlier ones.
    """
    g, K = generator, max_objects
    rand = lambda *s: torch.rand(*s, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing='ij')
    # background: grey level + low-frequency noise (a bilinearly upsampled 4x4 grid)
    low = F.interpolate(rand(n, 1, 4, 4) - 0.5, size=(size, size), mode='bilinear', align_corners=False)
    img = (0.3 + 0.35 * rand(n, 1, 1, 1) + 0.3 * low).expand(n, 3, size, size).clone()  # (n, 3, H, W)
    label = torch.full((n, size, size), 255, dtype=torch.uint8)
    count = torch.randint(min_objects, max_objects + 1, (n,), generator=g)
    cls = torch.randint(0, 25, (n, K), generator=g) if classes is None else classes.long().reshape(n, K)
    radius = size * (0.20 + 0.12 * rand(n, K))
    cx, cy = (radius + (size - 2 * radius) * rand(n, K) for _ in range(2))
    square = rand(n, K) < 0.5
    period = torch.randint(PERIOD[0], PERIOD[1] + 1, (n, K), generator=g).float()
    phase_x, phase_y = rand(n, K) * period, rand(n, K) * period
    tint = 0.9 + 0.2 * rand(n, K, 1)  # brightness jitter per object
    shade = 0.35 + 0.15 * rand(n, K)  # the pattern's "paper": a darker variant of the colour
    for k in range(K):  # draw slot by slot; later objects occlude earlier ones
        dx, dy = xx - cx[:, k, None, None], yy - cy[:, k, None, None]  # (n, H, W)
        r = radius[:, k, None, None]
        inside = torch.where(square[:, k, None, None], torch.maximum(dx.abs(), dy.abs()) <= r,
                             dx.square() + dy.square() <= r.square()) & (k < count)[:, None, None]
        ink = _pattern(cls[:, k] % 5, xx, yy, period[:, k, None, None],
                       phase_x[:, k, None, None], phase_y[:, k, None, None])
        colour = (RGB[cls[:, k] // 5] * tint[:, k]).clamp(0, 1)  # (n, 3)
        fill = colour[:, :, None, None] * torch.where(ink, 1.0, shade[:, k, None, None])[:, None]
        img = torch.where(inside[:, None], fill, img)
        label[inside] = cls[:, k, None, None].expand_as(inside)[inside].to(torch.uint8)
    img = img + 0.03 * torch.randn(img.shape, generator=g)  # pixel noise
    visible = (label[:, None] == cls[:, :, None, None]).flatten(2).sum(-1) >= 0.01 * size * size
    objects = torch.where(visible & (torch.arange(K) < count[:, None]), cls, -1)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), label, objects


def generate_world(root, n_train=5000, n_val=500, size=64, seed=0, chunk=250):
    """Write root/{images,annotations}/{train,val}/NNNNN.png and root/world.json (cached).

    world.json is written last, so a run interrupted midway never looks complete; the PNGs
    are written to a temp folder and moved into place.
    """
    root = Path(root)
    params = dict(version=WORLD_VERSION, n_train=n_train, n_val=n_val, size=size, seed=seed)
    meta = root / 'world.json'
    if meta.exists() and json.loads(meta.read_text()) == params:
        return root
    meta.unlink(missing_ok=True)  # invalidate the old world before touching it
    tmp = root / '.tmp_world'
    shutil.rmtree(tmp, ignore_errors=True)
    bar = tqdm(total=n_train + n_val, desc='toy world', unit='img')
    for split_id, (split, n) in enumerate((('train', n_train), ('val', n_val))):
        g = torch.Generator().manual_seed(2 * seed + split_id)  # one stream per (seed, split)
        for sub in ('images', 'annotations'):
            (tmp / sub / split).mkdir(parents=True)
        for start in range(0, n, chunk):
            images, labels, _ = render(min(chunk, n - start), size, g)
            for i, (image, label) in enumerate(zip(images.permute(0, 2, 3, 1).numpy(), labels.numpy())):
                Image.fromarray(image).save(tmp / 'images' / split / f'{start + i:05d}.png')
                Image.fromarray(label).save(tmp / 'annotations' / split / f'{start + i:05d}.png')
            bar.update(len(images))
    bar.close()
    for sub in ('images', 'annotations'):
        shutil.rmtree(root / sub, ignore_errors=True)
        os.replace(tmp / sub, root / sub)
    tmp.rmdir()
    atomic_write(meta, lambda f: f.write_text(json.dumps(params, indent=2)))
    return root


def _normalize(images, model):
    """uint8 (B, 3, H, W) -> float, normalised with the CLIP model's own mean and std."""
    cfg = model.visual.preprocess_cfg
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    return (images.float() / 255 - mean) / std


def _caption(names, objects):
    """'a red solid.', 'a red solid and a blue dotted.', 'a red solid, a blue dotted and a ...'."""
    parts = [f'a {names[c]}' for c in dict.fromkeys(objects.tolist()) if c >= 0]
    return (', '.join(parts[:-1]) + ' and ' if len(parts) > 1 else '') + parts[-1] + '.'


def pretrain_clip(out_path, steps=CLIP_STEPS, batch=128, seed=0, lr=1e-3, warmup=100,
                  weight_decay=0.05, single_frac=0.4, empty_frac=1 / 16):
    """Contrastively pretrain the tiny CLIP on fresh synthetic image-caption pairs (cached).

    Captions name all 25 classes, seen and unseen: a real CLIP has seen every concept.
    empty_frac of each batch are images without objects captioned "a photo of a background." (so
    'background' is a concept it knows), single_frac one-object images captioned "a photo of a red
    checkered.", the rest 1-2 objects captioned "a red solid and a blue dotted.". Images are drawn fresh
    every step from a flip-symmetric distribution, so no augmentation is needed. Pairs with
    identical captions are all positives of each other (soft targets) rather than negatives.
    Saves model.state_dict(), loadable with open_clip.create_model('toy_clip', pretrained=path).
    """
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    register_clip()
    with torch.random.fork_rng():  # seeded initialisation, global RNG left as it was
        torch.manual_seed(seed)
        model = open_clip.create_model(CLIP_NAME).train()
    tokenizer, names, tokens = open_clip.get_tokenizer(CLIP_NAME), class_names(), {}
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on gains, biases, logit scale
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{'params': decay}, {'params': rest, 'weight_decay': 0.0}],
                            lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay, foreach=True)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else cosine(s))
    g = torch.Generator().manual_seed(1_000_003 + seed)  # a stream no toy world uses
    n_single, n_empty = round(single_frac * batch), round(empty_frac * batch)
    bar = tqdm(range(steps), desc='pretrain tiny CLIP', unit='step')
    for _ in bar:
        empty = render(n_empty, generator=g, min_objects=0, max_objects=0)  # only the noisy grey
        single = render(n_single, generator=g, max_objects=1)
        multi = render(batch - n_single - n_empty, generator=g)
        captions = ['a photo of a background.'] * n_empty + [f'a photo of a {names[c]}.' for c in single[2][:, 0].tolist()]
        captions += [_caption(names, objects) for objects in multi[2]]
        new = [c for c in dict.fromkeys(captions) if c not in tokens]
        if new:
            tokens.update(zip(new, tokenizer(new)))
        image = model.encode_image(_normalize(torch.cat([empty[0], single[0], multi[0]]), model), normalize=True)
        text = model.encode_text(torch.stack([tokens[c] for c in captions]), normalize=True)
        logits = model.logit_scale.exp() * image @ text.T  # (B, B)
        ids = torch.tensor([captions.index(c) for c in captions])  # first occurrence of each caption
        target = (ids[:, None] == ids[None]).float()
        target = target / target.sum(1, keepdim=True)  # symmetric: same targets for both directions
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f'{loss.item():.3f}')
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda f: torch.save(model.state_dict(), f))
    return out_path


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, n_per_class=40, seed=123):
    """25-way zero-shot accuracy on single-object images, prompt "a photo of a {name}"."""
    names, was_training = class_names(), model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(len(names)).repeat_interleave(n_per_class)
    images, _, _ = render(len(classes), model.visual.image_size[0], g, max_objects=1, classes=classes)
    text = model.encode_text(tokenizer([f'a photo of a {c}' for c in names]), normalize=True)  # (25, d)
    pred = torch.cat([model.encode_image(_normalize(x, model), normalize=True) @ text.T
                      for x in images.split(250)]).argmax(1)
    correct = (pred == classes).float().view(len(names), n_per_class).mean(1)  # (25,)
    model.train(was_training)
    unseen = torch.tensor([c in DATASETS['toy'].unseen for c in names])
    return {'seen': correct[~unseen].mean().item(), 'unseen': correct[unseen].mean().item(),
            'all': correct.mean().item(), 'per_class': dict(zip(names, correct.tolist()))}


def prepare(root='data/toy', clip_steps=CLIP_STEPS, n_train=5000, n_val=500, seed=0):
    """Generate the toy world and pretrain the tiny CLIP (both cached under root).

    Prints the CLIP's zero-shot accuracy and returns (world_root, clip_checkpoint_path).
    """
    root = Path(root)
    world = generate_world(root, n_train, n_val, seed=seed)
    ckpt = pretrain_clip(clip_path(root, clip_steps, seed), steps=clip_steps, seed=seed)
    register_clip()
    acc = zero_shot_accuracy(open_clip.create_model(CLIP_NAME, pretrained=str(ckpt)),
                             open_clip.get_tokenizer(CLIP_NAME))
    print(f"tiny CLIP zero-shot accuracy: seen {acc['seen']:.1%} unseen {acc['unseen']:.1%} "
          '(bounds what segmentation can do)')
    return world, ckpt


def preview(path, n=8, seed=0, scale=3):
    """Save a grid: n freshly drawn toy images on top, their label maps below (background black)."""
    images, labels, _ = render(n, generator=torch.Generator().manual_seed(seed))
    palette = torch.zeros(256, 3, dtype=torch.uint8)  # label colour: class colour, darker per pattern
    shade = torch.tensor([1.0, 0.8, 0.65, 0.5, 0.35]).repeat(5)[:, None]
    palette[:25] = (RGB.repeat_interleave(5, 0) * shade * 255).round().to(torch.uint8)
    maps = palette[labels.long()].permute(0, 3, 1, 2)  # (n, 3, H, W)
    grid = torch.cat([torch.cat(list(images), 2), torch.cat(list(maps), 2)], 1)  # (3, 2H, nW)
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--root', default='data/toy', help='where the world and the CLIP checkpoint go')
    p.add_argument('--clip-steps', type=int, default=CLIP_STEPS, help='tiny CLIP pretraining steps')
    p.add_argument('--n-train', type=int, default=5000, help='training images')
    p.add_argument('--n-val', type=int, default=500, help='validation images')
    p.add_argument('--seed', type=int, default=0, help='seed of the world and of CLIP pretraining')
    p.add_argument('--preview', metavar='PNG', help='also write a grid of images and label maps here')
    args = p.parse_args()
    start = time.time()
    world, ckpt = prepare(args.root, args.clip_steps, args.n_train, args.n_val, args.seed)
    print(f'world: {world}  tiny CLIP: {ckpt}  ({time.time() - start:.0f} s)')
    if args.preview:
        preview(args.preview, seed=args.seed)
        print(f'preview: {args.preview}')


if __name__ == '__main__':
    main()
