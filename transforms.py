"""Train and eval transforms of TagCLIP (DESIGN §8, §15): callables on (image, label), composed with
torchvision.transforms.v2 on tv_tensors so image and label move together, with mmseg 0.24's semantics
(the authors' pipeline): random rescale, cat-max crop, flip, photometric distortion, normalise, pad;
at test time the short side resized as mmseg does.
"""
from functools import partial

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from data import IGNORE_INDEX

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
