"""Datasets and augmentation for TagCLIP (DESIGN §8, §9, §11).

Class-name lists (ZegCLIP's), the zero-shot seen/unseen splits, readers for the mmsegmentation
layouts of PASCAL VOC 2012 (+SBD aug), COCO-Stuff 164K, PASCAL Context (59 / 60 classes) and the toy
world, and the train / eval transforms (torchvision.transforms.v2 on tv_tensors, so image and label
move together; mmseg semantics). Labels come out as class indices 0..C-1, or 255 = ignore.
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IGNORE_INDEX = 255
_INVALID = -1  # LUT entry for raw label values that belong to no class: reading them is an error

# -----------------------------------------------------------------------------
# class names and zero-shot unseen splits (ZegCLIP's text-embedding notebook and dataset configs)

VOC_CLASSES = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
    'tvmonitor')
VOC_UNSEEN = ('pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
COCO_STUFF_CLASSES = (  # 80 COCO things, then 91 stuff classes; index = mmseg labelTrainIds value
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush',
    'banner', 'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage',
    'cardboard', 'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter',
    'cupboard', 'curtain', 'desk-stuff', 'dirt', 'door-stuff', 'fence', 'floor-marble',
    'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower', 'fog', 'food-other',
    'fruit', 'furniture-other', 'grass', 'gravel', 'ground-other', 'hill', 'house', 'leaves',
    'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net', 'paper',
    'pavement', 'pillow', 'plant-other', 'plastic', 'platform', 'playingfield', 'railing',
    'railroad', 'river', 'road', 'rock', 'roof', 'rug', 'salad', 'sand', 'sea', 'shelf',
    'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone', 'straw',
    'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable',
    'wall-brick', 'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile',
    'wall-wood', 'water-other', 'waterdrops', 'window-blind', 'window-other', 'wood')
COCO_STUFF_UNSEEN = (
    'cow', 'giraffe', 'suitcase', 'frisbee', 'skateboard', 'carrot', 'scissors', 'cardboard',
    'clouds', 'grass', 'playingfield', 'river', 'road', 'tree', 'wall-concrete')
CONTEXT59_CLASSES = (
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
    'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow',
    'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse',
    'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate', 'platform',
    'pottedplant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa',
    'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall', 'water', 'window', 'wood')
TOY_COLOURS = ('red', 'green', 'blue', 'yellow', 'purple')
TOY_PATTERNS = ('solid', 'striped', 'barred', 'checkered', 'dotted')
# 'background' (the grey noise around the objects; raw label 255 on disk) is a seen class, so a model
# and a user of infer.py can say "none of these objects"; then index = 1 + 5 * colour + pattern.
TOY_CLASSES = ('background',) + tuple(f'{c} {p}' for c in TOY_COLOURS for p in TOY_PATTERNS)
# Toy unseen split (DESIGN §12): red holds two unseen classes, so "unseen + red" does not name the
# class and the trusty map alone cannot; dotted holds two as well. Every colour and every pattern
# keeps >= 3 seen classes, so both concepts are learnt from seen data alone.
TOY_UNSEEN = ('red striped', 'red dotted', 'green checkered', 'blue barred', 'yellow solid',
              'purple dotted')


# -----------------------------------------------------------------------------
# label look-up tables: raw PNG value (0..255) -> class index, 255, or _INVALID


def _lut(raw_ids, zero_to_ignore=False):
    """256-entry LUT sending raw_ids[k] -> k, 255 -> 255 unless listed (and 0 -> 255 if asked), the rest invalid."""
    lut = np.full(256, _INVALID, np.int64)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    lut[list(raw_ids)] = np.arange(len(raw_ids))
    if zero_to_ignore:
        lut[0] = IGNORE_INDEX
    return lut


# COCO-Stuff raw stuffthingmaps ids are 0..181 (COCO category id - 1); 11 thing ids are unused.
# mmseg's converter maps the 171 used ids in order to labelTrainIds 0..170.
_COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
_COCO_RAW_IDS = tuple(i for i in range(182) if i not in _COCO_UNUSED_IDS)
assert len(_COCO_RAW_IDS) == len(COCO_STUFF_CLASSES)

# -----------------------------------------------------------------------------
# readers for the mmseg layouts


class DatasetError(ValueError):
    """A missing or malformed dataset file; the one-line message names the path.

    Raised in a DataLoader worker process, torch re-raises it in the main process as
    DatasetError('Caught DatasetError in DataLoader worker process k.\nOriginal Traceback ...
    data.DatasetError: <message>\n') (torch/_utils.py ExceptionWrapper.reraise); the constructor
    keeps only <message>, so the error reads the same whatever the number of workers.
    """

    def __init__(self, message):
        head, sep, tb = str(message).partition('\nOriginal Traceback (most recent call last):\n')
        last = f'\n{type(self).__module__}.{type(self).__qualname__}: '
        if sep and head.startswith(f'Caught {type(self).__name__} in DataLoader worker process') and last in tb:
            message = tb.rsplit(last, 1)[1].rstrip('\n')
        super().__init__(message)


def _need(path, layout):
    """Return path if it exists, else raise DatasetError naming it and the expected layout."""
    if not path.exists():
        raise DatasetError(f'expected {path} (mmseg layout: {layout})')
    return path


def _find_root(root, marker, subdirs, layout):
    """The first of root, root/subdir... that contains `marker` (e.g. VOCdevkit parent auto-detect)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f'{root}: dataset root not found (mmseg layout: {layout})')
    for cand in [root] + [root / s for s in subdirs]:
        if (cand / marker).is_dir():
            return cand
    where = f" nor under {', '.join(f'{s}/' for s in subdirs)}" if subdirs else ''
    raise DatasetError(f'{root}: no {marker}/ folder there{where} (mmseg layout: {layout})')


def _read_ids(path, layout):
    """Image ids of a split file, one per line."""
    ids = [s.strip() for s in _need(path, layout).read_text().splitlines() if s.strip()]
    if not ids:
        raise DatasetError(f'{path}: split file lists no images')
    return ids


def _read_voc(root, split, layout):
    """VOC 2012. val: val.txt; train: trainaug.txt, else mmseg's train.txt + aug.txt, else train.txt."""
    root = _find_root(root, 'JPEGImages', ['VOC2012', 'VOCdevkit/VOC2012'], layout)
    sets = root / 'ImageSets' / 'Segmentation'
    if split == 'val':
        lists = [('val.txt', 'SegmentationClass')]
    elif (sets / 'trainaug.txt').is_file():  # the common 10,582-image list, all labels in Aug
        lists = [('trainaug.txt', 'SegmentationClassAug')]
    elif (sets / 'aug.txt').is_file():  # mmseg's voc_aug converter: aug.txt excludes train.txt ids
        lists = [('train.txt', 'SegmentationClass'), ('aug.txt', 'SegmentationClassAug')]
    else:
        lists = [('train.txt', 'SegmentationClass')]
    samples = {}  # image id -> (image, label); the first list naming an id wins
    for fname, ann in lists:
        _need(root / ann, layout)
        for i in _read_ids(sets / fname, layout):
            samples.setdefault(i, (root / 'JPEGImages' / f'{i}.jpg', root / ann / f'{i}.png'))
    print(f"voc {split}: {len(samples)} images from {' + '.join(f'{f} ({a})' for f, a in lists)}")
    return root, list(samples.values()), _lut(range(1, 21), zero_to_ignore=True)


def _read_context(root, split, layout, background):
    """PASCAL Context (mmseg-converted labels): 59 classes with 0 -> 255, or 60 with 0 = background."""
    root = _find_root(root, 'JPEGImages', ['VOC2010', 'VOCdevkit/VOC2010'], layout)
    ann = _need(root / 'SegmentationClassContext', layout)
    ids = _read_ids(root / 'ImageSets' / 'SegmentationContext' / f'{split}.txt', layout)
    lut = _lut(range(60)) if background else _lut(range(1, 60), zero_to_ignore=True)
    return root, [(root / 'JPEGImages' / f'{i}.jpg', ann / f'{i}.png') for i in ids], lut


def _list_images(img_dir, pattern):
    """Sorted images in a folder; an empty folder is an error."""
    images = sorted(img_dir.glob(pattern))
    if not images:
        raise DatasetError(f'{img_dir}: no {pattern} images')
    return images


def _read_coco(root, split, layout):
    """COCO-Stuff 164K: *_labelTrainIds.png (0..170, 255) as is; else raw stuffthingmaps *.png remapped."""
    root = _find_root(root, 'images', ['coco_stuff164k'], layout)
    img_dir = _need(root / 'images' / f'{split}2017', layout)
    ann_dir = _need(root / 'annotations' / f'{split}2017', layout)
    images = _list_images(img_dir, '*.jpg')
    if any(ann_dir.glob('*_labelTrainIds.png')):
        suffix, lut = '_labelTrainIds.png', _lut(range(171))
    else:
        suffix, lut = '.png', _lut(_COCO_RAW_IDS)
        print(f'coco_stuff {split}: no *_labelTrainIds.png in {ann_dir}; mapping raw ids 0..181 to 0..170')
    return root, [(p, ann_dir / f'{p.stem}{suffix}') for p in images], lut


def _read_toy(root, split, layout):
    """Toy world (toy.py): images/{split}/*.png with same-named label PNGs, raw values 0..24 (objects,
    -> classes 1..25) and 255 (background -> class 0)."""
    root = _find_root(root, 'images', [], layout)
    img_dir = _need(root / 'images' / split, layout)
    ann_dir = _need(root / 'annotations' / split, layout)
    images = _list_images(img_dir, '*.png')
    return root, [(p, ann_dir / p.name) for p in images], _lut([IGNORE_INDEX, *range(len(TOY_CLASSES) - 1)])


# -----------------------------------------------------------------------------
# the datasets: one entry each, from which train.py, evaluate.py and the checks below all derive


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """One dataset, declared once: its classes and split, where its files are and how to read them,
    its model settings, and the train.py defaults its recipe changes. Adding a dataset = one entry
    below (plus its reader if the layout is new)."""
    name: str
    classes: tuple[str, ...]  # names in label-index order
    unseen: tuple[str, ...]   # zero-shot unseen class names (empty: cross-dataset target only)
    layout: str               # the expected folder layout, shown in errors
    reader: Callable          # (root, split, layout) -> (root found, [(image, label) paths], label LUT)
    n_classes: int            # what the import-time check expects len(classes) to be
    crop: int                 # train crop size
    eval_short: int           # eval: resize the short side to this
    templates: str            # 'single' or 'ensemble' prompt templates (DESIGN §1)
    n_prompts: int            # deep visual prompts per layer (DESIGN §2)
    iters: int                # default train iterations
    recipe: dict = field(default_factory=dict)  # train.py defaults that differ from its RECIPE


DATASETS = {d.name: d for d in (
    DatasetInfo(name='voc', classes=VOC_CLASSES, unseen=VOC_UNSEEN, n_classes=20,
                layout='VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,SegmentationClassAug,ImageSets/Segmentation}',
                reader=_read_voc, crop=512, eval_short=512, templates='single', n_prompts=10, iters=20000),
    DatasetInfo(name='coco_stuff', classes=COCO_STUFF_CLASSES, unseen=COCO_STUFF_UNSEEN, n_classes=171,
                layout='coco_stuff164k/{images,annotations}/{train2017,val2017}',
                reader=_read_coco, crop=512, eval_short=512, templates='ensemble', n_prompts=100, iters=80000,
                recipe=dict(phase2_batch_size=8)),  # their transductive second job: 8 GPUs x 1
    # Context is only a cross-dataset target in the paper; 40k is mmseg's Context schedule.
    DatasetInfo(name='context59', classes=CONTEXT59_CLASSES, unseen=(), n_classes=59,
                layout='VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,ImageSets/SegmentationContext}',
                reader=partial(_read_context, background=False),
                crop=512, eval_short=512, templates='ensemble', n_prompts=10, iters=40000),
    DatasetInfo(name='context60', classes=('background',) + CONTEXT59_CLASSES, unseen=(), n_classes=60,
                layout='VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,ImageSets/SegmentationContext}',
                reader=partial(_read_context, background=True),
                crop=512, eval_short=512, templates='ensemble', n_prompts=10, iters=40000),
    # a small model on 64 px images: shorter warm-up and schedule (DESIGN §12)
    DatasetInfo(name='toy', classes=TOY_CLASSES, unseen=TOY_UNSEEN, n_classes=26,
                layout='<toy root>/{images,annotations}/{train,val}/*.png',
                reader=_read_toy, crop=64, eval_short=64, templates='single', n_prompts=10, iters=3000,
                recipe=dict(batch_size=8, lr=1e-3, warmup=100, eval_every=1000, workers=1,
                            ratio_range=(1.0, 1.0),  # no rescale: the pattern period is part of the class
                            photometric='off',       # hue jitter would cross its colour classes
                            # the trusty map's focal loss weights the unseen pixels 0.75 (authors: 0.25),
                            # a choice the toy world motivated (README)
                            trusty_alpha=0.75,
                            normalize='clip',        # its tiny CLIP was pretrained with CLIP's mean/std
                            save_best='on',          # as its documented results (DESIGN §12)
                            clip_model='toy_clip', data_root='data/toy')),
)}


def _check_class_lists():
    """Import-time sanity: sizes, no duplicates, unseen names in the class list, toy split rules."""
    for name, info in DATASETS.items():
        assert len(info.classes) == len(set(info.classes)) == info.n_classes, name
        assert set(info.unseen) <= set(info.classes), (name, set(info.unseen) - set(info.classes))
    seen = [c.split() for c in TOY_CLASSES if c not in TOY_UNSEEN]
    assert all(sum(w in c for c in seen) >= 3 for w in TOY_COLOURS + TOY_PATTERNS)
    assert sorted(sum(u.startswith(c + ' ') for u in TOY_UNSEEN) for c in TOY_COLOURS) == [1, 1, 1, 1, 2]


_check_class_lists()

# -----------------------------------------------------------------------------
# the torch Dataset


def _decode(path, what, rgb):
    """Fully decode an image file (truncated files raise: LOAD_TRUNCATED_IMAGES is left off)."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img.convert('RGB') if rgb else img)
    except FileNotFoundError:
        raise DatasetError(f'{path}: {what} not found') from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: unreadable {what} ({' '.join(str(e).split())})") from None


def _ranges(values):
    """Compact text for sorted ints: [0, 1, 2, 255] -> '0..2, 255'."""
    runs, start = [], values[0]
    for a, b in zip(values, list(values[1:]) + [None]):
        if b != a + 1:
            runs.append(f'{start}..{a}' if a > start else f'{a}')
            start = b
    return ', '.join(runs)


def _read_label(path, lut):
    """Read a single-channel index PNG (palette or grey) and map it through the LUT -> (H, W) int64."""
    raw = _decode(path, 'label', rgb=False)
    if raw.ndim != 2 or raw.dtype.kind not in 'ui':
        raise DatasetError(f'{path}: label is not a single-channel index PNG ({raw.dtype} {raw.shape})')
    clipped = np.clip(raw, 0, 255)
    label = lut[clipped]  # (H, W) int64
    bad = np.unique(raw[(label == _INVALID) | (clipped != raw)])
    if bad.size:
        raise DatasetError(f'{path}: label values {bad.tolist()} outside the valid raw values '
                           f'{_ranges(np.flatnonzero(lut != _INVALID).tolist())}')
    return label


class SegDataset(torch.utils.data.Dataset):
    """List of (image path, label path) pairs + label LUT + transform.

    Files are read lazily: a missing, truncated or inconsistent file raises DatasetError when its
    item is loaded. Items: {'image', 'label', 'path' (image path relative to root)}. Without a
    transform, image is a uint8 tv_tensors.Image (3, H, W), label an int64 tv_tensors.Mask (H, W).
    """

    def __init__(self, name, root, samples, lut, transform=None):
        self.name, self.classes = name, DATASETS[name].classes
        self.root, self.samples, self.lut, self.transform = Path(root), list(samples), lut, transform

    def __len__(self):
        return len(self.samples)

    def check_files(self):
        """Every listed image and label file is there (cheap, before a long run), else one DatasetError
        naming the first missing file and how many are missing."""
        missing = [p for pair in self.samples for p in pair if not p.is_file()]
        if missing:
            raise DatasetError(f'{missing[0]}: listed but not found ({len(missing)} of the {2 * len(self.samples)} '
                               f'image and label files of the {self.name} list are missing)')

    def __getitem__(self, i):
        img_path, lbl_path = self.samples[i]
        image = _decode(img_path, 'image', rgb=True)  # (H, W, 3) uint8
        label = _read_label(lbl_path, self.lut)  # (H, W) int64
        if label.shape != image.shape[:2]:
            (h, w), (ih, iw) = label.shape, image.shape[:2]
            raise DatasetError(f'{lbl_path}: label size {w}x{h} differs from image {img_path} size {iw}x{ih}')
        image = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())  # (3, H, W)
        label = tv_tensors.Mask(torch.from_numpy(label))  # (H, W)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return {'image': image, 'label': label, 'path': img_path.relative_to(self.root).as_posix()}


def build_dataset(name, root, split, transform=None):
    """Dataset `name` ('voc', 'coco_stuff', 'context59', 'context60', 'toy') split 'train'/'val' at root."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in ('train', 'val'):
        raise DatasetError(f"unknown split {split!r}; expected 'train' or 'val'")
    info = DATASETS[name]
    root, samples, lut = info.reader(Path(root).expanduser(), split, info.layout)
    return SegDataset(name, root, samples, lut, transform)


# -----------------------------------------------------------------------------
# transforms: callables on (image, label) composed with v2.Compose (DESIGN §8, mmseg semantics)


def keep_ratio_size(h, w, scale):
    """mmcv rescale_size: largest (h', w') with long edge <= max(scale), short edge <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


class RandomRescale:
    """mmseg Resize(img_scale=scale, ratio_range, keep_ratio=True): fit inside scale * r, r ~ U(range)."""

    def __init__(self, scale, ratio_range):
        self.scale, self.ratio_range = scale, ratio_range

    def __call__(self, image, label):
        lo, hi = self.ratio_range
        r = lo + (hi - lo) * torch.rand(()).item()
        size = list(keep_ratio_size(*image.shape[-2:], (int(self.scale[0] * r), int(self.scale[1] * r))))
        image = resize_bilinear(image, size)  # as mmcv's cv2 INTER_LINEAR: no antialiasing, also when shrinking
        label = F.resize(label, size, interpolation=v2.InterpolationMode.NEAREST)
        return image, label


class CatMaxRandomCrop:
    """mmseg RandomCrop: crop <= crop x crop, resampled up to `tries` times while one class
    (255 excluded) covers >= cat_max_ratio of the crop's labelled pixels or only one class is there."""

    def __init__(self, crop, cat_max_ratio=0.75, tries=10):
        self.crop, self.cat_max_ratio, self.tries = crop, cat_max_ratio, tries

    def _box(self, h, w):
        ch, cw = min(self.crop, h), min(self.crop, w)
        return torch.randint(h - ch + 1, ()).item(), torch.randint(w - cw + 1, ()).item(), ch, cw

    def _ok(self, label):
        values, counts = label.unique(return_counts=True)
        counts = counts[values != IGNORE_INDEX]
        return len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def __call__(self, image, label):
        box = self._box(*label.shape[-2:])
        if self.cat_max_ratio < 1:
            for _ in range(self.tries):
                if self._ok(F.crop(label, *box)):
                    break
                box = self._box(*label.shape[-2:])
        return F.crop(image, *box), F.crop(label, *box)


def pad_to(image, label, size):
    """Pad bottom/right to size x size: image with 0 (after normalisation), label with 255."""
    pad = [0, 0, size - image.shape[-1], size - image.shape[-2]]  # left, top, right, bottom
    return F.pad(image, pad, fill=0), F.pad(label, pad, fill=IGNORE_INDEX)


def as_tensors(image, label):
    """Unwrap tv_tensors into plain tensors for the model side."""
    return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


def _coin():  # mmseg's numpy.random.randint(2)
    return torch.rand(()).item() < 0.5


def _uniform(lo, hi):
    return lo + (hi - lo) * torch.rand(()).item()


def rgb_to_hsv_cv(img):
    """OpenCV's COLOR_RGB2HSV for uint8 images, on integral float (3, H, W) in 0..255: H in 0..179
    (degrees / 2, rounded), S = round(255 (V - min) / V), V = max. (OpenCV rounds with fixed-point
    tables, which can put H or S one level apart.)"""
    r, g, b = img
    v, vmin = img.max(0).values, img.min(0).values
    diff = v - vmin
    s = torch.where(v > 0, torch.round(255 * diff / v.clamp(min=1)), torch.zeros_like(v))
    x = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))  # in units of diff
    h = torch.where(diff > 0, torch.round(30 * x / diff.clamp(min=1)), torch.zeros_like(v))
    return torch.stack([h % 180, s, v])


def hsv_to_rgb_cv(hsv):
    """OpenCV's COLOR_HSV2RGB on uint8 values (H in 0..179): the float conversion, rounded to 0..255."""
    h, s, v = hsv[0] * (6 / 180), hsv[1] / 255, hsv[2] / 255
    sector = torch.floor(h)
    f = h - sector
    tab = torch.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))])  # (4, H, W)
    # OpenCV's sector table, as (r, g, b) indices into tab
    rgb_of = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    idx = rgb_of[sector.long() % 6].permute(2, 0, 1)                                  # (3, H, W)
    rgb = tab.gather(0, idx)
    rgb = torch.where(s > 0, rgb, v.expand(3, *v.shape))
    return torch.round(rgb * 255).clamp(0, 255)


class PhotoMetricDistortion:
    """mmseg 0.24's PhotoMetricDistortion on a uint8 image, label untouched: brightness adds
    U(-32, 32); contrast multiplies by U(0.5, 1.5) (no mean), second or last by a coin flip;
    saturation multiplies HSV-S by U(0.5, 1.5); hue adds randint(-18, 18) (-18..17) in OpenCV's
    0..179 units, mod 180; each with p = 0.5; every op clips to 0..255 and truncates to uint8."""

    def __init__(self, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    @staticmethod
    def convert(x, alpha=1.0, beta=0.0):
        return (x * alpha + beta).clamp(0, 255).floor()  # mmseg: clip, then astype(uint8)

    def apply(self, image, beta=None, alpha=None, saturation=None, hue=None, contrast_first=True):
        """The chain with given parameters; None skips that op."""
        x = image.as_subclass(torch.Tensor).float()                          # (3, H, W) in 0..255
        if beta is not None:
            x = self.convert(x, beta=beta)
        if contrast_first and alpha is not None:
            x = self.convert(x, alpha=alpha)
        if saturation is not None:
            hsv = rgb_to_hsv_cv(x)
            hsv[1] = self.convert(hsv[1], alpha=saturation)
            x = hsv_to_rgb_cv(hsv)
        if hue is not None:
            hsv = rgb_to_hsv_cv(x)
            hsv[0] = (hsv[0] + hue) % 180
            x = hsv_to_rgb_cv(hsv)
        if not contrast_first and alpha is not None:
            x = self.convert(x, alpha=alpha)
        return tv_tensors.wrap(x.to(torch.uint8), like=image)

    def __call__(self, image, label):
        beta = _uniform(-self.brightness, self.brightness) if _coin() else None
        contrast_first = _coin()
        alpha = _uniform(*self.contrast) if _coin() else None
        saturation = _uniform(*self.saturation) if _coin() else None
        hue = torch.randint(-self.hue, self.hue, ()).item() if _coin() else None  # -18..17, as numpy's randint
        return self.apply(image, beta, alpha, saturation, hue, contrast_first), label


def train_transform(mean, std, crop, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                    photometric=True):
    """DESIGN §8: rescale, cat-max crop, flip, photometric, normalise, pad -> (3, crop, crop) float32,
    (crop, crop) int64. mean/std in [0, 1] units (e.g. the CLIP model's); the toy world passes
    scale=(4 * crop, crop)."""
    steps = [RandomRescale(scale, ratio_range), CatMaxRandomCrop(crop, cat_max_ratio),
             v2.RandomHorizontalFlip(0.5)]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [v2.ToDtype(torch.float32, scale=True),  # images only: the Mask keeps int64
              v2.Normalize(mean, std), partial(pad_to, size=crop), as_tensors]
    return v2.Compose(steps)


def mmseg_test_size(h, w, short):
    """mmseg's test Resize(keep_ratio=True, min_size=short) (DESIGN §15): the short side becomes exactly
    `short`, the long side int(long * short / short_side + 0.5), rounded, with no cap (300x1500 -> 512x2560)."""
    return keep_ratio_size(h, w, (short * max(h, w) / min(h, w), short))  # mmseg's own float steps


def resize_bilinear(image, size):
    """cv2 INTER_LINEAR (mmcv's resize): half-pixel centres, no antialiasing, whether it enlarges or
    shrinks; computed in float32 and rounded back to uint8 (cv2's fixed-point weights can still
    differ by one grey level on ~12% of the pixels)."""
    out = F.resize(image.to(torch.float32), list(size), interpolation=v2.InterpolationMode.BILINEAR,
                   antialias=False)
    if not image.is_floating_point():
        out = out.round().clamp(0, 255).to(image.dtype)
    return tv_tensors.wrap(out, like=image)


RESIZES = ('mmseg', 'torchvision')  # eval_transform's `resize` choices


def resize_short(image, label, short, resize='mmseg'):
    """Resize the image only so that its short side is exactly `short`. 'mmseg': mmseg_test_size and
    resize_bilinear (how the published numbers were computed); 'torchvision': F.resize(image, [short],
    antialias=True), which truncates the long side and antialiases when shrinking."""
    if resize == 'torchvision':
        return F.resize(image, [short], interpolation=v2.InterpolationMode.BILINEAR, antialias=True), label
    if resize not in RESIZES:
        raise ValueError(f"unknown resize {resize!r}; expected one of {', '.join(RESIZES)}")
    return resize_bilinear(image, mmseg_test_size(*image.shape[-2:], short)), label


def eval_transform(mean, std, short, resize='mmseg'):
    """Eval: short side -> `short` (see resize_short), normalise; the label stays at the original
    resolution (the scores are resized back and metrics computed there). Returns image (3, h', w')
    float32, label (H, W) int64."""
    return v2.Compose([partial(resize_short, short=short, resize=resize), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std), as_tensors])
