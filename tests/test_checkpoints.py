"""Checkpoints: every file a user passes gets a one-line error when it is not a checkpoint; a model
trained from random CLIP weights stores them; --init-from starts TagCLIP from ZegCLIP; ZegCLIP's focal weight."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from checkpoint import build_model, load_model
from inference import predict
from model import TagCLIPConfig
from tests.test_train import argv as train_argv, world  # noqa: F401 (the toy world fixture)

REPO = Path(__file__).resolve().parents[1]


def argv(world, out, *extra):
    """test_train's command line, one step of batch 2, no evaluation."""
    return train_argv(world, out, '--batch-size', '2', '--iters', '1', '--warmup', '1', '--no-eval', *extra)


@pytest.fixture(scope='module')
def zegclip(world, tmp_path_factory):
    """A 1-step --no-trusty (ZegCLIP) checkpoint trained from random CLIP weights."""
    out = tmp_path_factory.mktemp('zeg')
    train.main(argv(world, out, '--no-trusty'))
    return out / 'last.pt'


def test_random_clip_is_stored_and_reproduces(zegclip, world):
    """--pretrained none: the random CLIP is in the checkpoint, so two loads give the same model."""
    ckpt = torch.load(zegclip, weights_only=True)
    assert 'visual.conv1.weight' in ckpt['clip']
    image = torch.randn(3, 64, 80)
    scores = []
    for seed in (1, 2):  # a different global RNG state each time: a rebuilt random CLIP would differ
        torch.manual_seed(seed)
        model = load_model(ckpt).eval()
        assert torch.equal(model.clip.visual.conv1.weight, ckpt['clip']['visual.conv1.weight'])
        text = model.encode_text(['red solid', 'blue dotted'])
        scores.append(predict(model, image, text, torch.tensor([True, False]), (64, 80), mode='slide', crop=64, stride=48))
    assert torch.equal(scores[0], scores[1])


def test_stored_clip_loads_without_a_random_init_message(zegclip, caplog):
    """open_clip's 'initialized randomly' line is true for --pretrained none, not for a model whose
    CLIP weights come from the checkpoint right after: loading one stays silent about it."""
    ckpt = torch.load(zegclip, weights_only=True)
    with caplog.at_level('WARNING'):
        load_model(ckpt)
    assert 'initialized randomly' not in caplog.text
    with caplog.at_level('WARNING'):
        build_model(TagCLIPConfig(**{**ckpt['config'], 'pretrained': None}))
    assert 'initialized randomly' in caplog.text


def test_init_from_zegclip_starts_tagclip(zegclip, world, tmp_path, capsys):
    """TagCLIP from a trained ZegCLIP: its tensors and its CLIP carried over, the trusty parts start fresh."""
    train.main(argv(world, tmp_path, '--init-from', str(zegclip)))  # one step at lr 2e-10 (warm-up)
    assert "initialised here: ['trusty_token'" in capsys.readouterr().out
    zeg, tag = torch.load(zegclip, weights_only=True), torch.load(tmp_path / 'last.pt', weights_only=True)
    assert tag['config']['trusty'] and 'trusty_token' in tag['model'] and 'trusty_token' not in zeg['model']
    for k, v in zeg['model'].items():
        assert torch.allclose(tag['model'][k], v, atol=1e-8), k
    assert all(torch.equal(tag['clip'][k], v) for k, v in zeg['clip'].items())


def test_no_trusty_trains_with_zegclips_focal_weight():
    base = ['--dataset', 'toy', '--data-root', 'x']
    assert train.get_args(base + ['--no-trusty']).weight_focal == 100.0
    assert train.get_args(base + ['--trusty', 'off']).weight_focal == 100.0
    assert train.get_args(base).weight_focal == 20.0
    assert train.get_args(base + ['--no-trusty', '--weight-focal', '7']).weight_focal == 7.0
    assert train.get_args(base + ['--setting', 'fully']).weight_focal == 20.0  # auto off: TagCLIP's recipe


def bad_files(d: Path):
    """One of each kind of file that is not a checkpoint of this project."""
    good = d / 'good.pt'
    torch.save({'config': {}, 'model': {'x': torch.ones(1000)}}, good)
    data = good.read_bytes()
    (d / 'garbage.pt').write_bytes(bytes(range(256)) * 8)
    (d / 'truncated.pt').write_bytes(data[: len(data) // 2])
    (d / 'notes.txt').write_text('hello world\n')
    (d / 'folder.pt').mkdir()
    torch.save({'state_dict': {'w': torch.ones(2)}}, d / 'other.pt')  # a checkpoint of another kind
    torch.save(torch.ones(3), d / 'tensor.pt')
    (d / 'empty.pt').write_bytes(b'')
    return d


def one_line_error(proc, path, why):
    lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith('toy world:')]  # progress bars
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and str(path) in lines[0] and why in lines[0], lines
    assert 'weights_only=False' not in proc.stderr


CASES = [  # (script and its flags, bad file, what the error says)
    (['evaluate.py', '--checkpoint'], 'garbage.pt', 'not a PyTorch checkpoint'),
    (['evaluate.py', '--data-root', '.', '--checkpoint'], 'other.pt', '(no config, model'),
    (['infer.py', '--input', 'x.jpg', '--output', 'o', '--checkpoint'], 'truncated.pt', 'truncated or corrupt'),
    (['infer.py', '--input', 'x.jpg', '--output', 'o', '--checkpoint'], 'tensor.pt', 'it holds a Tensor'),
    (['train.py', '--pretrained', 'none', '--resume'], 'notes.txt', 'not a PyTorch checkpoint'),
    (['train.py', '--pretrained', 'none', '--init-from'], 'folder.pt', 'a folder, not a checkpoint file'),
    (['train.py', '--clip-model', 'toy_clip', '--pretrained'], 'empty.pt', 'empty or truncated'),
]


def test_bad_checkpoint_files_one_line(tmp_path):
    """The user commands, as subprocesses: one line naming the file and the problem, no traceback."""
    d = bad_files(tmp_path)
    (tmp_path / 'x.jpg').write_bytes(b'')
    procs = []
    for i, (cmd, name, why) in enumerate(CASES):  # all at once: most of each one's time is importing torch
        extra = ['--dataset', 'toy', '--data-root', str(tmp_path / f'world{i}'), '--toy-images', '2', '1',
                 '--workers', '0', '--out-dir', str(tmp_path / f'run{i}')] if cmd[0] == 'train.py' else []
        procs.append((subprocess.Popen([sys.executable, str(REPO / cmd[0]), *extra, *cmd[1:], str(d / name)],
                                       cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}),
                      d / name, why))
    for proc, path, why in procs:
        out, err = proc.communicate()
        one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), path, why)
