"""Datasets for TagCLIP (DESIGN §9, §11).

The datasets: class lists (classes.json), zero-shot seen/unseen splits, and readers for the mmseg
layouts of PASCAL VOC 2012 (+SBD aug), COCO-Stuff 164K and PASCAL Context (59 / 60 classes), for the
detectron2 / CAT-Seg layouts of the open-vocabulary benchmarks (ADE20K-150 / -847, PASCAL Context-459,
-59, VOC-20 with and without background), for a folder of one's own and for the toy world. Items come
as uint8 images and labels of class indices 0..C-1, or `ignore_value(C)` = ignore (255; 65535 for
datasets of 255 classes or more, whose label files are 16-bit); transforms.py makes training and
evaluation inputs of them.
"""
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

IGNORE_INDEX = 255    # the label of pixels that count for no class (training: always)
IGNORE_16BIT = 65535  # the same for datasets of 255 classes or more (A-847, PC-459), where 255 is a class
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
_INVALID = -1  # LUT entry for raw label values that belong to no class: reading them is an error

# -----------------------------------------------------------------------------
# class names and zero-shot unseen splits (ZegCLIP's text-embedding notebook and dataset configs)

CLASS_NAMES = json.loads(Path(__file__).with_name('classes.json').read_text())  # the long lists are data
VOC_CLASSES = tuple(CLASS_NAMES['voc'])
VOC_UNSEEN = ('pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
COCO_STUFF_CLASSES = tuple(CLASS_NAMES['coco_stuff'])  # 80 COCO things, then 91 stuff; index = labelTrainIds value
COCO_STUFF_UNSEEN = (
    'cow', 'giraffe', 'suitcase', 'frisbee', 'skateboard', 'carrot', 'scissors', 'cardboard',
    'clouds', 'grass', 'playingfield', 'river', 'road', 'tree', 'wall-concrete')
CONTEXT59_CLASSES = tuple(CLASS_NAMES['context59'])
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
# label look-up tables: raw label value (8 or 16 bits) -> class index, ignore, or _INVALID


def ignore_value(n_classes):
    """The ignore label of a dataset of n_classes: 255, or 65535 where 255 is a class index. The
    metrics skip every label >= n_classes."""
    return IGNORE_INDEX if n_classes < IGNORE_INDEX else IGNORE_16BIT


def _lut(raw_ids, zero_to_ignore=False, bits=8):
    """2**bits-entry LUT sending raw_ids[k] -> k, the ignore value to itself unless listed (and 0 to it
    if asked), the rest invalid."""
    ignore = ignore_value(len(raw_ids))
    lut = np.full(1 << bits, _INVALID, np.int64)
    lut[ignore] = ignore
    lut[list(raw_ids)] = np.arange(len(raw_ids))
    if zero_to_ignore:
        lut[0] = ignore
    return lut


# COCO-Stuff raw stuffthingmaps ids are 0..181 (COCO category id - 1); 11 thing ids are unused.
# mmseg's converter maps the 171 used ids in order to labelTrainIds 0..170.
_COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
_COCO_RAW_IDS = tuple(i for i in range(182) if i not in _COCO_UNUSED_IDS)
assert len(_COCO_RAW_IDS) == len(COCO_STUFF_CLASSES)

# -----------------------------------------------------------------------------
# readers, one per folder layout


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
        raise DatasetError(f'{path}: not found (expected layout: {layout})')
    return path


def _find_root(root, marker, subdirs, layout):
    """The first of root, root/subdir... that contains `marker` (e.g. VOCdevkit parent auto-detect)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f'{root}: dataset root not found (expected layout: {layout})')
    for cand in [root] + [root / s for s in subdirs]:
        if (cand / marker).is_dir():
            return cand
    where = f" nor under {', '.join(f'{s}/' for s in subdirs)}" if subdirs else ''
    raise DatasetError(f'{root}: no {marker}/ folder there{where} (expected layout: {layout})')


def _read_ids(path, layout):
    """Image ids of a split file, one per line."""
    ids = [s.strip() for s in _need(path, layout).read_text().splitlines() if s.strip()]
    if not ids:
        raise DatasetError(f'{path}: split file lists no images')
    return ids


def _pair_by_stem(img_dir, ann_dir, pattern, image_ext='.jpg'):
    """detectron2's pairing: every label file in ann_dir, with the image of the same stem."""
    return [(img_dir / f'{p.stem}{image_ext}', p) for p in _list_images(ann_dir, pattern)]


def _read_voc(root, split, layout, background=False):
    """VOC 2012. val: val.txt; train: trainaug.txt, else mmseg's train.txt + aug.txt, else train.txt.
    Labels 1..20 -> 0..19; background (0) ignored, or class 20 with `background`. val also reads
    CAT-Seg's preparation, annotations_detectron2[_bg]/val (0..19 [20 = background], 255)."""
    root = _find_root(root, 'JPEGImages', ['VOC2012', 'VOCdevkit/VOC2012'], layout)
    lut = _lut([*range(1, 21), 0]) if background else _lut(range(1, 21), zero_to_ignore=True)
    det = root / f"annotations_detectron2{'_bg' if background else ''}" / split
    if split == 'val' and det.is_dir():
        return root, _pair_by_stem(root / 'JPEGImages', det, '*.png'), _lut(range(21 if background else 20))
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
    return root, list(samples.values()), lut


def _read_context(root, split, layout, background):
    """PASCAL Context (mmseg-converted labels): 59 classes with 0 -> 255, or 60 with 0 = background;
    59 also from CAT-Seg's preparation, annotations_detectron2/pc59_{split} (0..58, 255)."""
    root = _find_root(root, 'JPEGImages', ['VOC2010', 'VOCdevkit/VOC2010'], layout)
    det = root / 'annotations_detectron2' / f'pc59_{split}'
    if not background and det.is_dir():
        return root, _pair_by_stem(root / 'JPEGImages', det, '*.png'), _lut(range(59))
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


def _read_pc459(root, split, layout):
    """PASCAL Context, all 459 classes (detectron2's preparation): annotations_detectron2/pc459_{split}/*.tif,
    16-bit, 0..458 (65535 ignore), images JPEGImages/<stem>.jpg."""
    root = _find_root(root, 'JPEGImages', ['VOC2010', 'VOCdevkit/VOC2010'], layout)
    ann = _need(root / 'annotations_detectron2' / f'pc459_{split}', layout)
    return root, _pair_by_stem(root / 'JPEGImages', ann, '*.tif'), _lut(range(459), bits=16)


def _ade_split(split):
    return {'train': 'training', 'val': 'validation'}[split]


def _read_ade150(root, split, layout):
    """ADE20K SceneParsing, 150 classes: images/{training,validation}/*.jpg with detectron2's
    annotations_detectron2 (0..149, 255) where there, else the raw annotations (0 = other -> ignore, 1..150)."""
    root = _find_root(root, 'images', ['ADEChallengeData2016'], layout)
    img_dir = _need(root / 'images' / _ade_split(split), layout)
    det = root / 'annotations_detectron2' / _ade_split(split)
    if det.is_dir():
        return root, _pair_by_stem(img_dir, det, '*.png'), _lut(range(150))
    ann = _need(root / 'annotations' / _ade_split(split), layout)
    return root, _pair_by_stem(img_dir, ann, '*.png'), _lut(range(1, 151), zero_to_ignore=True)


def _read_ade847(root, split, layout):
    """ADE20K-full, 847 classes (detectron2's preparation): images_detectron2/<split>/*.jpg,
    annotations_detectron2/<split>/*.tif, 16-bit, 0..846 (65535 ignore)."""
    root = _find_root(root, 'images_detectron2', ['ADE20K_2021_17_01'], layout)
    img_dir = _need(root / 'images_detectron2' / _ade_split(split), layout)
    ann = _need(root / 'annotations_detectron2' / _ade_split(split), layout)
    return root, _pair_by_stem(img_dir, ann, '*.tif'), _lut(range(847), bits=16)


def _read_names(path):
    """Class names of a text file, one per line (blank lines skipped); duplicates are an error."""
    try:
        names = [' '.join(line.split()) for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DatasetError(f'{path}: {e.strerror or e}') from None
    dupes = sorted({n for n in names if names.count(n) > 1})
    if not names or dupes:
        raise DatasetError(f"{path}: {'duplicate class names ' + ', '.join(dupes) if dupes else 'no class names'}")
    return tuple(names)


def folder_info(root):
    """The `folder` entry for the dataset at root: its classes.txt and (optional) unseen.txt."""
    root = Path(root).expanduser()
    names = _read_names(root / 'classes.txt')
    unseen = _read_names(root / 'unseen.txt') if (root / 'unseen.txt').is_file() else ()
    if set(unseen) - set(names):
        raise DatasetError(f"{root / 'unseen.txt'}: not in classes.txt: {', '.join(sorted(set(unseen) - set(names)))}")
    return replace(DATASETS['folder'], classes=names, unseen=unseen, n_classes=len(names))


def dataset_info(name, root=None):
    """DATASETS[name]; for 'folder', with the classes of the dataset at root."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return folder_info(root) if name == 'folder' else DATASETS[name]


def _read_folder(root, split, layout):
    """A dataset of one's own: images/<split>/* with labels/<split>/<stem>.png holding class indices
    (the line numbers of classes.txt, from 0), 255 ignore (65535 with 255 classes or more); 8 or 16 bits."""
    root = _find_root(root, 'images', [], layout)
    n = len(_read_names(root / 'classes.txt'))
    img_dir, ann = _need(root / 'images' / split, layout), _need(root / 'labels' / split, layout)
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise DatasetError(f"{img_dir}: no images ({' '.join(IMAGE_EXTS)})")
    return root, [(p, ann / f'{p.stem}.png') for p in images], _lut(range(n), bits=16)


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
    prompt_names: tuple[str, ...] = ()  # the names the text prompts use, if not `classes`
    prompt_class: tuple[int, ...] = ()  # the class each of prompt_names counts as, if not one each
    n_prompts: int            # deep visual prompts per layer (DESIGN §2)
    iters: int                # default train iterations
    recipe: dict = field(default_factory=dict)  # train.py defaults that differ from recipe.RECIPE


_BENCHMARK = dict(crop=512, eval_short=512, templates='ensemble', n_prompts=10, iters=20000)
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
    # the open-vocabulary benchmarks (cross-dataset targets: no split, every class unseen), in the layouts
    # of detectron2's / CAT-Seg's preparation scripts; their iters only matter for training on them
    DatasetInfo(name='voc20', classes=VOC_CLASSES, unseen=(), n_classes=20,
                layout='VOCdevkit/VOC2012/{JPEGImages,annotations_detectron2/val} or the voc layout',
                reader=_read_voc, **_BENCHMARK),
    # CAT-Seg's PAS-20b: 39 more Context names stand for background (class 20) instead of 'background'
    DatasetInfo(name='voc20b', classes=VOC_CLASSES + ('background',), unseen=(), n_classes=21,
                prompt_names=VOC_CLASSES + tuple(CLASS_NAMES['voc20b_background']),
                prompt_class=tuple(range(20)) + (20,) * len(CLASS_NAMES['voc20b_background']),
                layout='VOCdevkit/VOC2012/{JPEGImages,annotations_detectron2_bg/val} or the voc layout',
                reader=partial(_read_voc, background=True), **_BENCHMARK),
    DatasetInfo(name='ade150', classes=tuple(CLASS_NAMES['ade150']), unseen=(), n_classes=150,
                layout='ADEChallengeData2016/{images,annotations_detectron2 or annotations}/{training,validation}',
                reader=_read_ade150, **_BENCHMARK),
    DatasetInfo(name='ade847', classes=tuple(CLASS_NAMES['ade847']), unseen=(), n_classes=847,
                prompt_names=tuple(n.split(', ')[0] for n in CLASS_NAMES['ade847']),  # CAT-Seg's: the first synonym
                layout='ADE20K_2021_17_01/{images_detectron2,annotations_detectron2}/validation',
                reader=_read_ade847, **_BENCHMARK),
    DatasetInfo(name='pc459', classes=tuple(CLASS_NAMES['pc459']), unseen=(), n_classes=459,
                layout='VOCdevkit/VOC2010/{JPEGImages,annotations_detectron2/pc459_val}',
                reader=_read_pc459, **_BENCHMARK),
    # one's own dataset: classes.txt (and unseen.txt) at --data-root fill in classes / unseen (folder_info)
    DatasetInfo(name='folder', classes=(), unseen=(), n_classes=0,
                layout='<root>/{classes.txt,[unseen.txt],images/{train,val}/*,labels/{train,val}/*.png}',
                reader=_read_folder, **_BENCHMARK),
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


# the open-vocabulary benchmark suite (evaluate.py --suite): its names in the literature -> DATASETS
SUITE = {'a847': 'ade847', 'pc459': 'pc459', 'a150': 'ade150', 'pc59': 'context59', 'pc60': 'context60',
         'pas20': 'voc20', 'pas20b': 'voc20b'}


def _check_class_lists():
    """Import-time sanity: sizes, no duplicates, unseen names in the class list, toy split rules."""
    for name, info in DATASETS.items():
        assert len(info.classes) == len(set(info.classes)) == info.n_classes, name
        assert set(info.unseen) <= set(info.classes), (name, set(info.unseen) - set(info.classes))
        assert len(info.prompt_names) == (len(info.prompt_class) or len(info.classes)) or not info.prompt_names, name
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


def _header_size(path, what):
    """(width, height) from a file's header, without decoding it."""
    try:
        with Image.open(path) as img:
            return img.size
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
    """Read a single-channel index image (palette or grey PNG, 16-bit PNG or TIFF) and map it through
    the LUT -> (H, W) int64."""
    raw = _decode(path, 'label', rgb=False)
    if raw.ndim != 2 or raw.dtype.kind not in 'ui':
        raise DatasetError(f'{path}: label is not a single-channel index PNG ({raw.dtype} {raw.shape})')
    clipped = np.clip(raw, 0, len(lut) - 1)
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

    def __init__(self, name, root, samples, lut, transform=None, classes=None):
        self.name, self.classes = name, DATASETS[name].classes if classes is None else classes
        self.root, self.samples, self.lut, self.transform = Path(root), list(samples), lut, transform

    def __len__(self):
        return len(self.samples)

    def check_files(self, sizes=False):
        """Every listed image and label file is there (cheap, before a long run), else one DatasetError
        naming the first missing file and how many are missing. sizes: also each label's size against
        its image's, from the file headers."""
        missing = [p for pair in self.samples for p in pair if not p.is_file()]
        if missing:
            raise DatasetError(f'{missing[0]}: listed but not found ({len(missing)} of the {2 * len(self.samples)} '
                               f'image and label files of the {self.name} list are missing)')
        for img_path, lbl_path in self.samples if sizes else ():
            (iw, ih), (w, h) = (_header_size(img_path, 'image'), _header_size(lbl_path, 'label'))
            if (iw, ih) != (w, h):
                raise DatasetError(f'{lbl_path}: label size {w}x{h} differs from image {img_path} size {iw}x{ih}')

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
    """Dataset `name` (a DATASETS key) split 'train'/'val' at root."""
    info = dataset_info(name, root)
    if split not in ('train', 'val'):
        raise DatasetError(f"unknown split {split!r}; expected 'train' or 'val'")
    root, samples, lut = info.reader(Path(root).expanduser(), split, info.layout)
    return SegDataset(name, root, samples, lut, transform, info.classes)
