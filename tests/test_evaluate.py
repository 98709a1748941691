"""evaluate.py: metrics by hand, batched sliding inference, one text encoding, 2-rank equivalence."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from checkpoint import build_model
import inference
from inference import (class_text, compute_metrics, confusion_matrix, evaluate, load_text_embeddings,
                       slide_inference, upsample_argmax, upsampled, window_grid, window_scores)
from model import TagCLIPConfig, seen_probability, trusty_scores
from runtime import cpu_threads
from tests.conftest import TINY_CLIP

NAMES = ['red thing', 'blue thing', 'green thing']
SEEN = [True, False, True]


class RandomSegSet(torch.utils.data.Dataset):
    """Odd-sized in-memory dataset with the data.py sample interface."""

    def __init__(self, n=5, size=(64, 80)):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, 3, self.size, generator=g)
        label[: 4 + i] = 255
        return {'image': torch.randn(3, *self.size, generator=g), 'label': label, 'path': f'{i}.png'}


def make_model(seed=0):
    torch.manual_seed(seed)
    return build_model(TagCLIPConfig(clip_model='tiny_test_clip', pretrained=None, n_prompts=3, heads=4)).eval()


def test_metrics_by_hand():
    conf = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # class 2: absent from labels and predictions
    m = compute_metrics(conf, NAMES, SEEN)
    assert math.isclose(m['per_class']['red thing']['IoU'], 100 * 5 / 8)
    assert math.isclose(m['per_class']['blue thing']['IoU'], 100 * 3 / 6)
    assert math.isnan(m['per_class']['green thing']['IoU'])  # excluded from every mean
    s = m['summary']
    assert math.isclose(s['mIoU(S)'], 62.5) and math.isclose(s['mIoU(U)'], 50.0)
    assert math.isclose(s['hIoU'], 2 * 62.5 * 50 / 112.5)
    assert math.isclose(s['mIoU'], 56.25) and math.isclose(s['pAcc'], 100 * 8 / 11)
    assert math.isclose(s['mAcc'], 100 * (5 / 6 + 3 / 5) / 2)


def test_confusion_matrix_skips_ignore():
    label = torch.tensor([[0, 1, 255], [2, 2, 1]])
    pred = torch.tensor([[0, 2, 1], [2, 0, 1]])
    conf = confusion_matrix(pred, label, 3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]] and conf.sum() == 5


@pytest.mark.parametrize('h,w', [(64, 112), (100, 64), (64, 64), (40, 70)])
def test_window_grid_covers_every_pixel(h, w):
    cover = torch.zeros(h, w)
    for y1, y2, x1, x2 in window_grid(h, w, 64, 48):
        assert y2 - y1 == min(64, h) and x2 - x1 == min(64, w)
        cover[y1:y2, x1:x2] += 1
    assert (cover > 0).all()


def test_batched_slide_equals_window_loop():
    model, image = make_model(), torch.randn(3, 64, 112)
    text, seen = model.encode_text(NAMES), torch.tensor(SEEN)
    kw = dict(calibration=0.1, trusty_weighting=True, polarity='unseen')
    batched = slide_inference(model, image, text, seen, crop=64, stride=48, chunk=2, **kw)
    total, count = torch.zeros(4, 64, 112), torch.zeros(1, 64, 112)
    with torch.no_grad():
        for y1, y2, x1, x2 in window_grid(64, 112, 64, 48):
            total[:, y1:y2, x1:x2] += window_scores(model, image[None, :, y1:y2, x1:x2], text, seen, **kw)[0]
            count[:, y1:y2, x1:x2] += 1
    assert batched.shape == (4, 64, 112) and (count > 0).all()
    assert torch.allclose(batched, total / count, atol=1e-5)


def stacked_slide(model, image, text, seen, crop, stride, chunk=16, **kw):
    """The slide inference before the running sum: every window, then every window's scores, stacked."""
    _, h, w = image.shape
    boxes = window_grid(h, w, crop, stride)
    windows = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    scores = torch.cat([window_scores(model, windows[i:i + chunk], text, seen, **kw) for i in range(0, len(boxes), chunk)])
    total, count = scores.new_zeros(scores.shape[1], h, w), scores.new_zeros(1, h, w)
    for s, (y1, y2, x1, x2) in zip(scores, boxes):
        total[:, y1:y2, x1:x2] += s
        count[:, y1:y2, x1:x2] += 1
    return total / count


@pytest.mark.parametrize('weighting', [True, False])
def test_window_scores_in_place_equal_trusty_scores(weighting):
    """Eq. 12 in place, a block of classes at a time, gives model.trusty_scores' numbers bit for bit."""
    torch.manual_seed(0)
    model, C = make_model(), 150  # three class blocks
    text, seen = F.normalize(torch.randn(C, 32), dim=-1), torch.rand(C) < 0.7
    windows = torch.randn(2, 3, 64, 56)
    got = window_scores(model, windows, text, seen, calibration=0.1, trusty_weighting=weighting)
    logits = F.interpolate(model(F.pad(windows, (0, 8, 0, 0)), text)['pred_masks'], size=(64, 64), mode='bilinear')
    logits = logits[..., :64, :56]
    want = torch.cat([trusty_scores(logits, seen, 0.1, weighting), seen_probability(logits[:, C:])], 1)
    assert got.shape == (2, C + 1, 64, 56) and torch.equal(got, want)


def test_running_sum_equals_stacked_windows(monkeypatch):
    """Windows a batch at a time into a running sum: the stacked result bit for bit, with batches of
    at most `chunk` windows, and fewer when their scores would pass WINDOW_BYTES."""
    model, image = make_model(), torch.randn(3, 50, 123)  # 2 x 4 windows of 40, stride 29
    text, seen = model.encode_text(NAMES), torch.tensor(SEEN)
    kw = dict(calibration=0.1, trusty_weighting=True, polarity='unseen')
    batches = []
    monkeypatch.setattr(inference, 'window_scores', lambda m, x, *a, **k: batches.append(len(x)) or window_scores(m, x, *a, **k))
    with torch.no_grad():
        old = stacked_slide(model, image, text, seen, 40, 29, chunk=3, **kw)
    new = slide_inference(model, image, text, seen, crop=40, stride=29, chunk=3, **kw)
    assert len(window_grid(50, 123, 40, 29)) == 8 and batches == [3, 3, 2] and torch.equal(new, old)
    monkeypatch.setattr(inference, 'WINDOW_BYTES', 2 * 4 * 4 * 40 * 40)  # two windows of 3 classes + A
    batches.clear()
    assert torch.allclose(slide_inference(model, image, text, seen, crop=40, stride=29, chunk=3, **kw), old, atol=1e-6)
    assert batches == [2] * 4


def old_upsample_argmax(scores, C, size, chunk=32):
    """upsample_argmax before the tiles: (chunk, H, W) frames of 32 classes, then A alone."""
    up = lambda s: F.interpolate(s[None], size=tuple(size), mode='bilinear', align_corners=False)[0]
    best, label = torch.full(tuple(size), -float('inf')), torch.zeros(tuple(size), dtype=torch.long)
    for i in range(0, C, chunk):
        v, j = up(scores[i:min(i + chunk, C)]).max(0)
        better = v > best
        best, label = torch.where(better, v, best), torch.where(better, j + i, label)
    return label, (up(scores[C:])[0] if scores.shape[0] > C else None)


@pytest.mark.parametrize('c,h,w,H,W', [(27, 37, 53, 301, 443), (35, 64, 85, 481, 97), (5, 64, 64, 1000, 7),
                                       (6, 3, 512, 11, 1003), (9, 64, 900, 48, 1320), (4, 20, 30, 300, 5),
                                       (27, 64, 85, 40, 50), (172, 17, 23, 131, 197)])
def test_tiled_upsample_argmax_equals_full(c, h, w, H, W):
    """Resized and reduced piece by piece within a small budget: the labels and A of the full-size
    resize bit for bit, on odd sizes, enlarging and shrinking, with ties (equal classes keep the lower
    index); the pieces are many and small. Outputs of H + W <= 128 px (PyTorch's separable kernel,
    whose last bits depend on the channel grouping) equal the old chunking's."""
    g = torch.Generator().manual_seed(c + H)
    scores = torch.randn(c, h, w, generator=g)
    scores[:, : h // 3] = scores[0, : h // 3]  # a band of ties across all classes
    budget = 8 * H * W  # two channels' worth: whole frames do not fit
    label, A = upsample_argmax(scores, c - 1, (H, W), budget)
    if H + W > 128:
        full = F.interpolate(scores[None], size=(H, W), mode='bilinear', align_corners=False)[0]
        expected, expected_A = full[:c - 1].argmax(0), full[c - 1]
        pieces = [u.numel() for *_, u in upsampled(scores, (H, W), budget)]
        assert len(pieces) > 1 and max(pieces) * 4 <= max(budget, 4 * H * max(1, 129 - H))
        assert (label[: H * (h // 3 - 1) // h] == 0).all()  # ties: the lowest index
    else:
        expected, expected_A = old_upsample_argmax(scores, c - 1, (H, W))
    assert label.dtype == torch.uint8 and torch.equal(label.long(), expected) and torch.equal(A, expected_A)


def test_extra_prompts_fold_into_their_class():
    """prompt_class: a fourth prompt that counts as class 2 (as CAT-Seg's extra PAS-20b names count as
    background) gives the 4-prompt confusion matrix with its column added to class 2's."""
    model = make_model()
    names = NAMES + ['grey thing']
    text = model.encode_text(names)
    four = evaluate(model, RandomSegSet(), names, SEEN + [True], text=text, crop=64, stride=48, progress=False)
    folded = evaluate(model, RandomSegSet(), NAMES, SEEN, text=text, prompt_class=[0, 1, 2, 2], crop=64, stride=48,
                      progress=False)
    c = torch.tensor(four['confusion'])
    want = c[:3, :3].clone()
    want[:, 2] += c[:3, 3]
    assert c[:, 3].sum() > 0 and c[3].sum() == 0  # the fourth prompt is predicted; no label is class 3
    assert folded['confusion'] == want.tolist()


def test_text_encoded_once_per_evaluation():
    model = make_model()
    calls = []
    encode = model.encode_text
    model.encode_text = lambda *a, **k: calls.append(1) or encode(*a, **k)
    m = evaluate(model, RandomSegSet(), NAMES, SEEN, crop=64, stride=48, progress=False)
    assert len(calls) == 1
    labelled = sum((RandomSegSet()[i]['label'] != 255).sum().item() for i in range(5))
    assert sum(map(sum, m['confusion'])) == labelled  # every labelled pixel counted exactly once


def test_given_text_is_used():
    model = make_model()
    default = evaluate(model, RandomSegSet(), NAMES, SEEN, crop=64, stride=48, progress=False)
    given = evaluate(model, RandomSegSet(), NAMES, SEEN, crop=64, stride=48, progress=False,
                     text=model.encode_text(NAMES))
    assert given['confusion'] == default['confusion']
    flipped = evaluate(model, RandomSegSet(), NAMES, SEEN, crop=64, stride=48, progress=False,
                       text=model.encode_text(NAMES).flip(0))
    assert flipped['confusion'] != default['confusion']


def test_text_embeddings_file(tmp_path, capsys):
    """A user's .npy: fp16 rows used exactly as given; unnormalised rows normalised with a note;
    every bad file a one-line error naming it."""
    model = make_model()
    fp16 = model.encode_text(NAMES, precision='fp16')                     # (3, 32), fp16 values
    path = tmp_path / 'voc_single.npy'
    np.save(path, fp16.numpy().astype(np.float16))
    got = class_text(model, NAMES, path=path)
    assert got.dtype == torch.float32 and torch.equal(got, fp16) and 'note' not in capsys.readouterr().out
    np.save(path, 3 * fp16.numpy())
    assert torch.allclose(load_text_embeddings(path, NAMES, 32), F.normalize(fp16, dim=-1), atol=1e-6)
    assert f'note: {path}: rows not L2-normalised' in capsys.readouterr().out
    bad = {'rows.npy': np.ones((4, 32), np.float32), 'width.npy': np.ones((3, 16), np.float32),
           'ints.npy': np.ones((3, 32), np.int64), 'flat.npy': np.ones(96, np.float32),
           'nan.npy': np.full((3, 32), np.nan, np.float32), 'zero.npy': np.zeros((3, 32), np.float32)}
    for name, arr in bad.items():
        np.save(tmp_path / name, arr)
    np.save(tmp_path / 'obj.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / 'arch.npz', fp16.numpy())
    (tmp_path / 'text.npy').write_text('not numpy\n')
    cases = {'rows.npy': r'shape \(4, 32\), expected \(3, 32\)', 'width.npy': r'shape \(3, 16\), expected \(3, 32\)',
             'ints.npy': 'int64 .* expected a float', 'flat.npy': r'\(96,\), expected a float \(C, d\)',
             'nan.npy': 'NaN, inf or all zeros', 'zero.npy': 'NaN, inf or all zeros', 'obj.npy': 'not a .npy array',
             'arch.npz': 'an .npz archive', 'text.npy': 'not a .npy array', 'missing.npy': 'No such file'}
    for name, message in cases.items():
        with pytest.raises(SystemExit, match=message) as e:
            load_text_embeddings(tmp_path / name, NAMES, 32)
        assert str(tmp_path / name) in e.value.code and '\n' not in e.value.code, name


def test_trusty_map_accuracy_counts_pixels():
    model = make_model()
    data = RandomSegSet(n=2)
    m = evaluate(model, data, NAMES, SEEN, crop=64, stride=48, progress=False)['summary']
    text, seen = model.encode_text(NAMES), torch.tensor(SEEN)
    right = {True: [0, 0], False: [0, 0]}  # seen / unseen class pixel -> [A right, pixels]
    for i in range(2):
        A = slide_inference(model, data[i]['image'], text, seen, 64, 48)[3]  # (H, W), P(seen)
        for a, y in zip(A.flatten().tolist(), data[i]['label'].flatten().tolist()):
            if y != 255:
                right[SEEN[y]][0] += (a > 0.5) == SEEN[y]
                right[SEEN[y]][1] += 1
    assert math.isclose(m['A-right(S)'], 100 * right[True][0] / right[True][1], rel_tol=1e-9)
    assert math.isclose(m['A-right(U)'], 100 * right[False][0] / right[False][1], rel_tol=1e-9)
    model.trusty_token = None  # no trusty channel: no trusty-map columns
    assert 'A-right(S)' not in evaluate(model, data, NAMES, SEEN, crop=64, stride=48, progress=False)['summary']


def test_cpu_threads_leave_the_workers_their_cores(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert [cpu_threads(w) for w in (0, 2, 7, 12)] == [8, 6, 1, 1]
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')  # four processes share the node's cores
    assert [cpu_threads(w) for w in (0, 1, 4)] == [2, 1, 1]


def _worker(rank, init_file, out_file, cfg_file):
    import open_clip
    open_clip.add_model_config(cfg_file)
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    m = evaluate(make_model(), RandomSegSet(), NAMES, SEEN, crop=64, stride=48, progress=False)
    if rank == 0:
        with open(out_file, 'w') as f:
            json.dump(m['confusion'], f)
    dist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path):
    cfg_file = tmp_path / 'tiny_test_clip.json'
    cfg_file.write_text(json.dumps(TINY_CLIP))
    out = tmp_path / 'conf.json'
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(out), str(cfg_file)), nprocs=2, join=True)
    single = evaluate(make_model(), RandomSegSet(), NAMES, SEEN, crop=64, stride=48, progress=False)
    assert json.loads(out.read_text()) == single['confusion']


def test_metrics_json_is_strict(tmp_path, monkeypatch):
    """evaluate.py --out writes null, never a bare NaN, for the IoU a class absent from labels and
    predictions does not have."""
    import evaluate
    conf = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    metrics = {**compute_metrics(conf, NAMES, [True, True, False]), 'confusion': conf.tolist()}  # no unseen class
    monkeypatch.setattr(evaluate, 'evaluate_checkpoint', lambda *a, **k: metrics)
    monkeypatch.setattr('sys.argv', ['evaluate.py', '--checkpoint', 'x.pt', '--out', str(tmp_path / 'm.json')])
    evaluate.main()
    text = (tmp_path / 'm.json').read_text()
    m = json.loads(text, parse_constant=lambda c: pytest.fail(f'non-JSON constant {c}'))
    assert m['per_class']['green thing'] == {'IoU': None, 'Acc': None, 'seen': False}
    assert m['summary']['mIoU(U)'] is None and m['summary']['hIoU'] is None
    assert m['summary']['mIoU'] == pytest.approx(56.25) and 'confusion' not in m
    assert 'NaN' not in text and not list(tmp_path.glob('*.tmp'))
