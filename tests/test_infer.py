"""infer.py: a folder of odd images (sizes, modes, EXIF, 16 bit, corrupt files) -> label maps, overlays,
summary; restart does no model work; arbitrary vocabularies; the geometry is evaluate.py's."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import infer
import train
from torchvision import tv_tensors

from checkpoint import load_model
from transforms import eval_transform
from inference import image_scores, predict
from tests.conftest import TINY_CLIP
from toy import generate_world

REPO = Path(__file__).resolve().parents[1]
# input file -> (W, H) as displayed (EXIF orientation applied)
GOOD = {'rotated.jpg': (70, 90), 'grey.png': (50, 40), 'cmyk.jpg': (40, 30), 'palette.gif': (45, 36),
        'sub/alpha.png': (64, 64), 'sub/deep/gradient16.png': (33, 47)}
BAD = {'broken.jpg', 'notes.txt'}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The tiny model is faster on one thread, and much faster when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """A 1-step toy-world checkpoint written by train.py. Its frozen CLIP is conftest's tiny one, saved
    to a file: the weights a checkpoint does not hold must be the same in every process."""
    root, out = tmp_path_factory.mktemp('toy'), tmp_path_factory.mktemp('run')
    torch.manual_seed(0)
    torch.save(open_clip.create_model('tiny_test_clip').state_dict(), out / 'clip.pt')
    generate_world(root, n_train=4, n_val=1, seed=0)
    train.main(['--dataset', 'toy', '--data-root', str(root), '--toy-images', '4', '1', '--clip-model', 'tiny_test_clip',
                '--pretrained', str(out / 'clip.pt'), '--n-prompts', '2', '--heads', '4', '--workers', '0',
                '--out-dir', str(out), '--batch-size', '2', '--iters', '1', '--warmup', '1', '--no-eval'])
    torch.set_num_threads(1)  # train.py sets the threads to the cores: back to one_thread's
    return out / 'last.pt'


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp('photos')
    (d / 'sub' / 'deep').mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display, so 90 x 70 stored is 70 x 90 shown
    rgb(90, 70).save(d / 'rotated.jpg', exif=exif)
    rgb(50, 40).convert('L').save(d / 'grey.png')
    rgb(40, 30).convert('CMYK').save(d / 'cmyk.jpg')
    rgb(45, 36).convert('P').save(d / 'palette.gif')
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)).save(d / 'sub' / 'alpha.png')
    Image.fromarray(np.linspace(0, 65535, 47 * 33).reshape(47, 33).astype(np.uint16)).save(d / 'sub' / 'deep' / 'gradient16.png')
    jpeg = io.BytesIO()
    rgb(80, 60).save(jpeg, 'JPEG')
    (d / 'broken.jpg').write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / 'notes.txt').write_text('not an image\n')
    return d


def run(ckpt, photos, out, *extra):
    return infer.main(['--checkpoint', str(ckpt), '--input', str(photos), '--output', str(out), *extra])


def peak_rss_mb(fn):
    """fn() and how far above the resident memory before it the process's peak went (MB): the peak
    (VmHWM) is reset to the current resident size first (Linux: /proc/self/clear_refs)."""
    status = lambda key: int(next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(key)).split()[1])
    Path('/proc/self/clear_refs').write_text('5')
    before = status('VmRSS:')
    result = fn()
    return result, (status('VmHWM:') - before) // 1024


@pytest.fixture(scope='module')
def first(ckpt, photos, tmp_path_factory):
    """infer.py run as a script (its exit code: 0 despite the two bad files), the tiny CLIP registered first."""
    out, cfg = tmp_path_factory.mktemp('out'), tmp_path_factory.mktemp('cfg') / 'tiny_test_clip.json'
    cfg.write_text(json.dumps(TINY_CLIP))
    script = ("import runpy, sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
              "sys.argv = ['infer.py'] + sys.argv[2:]; runpy.run_path('infer.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, '-c', script, str(cfg), '--checkpoint', str(ckpt), '--input', str(photos),
                           '--output', str(out)], cwd=REPO, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return out, proc


def test_folder_of_odd_images(first):
    out, proc = first
    assert proc.returncode == 0, proc.stderr
    skips = [l for l in proc.stderr.splitlines() if l.startswith('skip ')]
    assert sorted(l.split(':')[0].rsplit('/', 1)[1] for l in skips) == sorted(BAD)  # one line per bad file
    summary = json.loads((out / 'summary.json').read_text())
    assert {s['file'] for s in summary['skipped']} == BAD
    assert set(summary['images']) == set(GOOD) and summary['processed'] == len(GOOD)
    C = len(summary['vocabulary'])
    assert C == 26 and sum(not v['seen'] for v in summary['vocabulary']) == 6  # the toy's unseen classes
    for rel, size in GOOD.items():
        label = Image.open(out / f'{rel}.label.png')
        assert label.mode == 'P' and label.size == size, rel
        values = np.asarray(label)
        assert values.max() < C
        assert Image.open(out / f'{rel}.overlay.jpg').size[1] >= size[1]
        fr = summary['images'][rel]['fractions']
        assert sum(fr.values()) == pytest.approx(1, abs=1e-4)
        names = [v['name'] for v in summary['vocabulary']]
        assert fr == pytest.approx({names[k]: (values == k).mean() for k in np.unique(values)}, abs=1e-6)
    assert not list(out.rglob('*.tmp'))


def huge_images(d, photos):
    """Files that stopped a run or took gigabytes, each a few KB, beside two ordinary ones."""
    d.mkdir()
    for name in ('grey.png', 'rotated.jpg'):
        (d / name).write_bytes((photos / name).read_bytes())
    stripes = np.arange(66000) // 300 % 2 * 255
    Image.fromarray(np.tile(stripes.astype(np.uint8), (48, 1))).save(d / 'wide.png')  # overlay beyond JPEG
    bits = Image.new('1', (8000, 8000))
    bits.paste(1, (1000, 2000, 5000, 7000))
    bits.save(d / 'bits.png')                                                           # 64 MP
    Image.new('RGB', (12096, 1), 'gray').save(d / 'strip.bmp')                       # 16 x 193536 at short side 16
    small = io.BytesIO()
    Image.new('RGB', (16, 16), 'red').save(small, 'JPEG')
    jpeg = bytearray(small.getvalue())
    sof = jpeg.index(b'\xff\xc0')
    jpeg[sof + 5:sof + 9] = (9000).to_bytes(2, 'big') * 2                              # the header claims 9000 x 9000
    (d / 'claims.jpg').write_bytes(bytes(jpeg))


@pytest.mark.skipif(not Path('/proc/self/clear_refs').exists(), reason='measures memory through Linux /proc')
def test_huge_images_within_budget(ckpt, photos, tmp_path, capsys):
    """A 66000 x 48 PNG (its overlay is wider than JPEG allows: written as PNG, and said so), an 8000 x
    8000 1-bit PNG and a JPEG claiming 9000 x 9000 (over --max-pixels: skipped from the header), a
    12096 x 1 BMP (its scores at the inference size over --max-score-gb: skipped), beside ordinary
    images: the run goes on, no partial outputs, its peak memory less than 500 MB above where it started
    (~250 MB here; the 1-bit PNG alone took 4.7 GB, then the wide one ended the run). A rerun finds the finished
    ones, the PNG overlay among them; with --downscale the 1-bit PNG is shrunk to --max-pixels and
    the strip inferred at a smaller size."""
    huge_images(tmp_path / 'in', photos)
    out, flags = tmp_path / 'out', ['--short', '16', '--max-score-gb', '0.1', '--save-trusty']  # budgets of a test's size
    summary, peak = peak_rss_mb(lambda: run(ckpt, tmp_path / 'in', out, *flags))
    reasons = {s['file']: s['reason'] for s in summary['skipped']}
    assert reasons == {'bits.png': '8000 x 8000 = 64.0 MP, over --max-pixels 40 MP (--downscale shrinks it)',
                       'claims.jpg': '9000 x 9000 = 81.0 MP, over --max-pixels 40 MP (--downscale shrinks it)',
                       'strip.bmp': 'at the inference size 193536 x 16 px (short side 16) its 27 score maps would take '
                                    '0.3 GB, over --max-score-gb 0.1 (--downscale infers at a smaller size)'}
    assert set(summary['images']) == {'grey.png', 'rotated.jpg', 'wide.png'} and peak < 500, peak
    wide = summary['images']['wide.png']
    assert wide['overlay'] == 'wide.png.overlay.png' and "over JPEG's 65,500 px: written as PNG" in wide['notes'][0]
    assert f'note {tmp_path}/in/wide.png: overlay' in capsys.readouterr().err and Image.open(out / 'wide.png.overlay.png').width > 65500
    assert np.asarray(Image.open(out / 'wide.png.label.png')).shape == (48, 66000)
    written = {p.name for p in out.iterdir()} - {'summary.json'}
    assert written == {f'{name}.{tag}' for name in summary['images'] for tag in ('label.png', 'trusty.png')} | {
        'grey.png.overlay.jpg', 'rotated.jpg.overlay.jpg', 'wide.png.overlay.png'}  # nothing of the skipped ones
    summary, peak = peak_rss_mb(lambda: run(ckpt, tmp_path / 'in', out, *flags, '--downscale', '--max-pixels', '1e6',
                                            '--max-score-gb', '0.01'))
    assert peak < 500, peak
    assert summary['up_to_date'] == 3 and summary['processed'] == 3 and summary['images']['wide.png'] == wide
    for name, side in (('bits.png', 8000), ('claims.jpg', 9000)):  # the JPEG decoded at 1/8 scale, libjpeg filling in
        assert Image.open(out / f'{name}.label.png').size == (1000, 1000)
        assert summary['images'][name]['notes'] == [f'shrunk from {side} x {side} to 1000 x 1000 px to fit --max-pixels 1 MP; '
                                                    'outputs at that size']
    assert summary['images']['strip.bmp']['notes'] == ['inferred at 24192 x 2 px (short side 2, not 16) to fit --max-score-gb 0.01']
    assert Image.open(out / 'strip.bmp.label.png').size == (12096, 1)


def test_a_failed_write_skips_that_image_only(ckpt, photos, tmp_path, monkeypatch):
    """An error while writing one image's outputs (a full disk, say) skips it with the reason and
    removes what it had written; the others are done; a rerun redoes only it."""
    label_png = infer.label_png
    def failing(label, colours):
        if label.shape == (40, 50):  # grey.png
            raise OSError(28, 'No space left on device')
        return label_png(label, colours)
    monkeypatch.setattr(infer, 'label_png', failing)
    summary = run(ckpt, photos, tmp_path, '--save-trusty')
    assert {s['file']: s['reason'] for s in summary['skipped']}['grey.png'] == 'failed ([Errno 28] No space left on device)'
    assert summary['processed'] == len(GOOD) - 1 and not list(tmp_path.glob('grey.png*'))  # trusty, overlay: removed
    assert (tmp_path / 'cmyk.jpg.label.png').exists()
    monkeypatch.setattr(infer, 'label_png', label_png)
    summary = run(ckpt, photos, tmp_path, '--save-trusty')
    assert summary['processed'] == 1 and summary['up_to_date'] == len(GOOD) - 1 and 'grey.png' in summary['images']


def test_restart_does_no_model_work(first, ckpt, photos, monkeypatch, capsys):
    out, _ = first
    before = json.loads((out / 'summary.json').read_text())
    calls = []
    monkeypatch.setattr(infer, 'image_scores', lambda *a, **k: calls.append(1) or image_scores(*a, **k))
    summary = run(ckpt, photos, out)
    assert calls == [] and f'0 processed, {len(GOOD)} up to date' in capsys.readouterr().out
    assert summary['images'] == before['images'] and {s['file'] for s in summary['skipped']} == BAD
    (out / 'sub' / 'alpha.png.overlay.jpg').unlink()  # as if interrupted before this output: only it is redone
    summary = run(ckpt, photos, out)
    assert len(calls) == 1 and summary['processed'] == 1 and summary['images'] == before['images']
    with pytest.raises(SystemExit, match='another vocabulary'):  # old label maps would mean other classes
        run(ckpt, photos, out, '--classes', 'cat,dog')
    summary = run(ckpt, photos, out, '--overwrite')
    assert len(calls) == 1 + len(GOOD) and summary['images'] == before['images']


def test_label_map_is_evaluate_argmax(first, ckpt, photos):
    """The label map equals the argmax of evaluate.predict at the original size (the brief's geometry)."""
    out, _ = first
    c = torch.load(ckpt, weights_only=True)
    model = load_model(c).eval()
    names = c['classes']['names']
    seen = torch.tensor([n in c['classes']['seen'] for n in names])
    for rel in ('rotated.jpg', 'sub/deep/gradient16.png'):
        rgb = infer.load_rgb(photos / rel)
        image, _ = eval_transform(model.mean, model.std, 64)(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)), tv_tensors.Mask(torch.zeros(1, 1)))
        scores = predict(model, image, model.encode_text(names), seen, rgb.shape[:2], crop=64, stride=53,
                         calibration=0.0, trusty_weighting=True, polarity=c['polarity'])
        expected = scores[:len(names)].argmax(0).numpy()
        assert np.array_equal(np.asarray(Image.open(out / f'{rel}.label.png')), expected)


def test_image_modes(photos):
    a = np.asarray(Image.open(photos / 'sub' / 'deep' / 'gradient16.png')).astype(np.float64)
    g = infer.load_rgb(photos / 'sub' / 'deep' / 'gradient16.png')  # 16 bit: scaled, not clipped
    assert g.dtype == np.uint8 and g.shape == (47, 33, 3) and g.max() == 255 and g.min() == 0
    assert np.array_equal(g[..., 0], np.round(a / 257).astype(np.uint8))
    assert infer.load_rgb(photos / 'rotated.jpg').shape == (90, 70, 3)  # EXIF orientation applied
    assert infer.load_rgb(photos / 'cmyk.jpg').shape == (30, 40, 3)
    rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent black -> the white background
    assert (infer.load_rgb(io.BytesIO(png_bytes(Image.fromarray(rgba)))) == 255).all()


def png_bytes(img):
    b = io.BytesIO()
    img.save(b, 'PNG')
    return b.getvalue()


def test_any_vocabulary_and_trusty_maps(ckpt, photos, tmp_path, capsys):
    summary = run(ckpt, photos / 'grey.png', tmp_path, '--classes', 'cat, RED SOLID,red striped ,sofa', '--save-trusty')
    assert summary['vocabulary'] == [{'name': 'cat', 'seen': False}, {'name': 'RED SOLID', 'seen': True},
                                     {'name': 'red striped', 'seen': False}, {'name': 'sofa', 'seen': False}]
    assert 'unseen (not trained on): cat, red striped, sofa' in capsys.readouterr().out
    assert np.asarray(Image.open(tmp_path / 'grey.png.label.png')).max() < 4
    heat = Image.open(tmp_path / 'grey.png.trusty.png')
    assert heat.size == (50, 40) and heat.mode == 'RGB'
    assert infer.heatmap(np.array([[0.0, 1.0]])).tolist() == [[[68, 1, 84], [253, 231, 37]]]
    (tmp_path / 'names.txt').write_text('cat\n\nsofa\n')
    summary = run(ckpt, photos / 'grey.png', tmp_path / 'f', '--classes-file', str(tmp_path / 'names.txt'))
    assert [v['name'] for v in summary['vocabulary']] == ['cat', 'sofa']
    with pytest.raises(SystemExit, match='duplicate class names: Cat, cat'):
        run(ckpt, photos / 'grey.png', tmp_path / 'd', '--classes', 'cat,Cat')


def test_one_line_errors(ckpt, tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'a.txt').write_text('x')
    (tmp_path / 'junk' / 'b.png').write_bytes(b'\x89PNG not really')
    cases = [(tmp_path / 'nowhere', 'no such file or folder'), (tmp_path / 'empty', 'empty folder'),
             (tmp_path / 'junk', 'none of the 2 files could be segmented')]
    for path, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            run(ckpt, path, tmp_path / 'out')
        assert isinstance(e.value.code, str) and '\n' not in e.value.code  # exit status 1, one line


def test_text_and_resize_options(first, ckpt, photos, tmp_path):
    """--text-embeddings holding the live fp32 embeddings gives the default label map; the text and
    resize settings are recorded (a rerun with other ones is refused); a wrong .npy is one line."""
    out, _ = first
    c = torch.load(ckpt, weights_only=True)
    names = c['classes']['names']
    np.save(tmp_path / 'text.npy', load_model(c).eval().encode_text(names).numpy())
    s = run(ckpt, photos / 'rotated.jpg', tmp_path / 'a', '--text-embeddings', str(tmp_path / 'text.npy'))
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'a' / 'rotated.jpg.label.png')), np.asarray(Image.open(out / 'rotated.jpg.label.png')))
    assert (s['settings']['text'], s['settings']['resize']) == (str(tmp_path / 'text.npy'), 'mmseg')
    s = run(ckpt, photos / 'rotated.jpg', tmp_path / 'b', '--text-precision', 'fp16', '--resize', 'torchvision')
    assert (s['settings']['text'], s['settings']['resize']) == ('fp16', 'torchvision') and s['processed'] == 1
    with pytest.raises(SystemExit, match='another vocabulary or settings'):
        run(ckpt, photos / 'rotated.jpg', tmp_path / 'b')
    np.save(tmp_path / 'few.npy', np.ones((3, 32), np.float32))
    with pytest.raises(SystemExit, match=r'few.npy: shape \(3, 32\), expected \(26, 32\)'):
        run(ckpt, photos / 'rotated.jpg', tmp_path / 'c', '--text-embeddings', str(tmp_path / 'few.npy'))


def test_evaluate_checkpoint_text_and_resize(ckpt, tmp_path, monkeypatch):
    """evaluate.py's options reach the transform and the text: a .npy of the live embeddings gives the
    default metrics, the resize name goes to eval_transform."""
    import evaluate
    c = torch.load(ckpt, weights_only=True)
    np.save(tmp_path / 'text.npy', load_model(c).eval().encode_text(c['classes']['names']).numpy())
    resizes = []
    monkeypatch.setattr(evaluate, 'eval_transform', lambda *a: resizes.append(a[-1]) or eval_transform(*a))
    kw = dict(workers=0, progress=False, device=torch.device('cpu'))
    default = evaluate.evaluate_checkpoint(ckpt, **kw)
    given = evaluate.evaluate_checkpoint(ckpt, text_embeddings=tmp_path / 'text.npy', resize='torchvision', **kw)
    assert given['confusion'] == default['confusion'] and resizes == ['mmseg', 'torchvision']


def test_distinct_inputs_never_share_an_output(ckpt, tmp_path):
    """Names built to collide under name-minus-extension schemes: every input keeps its own three
    outputs, each at its input's size; a restart finds them all."""
    names = ['x.jpg', 'x.png', 'x_trusty.jpg', 'x_overlay.png', 'x_jpg.png', 'x.jpg.label.png', 'x.png.trusty.png',
             'x.label.png', 'x.png.overlay.png']
    d = tmp_path / 'in'
    d.mkdir()
    for i, name in enumerate(names):  # width 20 + i tells the outputs apart
        Image.fromarray(np.full((16, 20 + i, 3), 40 * (i % 6), np.uint8)).save(d / name, format='PNG' if name.endswith('png') else 'JPEG')
    summary = run(ckpt, d, tmp_path / 'out', '--save-trusty', '--overlay-format', 'png')
    assert summary['processed'] == len(names) and set(summary['images']) == set(names)
    written = sorted(p.relative_to(tmp_path / 'out').as_posix() for p in (tmp_path / 'out').iterdir() if p.suffix == '.png')
    assert len(written) == 3 * len(names)  # nothing overwritten
    for i, name in enumerate(names):
        assert summary['images'][name]['label_map'] == f'{name}.label.png'
        for tag in ('label', 'trusty'):
            assert Image.open(tmp_path / 'out' / f'{name}.{tag}.png').size == (20 + i, 16), (name, tag)
        row = np.asarray(Image.open(tmp_path / 'out' / f'{name}.overlay.png'))[0]  # the image, then the white legend
        assert (row[19 + i] < 255).any() and (row[20 + i] == 255).all(), name
    assert run(ckpt, d, tmp_path / 'out', '--save-trusty', '--overlay-format', 'png')['up_to_date'] == len(names)


@pytest.mark.parametrize('amp', [torch.bfloat16, torch.float16])
def test_inference_under_autocast(ckpt, photos, amp, tmp_path):
    """CPU autocast: float32 scores of the right shape, finite, close to full precision; infer.py --amp
    bf16 writes the same kind of label maps."""
    c = torch.load(ckpt, weights_only=True)
    model = load_model(c).eval()
    names = c['classes']['names']
    seen = torch.tensor([n in c['classes']['seen'] for n in names])
    text = model.encode_text(names)
    image = torch.randn(3, 64, 96)
    kw = dict(crop=64, stride=53, calibration=0.0, trusty_weighting=True, polarity=c['polarity'])
    full = predict(model, image, text, seen, (70, 100), **kw)
    mixed = predict(model, image, text, seen, (70, 100), amp=amp, **kw)
    assert mixed.dtype == torch.float32 and mixed.shape == full.shape == (len(names) + 1, 70, 100)
    diff = (mixed - full).abs().max().item()  # scores' std ~0.05; bf16 has 8 mantissa bits, fp16 11
    assert torch.isfinite(mixed).all() and 0 < diff < (5e-3 if amp == torch.bfloat16 else 1e-3)
    if amp == torch.bfloat16:
        summary = run(ckpt, photos / 'grey.png', tmp_path, '--amp', 'bf16')
        label = np.asarray(Image.open(tmp_path / 'grey.png.label.png'))
        assert summary['processed'] == 1 and label.shape == (40, 50) and label.max() < len(names)


def test_background_is_black_and_untinted():
    from infer import overlay, palette
    names = ['cat', 'Background', 'dog']
    colours = palette(names)
    assert colours[1].tolist() == [0, 0, 0] and colours[0].any() and colours[2].any()
    assert colours[0].tolist() != colours[2].tolist()
    rgb = np.full((4, 6, 3), 200, np.uint8)
    label = np.array([[0, 1, 2] * 2] * 4)
    img = np.asarray(overlay(rgb, label, names, colours, 0.5))[:4, :6]
    assert (img[label == 1] == 200).all()  # background pixels: the photo as it is
    assert (img[label == 0] == (rgb[0, 0] * 0.5 + colours[0] * 0.5).round()).all()
