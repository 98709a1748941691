"""Tests of the toy world (toy.py): renderer, cached world on disk, tiny CLIP checkpoint."""
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import toy
from data import DATASETS


def _render(n, seed, **kw):
    return toy.render(n, generator=torch.Generator().manual_seed(seed), **kw)


def test_render_is_deterministic_and_well_formed():
    images, labels, objects = _render(300, 0)
    again = _render(300, 0)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1]) and torch.equal(objects, again[2])
    assert not torch.equal(images, _render(300, 1)[0])
    assert images.shape == (300, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.shape == (300, 64, 64) and labels.dtype == torch.uint8
    values = set(labels.unique().tolist())
    assert values == set(range(25)) | {255}  # every class appears, nothing else but background
    assert 0.5 < (labels == 255).float().mean() < 0.95
    for i in range(50):  # listed objects are in the label map; unlisted ones are slivers (< 1%)
        present, listed = set(labels[i].unique().tolist()) - {255}, set(objects[i][objects[i] >= 0].tolist())
        assert listed and listed <= present
        assert all((labels[i] == c).sum() < 41 for c in present - listed)


def test_render_class_index_is_colour_times_5_plus_pattern():
    # red solid, red striped, green barred, purple dotted: 10 single-object images each
    classes = torch.tensor([0, 1, 7, 24]).repeat_interleave(10)[:, None]
    images, labels, objects = _render(40, 0, max_objects=1, classes=classes)
    assert torch.equal(objects[:, 0], classes[:, 0])
    assert torch.equal(labels.flatten(1).min(1).values.long(), classes[:, 0])  # 1 object + background
    rgb = lambda c: images.permute(0, 2, 3, 1)[labels == c].float().mean(0)  # mean colour of class c pixels
    assert rgb(0).argmax() == 0 and rgb(7).argmax() == 1 and rgb(24)[2] > rgb(24)[1]  # red, green, purple
    x = images.float()

    def spread(c):  # mean per-image, per-channel pixel std inside class c
        return torch.stack([x[i][:, labels[i] == c].std(1).mean() for i in range(40) if objects[i, 0] == c]
                           ).mean()

    def change(c, dim):  # mean absolute step between neighbours along dim, inside class c
        m = labels == c
        step = x.diff(dim=dim).abs().mean(1)  # (B, H-1, W) or (B, H, W-1)
        return step[m.narrow(dim - 1, 1, 63) & m.narrow(dim - 1, 0, 63)].mean()

    assert spread(0) < 15 < min(spread(1), spread(7))  # solid is flat: pixel noise only
    assert change(1, 3) > 2 * change(1, 2)  # striped: vertical stripes, changes along x
    assert change(7, 2) > 2 * change(7, 3)  # barred: horizontal bars, changes along y


def test_generate_world_layout_and_cache(tmp_path):
    root = toy.generate_world(tmp_path / 'toy', n_train=20, n_val=10)
    for split, n in (('train', 20), ('val', 10)):
        images = sorted((root / 'images' / split).glob('*.png'))
        labels = sorted((root / 'annotations' / split).glob('*.png'))
        assert [p.name for p in images] == [p.name for p in labels] == [f'{i:05d}.png' for i in range(n)]
    image, label = Image.open(images[3]), Image.open(labels[3])
    assert image.mode == 'RGB' and label.mode == 'L' and image.size == label.size == (64, 64)
    assert set(np.unique(np.asarray(label))) <= set(range(25)) | {255}
    assert json.loads((root / 'world.json').read_text())['n_train'] == 20
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob('*')}
    toy.generate_world(root, n_train=20, n_val=10)  # cache hit: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob('*')} == mtimes
    toy.generate_world(root, n_train=20, n_val=5)  # other parameters: regenerated
    assert len(list((root / 'images' / 'val').glob('*.png'))) == 5
    assert not (root / '.tmp_world').exists()


def test_tokenizer_context_length():
    toy.register_clip()
    toy.register_clip()  # idempotent
    assert open_clip.get_tokenizer('toy_clip')(['a photo of a red solid']).shape == (1, 20)


def test_pretrain_checkpoint_loads_and_zero_shot(tmp_path):
    path = toy.pretrain_clip(tmp_path / 'clip.pt', steps=3, batch=16)
    model = open_clip.create_model('toy_clip', pretrained=str(path))
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    mtime = path.stat().st_mtime_ns
    toy.pretrain_clip(path, steps=3, batch=16)  # cache hit
    assert path.stat().st_mtime_ns == mtime
    acc = toy.zero_shot_accuracy(model, open_clip.get_tokenizer('toy_clip'), n_per_class=2)
    assert set(acc) == {'seen', 'unseen', 'all', 'per_class'}
    assert ['background'] + list(acc['per_class']) == ['background'] + toy.class_names() == list(DATASETS['toy'].classes)
    assert all(0 <= acc[k] <= 1 for k in ('seen', 'unseen', 'all'))
    assert acc['all'] == pytest.approx(np.mean(list(acc['per_class'].values())))
