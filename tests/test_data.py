"""Tests for data.py: layouts, label remapping, one-line errors, and the train / eval transforms."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import DATASETS, TOY_CLASSES, DatasetError, build_dataset  # noqa: E402
from transforms import (PhotoMetricDistortion, RandomRescale, eval_transform, keep_ratio_size,  # noqa: E402
                        mmseg_test_size, resize_bilinear, resize_short, rgb_to_hsv_cv, train_transform)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
H, W = 6, 8
RAW = np.array([[0, 1, 20, 255]], np.uint8).repeat(H, 0).repeat(W // 4, 1)  # (H, W) VOC raw values


def _jpeg(path, h=H, w=W, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def _png(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(arr, np.uint8), mode='L')
    if palette:  # like VOC's SegmentationClass: a 'P' image whose indices are the labels
        img = img.convert('P')
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def _split(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(f'{i}\n' for i in ids))


@pytest.fixture
def voc(tmp_path):
    """tmp_path/VOCdevkit/VOC2012 with images a, b, c; train.txt = a, val.txt = b, c."""
    root = tmp_path / 'VOCdevkit' / 'VOC2012'
    for k, i in enumerate('abc'):
        _jpeg(root / 'JPEGImages' / f'{i}.jpg', seed=k)
        _png(root / 'SegmentationClass' / f'{i}.png', RAW, palette=True)
        _png(root / 'SegmentationClassAug' / f'{i}.png', RAW)
    _split(root / 'ImageSets/Segmentation/train.txt', ['a'])
    _split(root / 'ImageSets/Segmentation/val.txt', ['b', 'c'])
    return root


def _error(fn, *needles):
    """Run fn, expect a one-line DatasetError mentioning every needle."""
    with pytest.raises(DatasetError) as e:
        fn()
    msg = str(e.value)
    assert '\n' not in msg and all(str(n) in msg for n in needles), msg
    return msg

# -----------------------------------------------------------------------------
# class lists


def test_class_lists():
    sizes = {'voc': (20, 5), 'coco_stuff': (171, 15), 'context59': (59, 0), 'context60': (60, 0),
             'toy': (26, 6)}
    for name, (n, n_unseen) in sizes.items():
        info = DATASETS[name]
        assert (len(info.classes), len(info.unseen)) == (n, n_unseen)
        assert set(info.unseen) <= set(info.classes)
    assert DATASETS['context60'].classes[0] == 'background'
    assert DATASETS['context60'].classes[1:] == DATASETS['context59'].classes
    coco = DATASETS['coco_stuff'].classes
    assert [coco[i] for i in (0, 62, 79, 80, 170)] == ['person', 'tv', 'toothbrush', 'banner', 'wood']
    assert TOY_CLASSES[:3] == ('background', 'red solid', 'red striped') and TOY_CLASSES[-1] == 'purple dotted'
    assert DATASETS['voc'].iters == 20000 and DATASETS['coco_stuff'].n_prompts == 100

# -----------------------------------------------------------------------------
# layouts and label remapping


def test_voc_val_remaps_labels(voc):
    ds = build_dataset('voc', voc, 'val')
    assert len(ds) == 2 and ds.classes == DATASETS['voc'].classes
    item = ds[0]
    assert isinstance(item['image'], tv_tensors.Image) and isinstance(item['label'], tv_tensors.Mask)
    assert item['image'].shape == (3, H, W) and item['image'].dtype == torch.uint8
    assert item['label'].dtype == torch.int64 and item['path'] == 'JPEGImages/b.jpg'
    want = np.array([255, 0, 19, 255])[np.array([0, 1, 20, 255]).searchsorted(RAW)]
    assert (item['label'].numpy() == want).all()


@pytest.mark.parametrize('up', [1, 2])
def test_voc_parent_folders(voc, up):
    ds = build_dataset('voc', voc.parents[up - 1], 'val')
    assert ds.root == voc and len(ds) == 2


def test_voc_train_split_fallback(voc, capsys):
    sets = voc / 'ImageSets/Segmentation'
    ds = build_dataset('voc', voc, 'train')
    assert ds.samples == [(voc / 'JPEGImages/a.jpg', voc / 'SegmentationClass/a.png')]
    assert 'train.txt (SegmentationClass)' in capsys.readouterr().out
    _split(sets / 'aug.txt', ['c', 'a'])  # mmseg: train.txt + aug.txt, duplicates kept once
    ds = build_dataset('voc', voc, 'train')
    assert [lbl.relative_to(voc).as_posix() for _, lbl in ds.samples] == [
        'SegmentationClass/a.png', 'SegmentationClassAug/c.png']
    _split(sets / 'trainaug.txt', ['a', 'b', 'c'])
    ds = build_dataset('voc', voc, 'train')
    assert [lbl.parent.name for _, lbl in ds.samples] == ['SegmentationClassAug'] * 3
    assert 'trainaug.txt' in capsys.readouterr().out
    assert (ds[1]['label'].numpy()[0, :4] == [255, 255, 0, 0]).all()


def test_coco_stuff_no_remap(tmp_path):
    root = tmp_path / 'coco_stuff164k'
    _jpeg(root / 'images/val2017/000001.jpg')
    raw = np.array([[0, 170, 255, 5]], np.uint8).repeat(H, 0).repeat(2, 1)
    _png(root / 'annotations/val2017/000001_labelTrainIds.png', raw)
    _png(root / 'annotations/val2017/000001.png', np.full((H, W), 181))  # raw map: must be ignored
    ds = build_dataset('coco_stuff', tmp_path, 'val')
    assert ds.root == root and ds[0]['path'] == 'images/val2017/000001.jpg'
    assert (ds[0]['label'].numpy() == raw).all()


def test_coco_stuff_raw_stuffthingmaps(tmp_path):
    _jpeg(tmp_path / 'images/train2017/1.jpg')
    raw = np.array([[0, 12, 181, 255]], np.uint8).repeat(H, 0).repeat(2, 1)
    _png(tmp_path / 'annotations/train2017/1.png', raw)
    label = build_dataset('coco_stuff', tmp_path, 'train')[0]['label'].numpy()
    assert (label[0, ::2] == [0, 11, 170, 255]).all()
    _png(tmp_path / 'annotations/train2017/1.png', np.full((H, W), 11))  # an unused COCO id
    _error(lambda: build_dataset('coco_stuff', tmp_path, 'train')[0], '1.png', '[11]')


def test_context_59_and_60(tmp_path):
    root = tmp_path / 'VOCdevkit/VOC2010'
    _jpeg(root / 'JPEGImages/2008_000002.jpg')
    raw = np.array([[0, 1, 59, 255]], np.uint8).repeat(H, 0).repeat(2, 1)
    _png(root / 'SegmentationClassContext/2008_000002.png', raw)
    _split(root / 'ImageSets/SegmentationContext/val.txt', ['2008_000002'])
    l59 = build_dataset('context59', tmp_path, 'val')[0]['label'].numpy()
    l60 = build_dataset('context60', root, 'val')[0]['label'].numpy()
    assert (l59[0, ::2] == [255, 0, 58, 255]).all() and (l60 == raw).all()
    _png(root / 'SegmentationClassContext/2008_000002.png', np.full((H, W), 60))
    for name in ('context59', 'context60'):
        _error(lambda: build_dataset(name, root, 'val')[0], '2008_000002.png', '[60]')


def test_toy_layout(tmp_path):
    _png(tmp_path / 'images/train/00000.png', np.zeros((H, W)))  # grey PNGs decode to RGB too
    raw = np.array([[0, 24, 255, 7]], np.uint8).repeat(H, 0).repeat(2, 1)
    _png(tmp_path / 'annotations/train/00000.png', raw)
    item = build_dataset('toy', tmp_path, 'train')[0]
    want = np.array([[1, 25, 0, 8]]).repeat(H, 0).repeat(2, 1)  # background (raw 255) is class 0
    assert item['image'].shape == (3, H, W) and (item['label'].numpy() == want).all()
    _png(tmp_path / 'annotations/train/00000.png', np.full((H, W), 25))
    _error(lambda: build_dataset('toy', tmp_path, 'train')[0], 'annotations/train/00000.png', '[25]')

# -----------------------------------------------------------------------------
# bad input: one-line DatasetError naming the path


def test_missing_root_and_split_file(voc, tmp_path):
    _error(lambda: build_dataset('voc', tmp_path / 'nowhere', 'val'), tmp_path / 'nowhere')
    _error(lambda: build_dataset('voc', tmp_path / 'VOCdevkit/VOC2012/JPEGImages', 'val'), 'VOC2012')
    (voc / 'ImageSets/Segmentation/val.txt').unlink()
    _error(lambda: build_dataset('voc', voc, 'val'), voc / 'ImageSets/Segmentation/val.txt', 'expected layout')
    _error(lambda: build_dataset('coco_stuff', tmp_path, 'val'), tmp_path, 'coco_stuff164k')
    _error(lambda: build_dataset('ade', tmp_path, 'val'), 'voc', 'coco_stuff', 'toy')
    _error(lambda: build_dataset('voc', voc, 'test'), 'test')


def test_listed_image_missing(voc):
    _split(voc / 'ImageSets/Segmentation/val.txt', ['b', 'zzz'])
    ds = build_dataset('voc', voc, 'val')  # construction does not read files
    _error(lambda: ds[1], voc / 'JPEGImages/zzz.jpg', 'not found')
    # train.py checks every listed file before its first step: the first missing one and the count
    _error(ds.check_files, voc / 'JPEGImages/zzz.jpg', 'not found', '2 of the 4')


def test_truncated_jpeg(voc):
    _jpeg(voc / 'JPEGImages/b.jpg', seed=5)
    data = (voc / 'JPEGImages/b.jpg').read_bytes()
    (voc / 'JPEGImages/b.jpg').write_bytes(data[: len(data) // 2])
    _error(lambda: build_dataset('voc', voc, 'val')[0], voc / 'JPEGImages/b.jpg', 'unreadable')


def test_label_size_mismatch(voc):
    _png(voc / 'SegmentationClass/c.png', np.zeros((W, H)))
    _error(lambda: build_dataset('voc', voc, 'val')[1], voc / 'SegmentationClass/c.png', 'size')


def test_label_value_out_of_range(voc, tmp_path):
    bad = RAW.copy()
    bad[0, 0] = 21  # would become 20 after the shift: no such VOC class
    _png(voc / 'SegmentationClass/b.png', bad, palette=True)
    _error(lambda: build_dataset('voc', voc, 'val')[0], voc / 'SegmentationClass/b.png', '[21]', '0..20, 255')
    root = tmp_path / 'coco'
    _jpeg(root / 'images/val2017/1.jpg')
    _png(root / 'annotations/val2017/1_labelTrainIds.png', np.full((H, W), 200))
    _error(lambda: build_dataset('coco_stuff', root, 'val')[0], '1_labelTrainIds.png', '[200]', '0..170, 255')

# -----------------------------------------------------------------------------
# transforms


def _sample(h, w, label):
    """tv_tensors pair: random uint8 image (3, h, w) and the given (h, w) label."""
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(torch.as_tensor(label, dtype=torch.int64))


def test_keep_ratio_size():
    assert keep_ratio_size(375, 500, (2048, 512)) == (512, 683)  # short edge binds
    assert keep_ratio_size(500, 4000, (2048, 512)) == (256, 2048)  # long edge binds
    assert keep_ratio_size(10, 12, (16, 8)) == (8, 10)


def test_train_transform_shapes():
    torch.manual_seed(0)
    t = train_transform(MEAN, STD, crop=32, scale=(128, 32))
    for _ in range(3):
        image, label = t(*_sample(40, 60, torch.randint(0, 5, (40, 60))))
        assert type(image) is torch.Tensor and type(label) is torch.Tensor
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label.shape == (32, 32) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_train_transform_pads_small_images():
    torch.manual_seed(0)
    t = train_transform(MEAN, STD, crop=32, scale=(16, 8), ratio_range=(1.0, 1.0))
    image, label = t(*_sample(10, 12, torch.randint(0, 3, (10, 12))))  # rescaled to 8 x 10
    assert image.shape == (3, 32, 32) and label.shape == (32, 32)
    assert (label[8:] == 255).all() and (label[:, 10:] == 255).all() and (label[:8, :10] < 3).all()
    assert (image[:, 8:] == 0).all() and (image[:, :, 10:] == 0).all()


COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # class k -> RGB


def _coloured(h, w):
    """Asymmetric label (class 0 left, 1 right, a block of 2) and an image painted by class."""
    label = torch.ones(h, w, dtype=torch.int64)
    label[:, : w // 3] = 0
    label[h // 6: h // 2, 2 * w // 3: w - 2] = 2
    image = (COLOURS[label].permute(2, 0, 1) * 255).round().to(torch.uint8)  # (3, h, w)
    return tv_tensors.Image(image), tv_tensors.Mask(label)


def _check_colours(image, label):
    """Every labelled pixel whose 3x3 neighbourhood shares its class carries that class's colour."""
    rgb = image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    pad = torch.nn.functional.pad(label[None, None].float(), (1, 1, 1, 1), value=-1)
    same = (torch.nn.functional.unfold(pad, 3) == label.reshape(1, 1, -1)).all(1).reshape(label.shape)
    inner = same & (label != 255)
    assert inner.sum() > 100
    assert (rgb.permute(1, 2, 0)[inner] - COLOURS[label[inner]]).abs().max() < 0.02


def test_flip_moves_image_and_label_together():
    image0, label0 = _coloured(24, 32)
    t = train_transform(MEAN, STD, crop=32, scale=(32, 24), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                        photometric=False)  # no rescale, no crop: only flip + pad
    flipped = []
    for seed in range(8):
        torch.manual_seed(seed)
        image, label = t(image0, label0)
        assert (label[24:] == 255).all()
        flipped.append(bool((label[:24] == label0.flip(-1)).all()))
        assert flipped[-1] or (label[:24] == label0).all()
        _check_colours(image, label)
    assert any(flipped) and not all(flipped)
    t = train_transform(MEAN, STD, crop=32, scale=(32, 24), ratio_range=(1.7, 1.7), photometric=False)
    for seed in range(4):  # rescale + crop + flip: colours still follow labels
        torch.manual_seed(seed)
        _check_colours(*t(image0, label0))


def test_cat_max_ratio():
    label = torch.zeros(32, 64, dtype=torch.int64)
    label[:, 32:] = 1  # a 32-wide crop is mixed enough (< 75% one class) about half the time

    def max_share(cat_max_ratio, seed):
        torch.manual_seed(seed)
        t = train_transform(MEAN, STD, crop=32, scale=(64, 32), ratio_range=(1.0, 1.0),
                            cat_max_ratio=cat_max_ratio, photometric=False)
        _, out = t(*_sample(32, 64, label))
        return max((out == k).float().mean().item() for k in (0, 1))

    assert all(max_share(0.75, s) < 0.75 for s in range(20))
    assert any(max_share(1.0, s) >= 0.75 for s in range(20))  # the test would notice no retries


def test_photometric_distortion_is_image_only():
    image0, label0 = _coloured(24, 32)
    t = train_transform(MEAN, STD, crop=32, scale=(32, 24), ratio_range=(1.0, 1.0), cat_max_ratio=1.0)
    changed = 0
    for seed in range(6):
        torch.manual_seed(seed)
        image, label = t(image0, label0)
        assert (label[:24] == label0).all() or (label[:24] == label0.flip(-1)).all()
        ref = eval_transform(MEAN, STD, 24)(image0, label0)[0]
        changed += not (torch.allclose(image[:, :24], ref, atol=0.02)
                        or torch.allclose(image[:, :24], ref.flip(-1), atol=0.02))
    assert changed > 0


def test_eval_transform():
    image, label = _sample(30, 50, torch.randint(0, 4, (30, 50)))
    image = tv_tensors.Image(torch.full((3, 30, 50), 128, dtype=torch.uint8))
    out, out_label = eval_transform(MEAN, STD, short=16)(image, label)
    assert out.shape == (3, 16, 27) and out.dtype == torch.float32 and type(out) is torch.Tensor  # 26.67 -> 27
    assert torch.allclose(out, torch.tensor((128 / 255 - 0.5) / 0.25), atol=1e-4)
    assert out_label.dtype == torch.int64 and torch.equal(out_label, label.as_subclass(torch.Tensor))
    tall, _ = eval_transform(MEAN, STD, short=16)(*_sample(50, 30, torch.zeros(50, 30)))
    assert tall.shape == (3, 27, 16)
    old, _ = eval_transform(MEAN, STD, short=16, resize='torchvision')(image, label)
    assert old.shape == (3, 16, 26)  # the named old behaviour truncates
    with pytest.raises(ValueError, match='unknown resize'):
        eval_transform(MEAN, STD, short=16, resize='cv2')(image, label)


def _mmseg_rule(h, w, short):
    """Independent statement of mmseg's test size: short side = short, long side round-half-up of
    long * short / short_side (exact rational arithmetic)."""
    from fractions import Fraction
    long = int(Fraction(max(h, w) * short, min(h, w)) + Fraction(1, 2))
    return (short, long) if h <= w else (long, short)


@pytest.mark.parametrize('hw', [(375, 500), (500, 333), (300, 1500), (1024, 1366), (500, 375), (333, 500),
                                (512, 512), (1024, 1025), (281, 500), (480, 640), (427, 640), (640, 426),
                                (100, 4000), (2000, 3000), (511, 700), (7, 3)])
def test_mmseg_test_size(hw):
    assert mmseg_test_size(*hw, 512) == _mmseg_rule(*hw, 512)
    assert resize_short(tv_tensors.Image(torch.zeros(3, *hw, dtype=torch.uint8)), None, 512)[0].shape[-2:] == _mmseg_rule(*hw, 512)


def test_mmseg_test_size_rounds_and_is_not_capped():
    assert mmseg_test_size(375, 500, 512) == (512, 683)     # 682.67: torchvision's [512] gives 682
    assert mmseg_test_size(1024, 1025, 512) == (512, 513)   # 512.5 rounds up
    assert mmseg_test_size(300, 1500, 512) == (512, 2560)   # no 2048 cap on the long side


def test_resize_is_plain_bilinear():
    """Half-pixel bilinear, no antialias, enlarging and shrinking: F.interpolate on float input,
    rounded on uint8 input; a hand-computed 1 x 2 -> 2 x 4 case."""
    torch.manual_seed(0)
    ref = lambda x, size: torch.nn.functional.interpolate(x[None].float(), size=size, mode='bilinear',
                                                           align_corners=False, antialias=False)[0]
    for h, w, short in [(9, 13, 20), (9, 13, 4), (13, 9, 5), (8, 8, 3)]:
        x = torch.rand(3, h, w)
        out = resize_short(tv_tensors.Image(x), None, short)[0]
        size = mmseg_test_size(h, w, short)
        assert type(out) is tv_tensors.Image and out.shape[-2:] == size
        assert torch.allclose(out, ref(x, size), atol=1e-5)
        u = (x * 255).round().to(torch.uint8)
        out = resize_short(tv_tensors.Image(u), None, short)[0]
        assert out.dtype == torch.uint8 and torch.equal(out, ref(u, size).round().to(torch.uint8))
        if short < min(h, w):  # the named torchvision option antialiases when shrinking: not the same pixels
            old = resize_short(tv_tensors.Image(x), None, short, resize='torchvision')[0]
            assert old.shape != out.shape or (old - ref(x, size)).abs().max() > 1e-2
    x = tv_tensors.Image(torch.tensor([[[0.0, 10.0]]]))  # (1, 1, 2)
    assert torch.allclose(resize_bilinear(x, (2, 4)), torch.tensor([[0.0, 2.5, 7.5, 10.0]] * 2))
    assert torch.allclose(resize_bilinear(x, (1, 1)), torch.tensor([[5.0]]))


def test_dataset_with_transforms(voc):
    ds = build_dataset('voc', voc, 'val', eval_transform(MEAN, STD, short=12))
    batch = [ds[0], ds[1]]  # eval items differ in size: a list, not a stacked batch
    assert [b['image'].shape for b in batch] == [(3, 12, 16)] * 2 and batch[0]['label'].shape == (H, W)
    ds = build_dataset('voc', voc, 'val', train_transform(MEAN, STD, crop=16, scale=(32, 8)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch['image'].shape == (2, 3, 16, 16) and batch['label'].shape == (2, 16, 16)
    assert batch['path'] == ['JPEGImages/b.jpg', 'JPEGImages/c.jpg']


# ----------------------------------------------------------------------------- mmseg photometric distortion

def _distort(pixel, **ops):
    """PhotoMetricDistortion on a 1 x 1 image with the chosen ops forced on (the others off)."""
    d = PhotoMetricDistortion()
    image = tv_tensors.Image(torch.tensor(pixel, dtype=torch.uint8).view(3, 1, 1))
    return d.apply(image, **ops).flatten().tolist()


def test_photometric_brightness_adds_and_contrast_multiplies():
    assert _distort((20, 20, 20), beta=32) == [52, 52, 52]                        # mmseg adds, no factor
    assert _distort((128, 64, 32), alpha=1.5) == [192, 96, 48]                    # no mean subtracted
    assert _distort((250, 10, 3), beta=10) == [255, 20, 13]                       # clipped at 255
    assert _distort((100, 100, 100), alpha=0.5 + 1 / 256) == [50, 50, 50]         # truncated, not rounded


def test_photometric_hue_moves_by_two_degrees_per_unit():
    red = rgb_to_hsv_cv(torch.tensor([255., 0, 0]).view(3, 1, 1)).flatten().tolist()
    assert red == [0, 255, 255]
    assert _distort((255, 0, 0), hue=30) == [255, 255, 0]                         # +60 degrees: yellow
    assert _distort((255, 0, 0), hue=-30) == [255, 0, 255]                        # -60 degrees (mod 180): magenta
    assert _distort((255, 0, 0), hue=60) == [0, 255, 0]                           # +120 degrees: green
    assert _distort((255, 0, 0), saturation=0.5) == [255, 128, 128]               # S 255 -> 127


def test_photometric_contrast_position_follows_the_coin():
    """Contrast runs second (coin 1) or last (coin 0): contrast clips at 255, so the two orders differ."""
    first = _distort((200, 100, 50), alpha=1.5, hue=30, contrast_first=True)
    last = _distort((200, 100, 50), alpha=1.5, hue=30, contrast_first=False)
    assert first != last
    by_hand_last = _distort(tuple(_distort((200, 100, 50), hue=30)), alpha=1.5)
    assert last == by_hand_last



def test_random_rescale_shrinks_without_antialias():
    """mmseg's training resize is cv2 INTER_LINEAR: plain bilinear, half-pixel centres, no antialiasing."""
    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8))
    label = tv_tensors.Mask(torch.randint(0, 5, (40, 60)))
    out, lab = RandomRescale((60, 40), (0.5, 0.5))(image, label)
    ref = torch.nn.functional.interpolate(image[None].float(), size=(20, 30), mode='bilinear', align_corners=False,
                                          antialias=False)[0].round().to(torch.uint8)
    assert torch.equal(out, ref) and out.dtype == torch.uint8
    assert torch.equal(lab, label[::2, ::2])  # labels: nearest
