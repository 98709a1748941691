"""The open-vocabulary benchmark suite (evaluate.py --suite) on tiny trees of every layout, 16-bit
labels, the text-embedding cache, and a dataset of one's own (--dataset folder)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import infer
import train
from checkpoint import build_model, make_checkpoint, save_checkpoint
from data import DATASETS, SUITE, TOY_CLASSES, TOY_UNSEEN, DatasetError, build_dataset
from model import TagCLIPConfig

H, W = 48, 64


def write(path, array):
    """An image (H, W, 3) uint8 or a label (H, W) uint8 / uint16 (PNG or TIFF by the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def photo(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def label(values, dtype=np.uint8):
    """A label whose rows cycle through `values`."""
    return np.array(values, dtype=dtype)[np.arange(H) % len(values)][:, None].repeat(W, 1)


@pytest.fixture(scope='module')
def suite_root(tmp_path_factory):
    """Every benchmark layout but PC-60's, two images each."""
    root = tmp_path_factory.mktemp('datasets')
    ade, full = root / 'ADEChallengeData2016', root / 'ADE20K_2021_17_01'
    voc10, voc12 = root / 'VOCdevkit' / 'VOC2010', root / 'VOCdevkit' / 'VOC2012'
    for i in range(2):
        write(ade / 'images' / 'validation' / f'ADE_val_{i}.jpg', photo(i))
        write(ade / 'annotations' / 'validation' / f'ADE_val_{i}.png', label([0, 1, 150]))  # raw: 0 = other
        write(full / 'images_detectron2' / 'validation' / f'ADE_val_{i}.jpg', photo(i))
        write(full / 'annotations_detectron2' / 'validation' / f'ADE_val_{i}.tif', label([0, 300, 846, 65535], np.uint16))
        write(voc10 / 'JPEGImages' / f'2008_00000{i}.jpg', photo(i))
        write(voc10 / 'annotations_detectron2' / 'pc459_val' / f'2008_00000{i}.tif', label([458, 255, 256], np.uint16))
        write(voc10 / 'annotations_detectron2' / 'pc59_val' / f'2008_00000{i}.png', label([0, 58, 255]))
        write(voc12 / 'JPEGImages' / f'2007_00000{i}.jpg', photo(i))
        write(voc12 / 'annotations_detectron2' / 'val' / f'2007_00000{i}.png', label([0, 19, 255]))
        write(voc12 / 'annotations_detectron2_bg' / 'val' / f'2007_00000{i}.png', label([0, 20, 255]))
    return root


@pytest.fixture(scope='module')
def toy_checkpoint(tmp_path_factory):
    """An untrained toy-world model on the tiny CLIP, stored with its CLIP."""
    torch.manual_seed(0)
    model = build_model(TagCLIPConfig(clip_model='tiny_test_clip', pretrained=None, n_prompts=2, heads=4))
    seen = [c for c in TOY_CLASSES if c not in TOY_UNSEEN]
    path = tmp_path_factory.mktemp('ckpt') / 'toy.pt'
    save_checkpoint(path, make_checkpoint(model, {'dataset': 'toy', 'names': list(TOY_CLASSES), 'seen': seen,
                                                  'unseen': list(TOY_UNSEEN)}, 'inductive', 'unseen',
                                          {'data_root': None}, store_clip=True))
    return path


def test_class_lists():
    sizes = {bench: len(DATASETS[name].classes) for bench, name in SUITE.items()}
    assert sizes == {'a847': 847, 'pc459': 459, 'a150': 150, 'pc59': 59, 'pc60': 60, 'pas20': 20, 'pas20b': 21}
    assert DATASETS['ade847'].classes[1] == 'building, edifice' and DATASETS['ade847'].prompt_names[1] == 'building'
    assert DATASETS['voc20b'].classes[-1] == 'background' and not any(DATASETS[n].unseen for n in SUITE.values())


def test_layouts_read_every_label_value(suite_root):
    """16-bit values above 255 survive, each ignore value becomes its dataset's, raw ids are remapped."""
    rows = lambda name: build_dataset(name, suite_root, 'val')[0]['label'][:4, 0].tolist()
    assert rows('ade847') == [0, 300, 846, 65535]
    assert rows('pc459') == [458, 255, 256, 458]      # 255 is a class of PC-459
    assert rows('ade150') == [255, 0, 149, 255]       # raw 0 = other -> ignore, 1..150 -> 0..149
    assert rows('context59') == [0, 58, 255, 0]
    assert rows('voc20') == [0, 19, 255, 0] and rows('voc20b') == [0, 20, 255, 0]
    assert len(build_dataset('ade847', suite_root, 'val')) == 2


def test_a_16bit_value_beyond_the_classes_is_named(tmp_path):
    root = tmp_path / 'ADE20K_2021_17_01'
    write(root / 'images_detectron2' / 'validation' / 'a.jpg', photo(0))
    write(root / 'annotations_detectron2' / 'validation' / 'a.tif', label([3, 900], np.uint16))
    with pytest.raises(DatasetError, match=r'a\.tif: label values \[900\] outside the valid raw values 0\.\.846, 65535'):
        build_dataset('ade847', tmp_path, 'val')[0]


def test_suite_command_one_table(suite_root, toy_checkpoint, tmp_path, monkeypatch, capsys):
    """Every benchmark found is evaluated, PC-60 (not there) is skipped with one line; a table and strict JSON."""
    out = tmp_path / 'suite.json'
    monkeypatch.setattr(sys, 'argv', ['evaluate.py', '--checkpoint', str(toy_checkpoint), '--suite', 'all',
                                      '--data-root', str(suite_root), '--crop', '64', '--short', '48',
                                      '--workers', '0', '--text-cache', str(tmp_path / 'cache'), '--out', str(out)])
    evaluate.main()
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith('pc60: skipped:') for line in lines) == 1
    table = {line.split()[0]: line.split() for line in lines[lines.index(next(l for l in lines if l.startswith('benchmark'))):]}
    assert [table[b][2] for b in ('a847', 'pc459', 'a150', 'pc59', 'pas20', 'pas20b')] == ['847', '459', '150', '59', '20', '21']
    assert table['pc60'][2] == 'skipped:' and table['a150'][5:] == ['-', '-', '-']  # no split: every class unseen
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f'non-JSON constant {c}'))
    assert result['suite']['a847']['classes'] == 847 and 'skipped' in result['suite']['pc60']
    assert 0 <= result['suite']['a847']['mIoU'] <= 100 and len(result['per_class']['pc459']) == 459
    assert len(list((tmp_path / 'cache').glob('*.npy'))) == 6  # one text embedding per benchmark


def test_text_cache_is_found_again(suite_root, toy_checkpoint, tmp_path, monkeypatch):
    flags = dict(suite='a847', data_root=str(suite_root), crop=64, short=48, workers=0, progress=False,
                 text_cache=str(tmp_path / 'cache'))
    first = evaluate.evaluate_checkpoint(toy_checkpoint, **flags)
    import model as model_py
    monkeypatch.setattr(model_py.TagCLIP, 'encode_text', lambda *a, **k: pytest.fail('not cached'))
    again = evaluate.evaluate_checkpoint(toy_checkpoint, **flags)
    assert first['a847']['confusion'] == again['a847']['confusion']
    with pytest.raises(BaseException, match='not cached'):  # another template set is another key
        evaluate.evaluate_checkpoint(toy_checkpoint, **flags, templates='single')


# ----------------------------------------------------------------------------- a dataset of one's own

def folder_tree(root, n_classes=3, sixteen_bit=False):
    (root / 'classes.txt').parent.mkdir(parents=True, exist_ok=True)
    (root / 'classes.txt').write_text('\n'.join(f'thing {i}' for i in range(n_classes)) + '\n')
    (root / 'unseen.txt').write_text('thing 2\n')
    for split, n in (('train', 4), ('val', 2)):
        for i in range(n):
            write(root / 'images' / split / f'{i}.jpg', photo(i))
            values = [0, 1, 2, 255] if not sixteen_bit else [0, 1, 2, 65535]
            write(root / 'labels' / split / f'{i}.png', label(values, np.uint16 if sixteen_bit else np.uint8))
    return root


def test_folder_dataset_train_evaluate_infer(tmp_path):
    root = folder_tree(tmp_path / 'mine')
    out = tmp_path / 'run'
    metrics = train.main(['--dataset', 'folder', '--data-root', str(root), '--clip-model', 'tiny_test_clip',
                          '--pretrained', 'none', '--n-prompts', '2', '--heads', '4', '--workers', '0', '--crop', '64',
                          '--out-dir', str(out), '--batch-size', '2', '--iters', '2', '--warmup', '1'])
    assert list(metrics['per_class']) == ['thing 0', 'thing 1', 'thing 2']
    assert [m['seen'] for m in metrics['per_class'].values()] == [True, True, False]
    again = evaluate.evaluate_checkpoint(out / 'last.pt', crop=64, workers=0, progress=False, text_cache='')
    assert again['confusion'] == metrics['confusion']  # the checkpoint names its dataset and folder
    infer.main(['--checkpoint', str(out / 'last.pt'), '--input', str(root / 'images' / 'val'),
                '--output', str(tmp_path / 'masks'), '--crop', '64', '--text-cache', ''])
    assert len(list((tmp_path / 'masks').rglob('*.png'))) >= 2


def test_folder_16bit_labels(tmp_path):
    root = folder_tree(tmp_path / 'many', n_classes=300, sixteen_bit=True)
    assert build_dataset('folder', root, 'val')[0]['label'][:4, 0].tolist() == [0, 1, 2, 65535]
    with pytest.raises(SystemExit, match='300 classes; training takes fewer than 255'):
        train.main(['--dataset', 'folder', '--data-root', str(root), '--clip-model', 'tiny_test_clip',
                    '--pretrained', 'none', '--out-dir', str(tmp_path / 'r'), '--workers', '0'])


@pytest.mark.parametrize('fault, message', [
    ('value', r'labels/val/1\.png: label values \[7\] outside the valid raw values 0\.\.2, 255'),
    ('missing', r'labels/train/3\.png: listed but not found \(1 of the 8'),
    ('size', r'labels/train/0\.png: label size 64x40 differs from image .*0\.jpg size 64x48'),
    ('classes', r'classes\.txt: duplicate class names thing 1'),
])
def test_folder_faults_are_one_line(tmp_path, fault, message):
    root = folder_tree(tmp_path / 'bad')
    if fault == 'value':
        write(root / 'labels' / 'val' / '1.png', label([0, 7]))
    elif fault == 'missing':
        (root / 'labels' / 'train' / '3.png').unlink()
    elif fault == 'size':
        write(root / 'labels' / 'train' / '0.png', label([0, 1])[:40])
    else:
        (root / 'classes.txt').write_text('thing 0\nthing 1\nthing 1\n')
    with pytest.raises(SystemExit, match=message):
        train.main(['--dataset', 'folder', '--data-root', str(root), '--clip-model', 'tiny_test_clip',
                    '--pretrained', 'none', '--n-prompts', '2', '--heads', '4', '--workers', '0', '--crop', '64',
                    '--out-dir', str(tmp_path / 'r'), '--batch-size', '2', '--iters', '2', '--warmup', '1'])
