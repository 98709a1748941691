"""The user-facing commands as subprocesses: a bad file gives one line whatever --workers and the
number of ranks; 2 "nodes" of 1 process each train and evaluate, and only global rank 0 writes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import train
from tests.conftest import TINY_CLIP
from toy import generate_world

REPO = Path(__file__).resolve().parents[1]
LAUNCH = """import runpy, sys, open_clip
open_clip.add_model_config(sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""
TOY = ['--dataset', 'toy', '--toy-images', '4', '3', '--clip-model', 'tiny_test_clip', '--n-prompts', '2',
       '--heads', '4', '--batch-size', '2', '--warmup', '1']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A toy world (4 train, 3 val images), the tiny CLIP as a file, a 1-step checkpoint and a launcher
    that registers the tiny CLIP config before running a script as __main__."""
    d = tmp_path_factory.mktemp('launch')
    generate_world(d / 'toy', n_train=4, n_val=3, seed=0)
    torch.manual_seed(0)
    torch.save(open_clip.create_model('tiny_test_clip').state_dict(), d / 'clip.pt')
    (d / 'tiny_test_clip.json').write_text(json.dumps(TINY_CLIP))
    (d / 'launch.py').write_text(LAUNCH)
    train.main([*TOY, '--data-root', str(d / 'toy'), '--pretrained', str(d / 'clip.pt'), '--workers', '0',
                '--out-dir', str(d / 'run'), '--iters', '1', '--no-eval'])
    return d


def bad_world(setup, tmp_path):
    """A copy of the toy world with an invalid value in val label 00001 (rank 1's share of 2) and a
    truncated train image 00001; returns (root, the two broken files)."""
    root = tmp_path / 'bad'
    shutil.copytree(setup / 'toy', root)
    label = root / 'annotations' / 'val' / '00001.png'
    a = np.asarray(Image.open(label)).copy()
    a[0, 0] = 77
    Image.fromarray(a).save(label)
    image = root / 'images' / 'train' / '00001.png'
    image.write_bytes(image.read_bytes()[:200])
    return root, label, image


def command(setup, script, *args):
    return [sys.executable, str(setup / 'launch.py'), str(setup / 'tiny_test_clip.json'), script, *args]


def env(**extra):
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO), **extra}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def error_lines(proc):
    assert 'Traceback' not in proc.stderr and 'worker' not in proc.stderr, proc.stderr
    return [l for l in proc.stderr.splitlines() if 'error' in l.lower()]


@pytest.mark.parametrize('workers', ['0', '2'])
def test_bad_file_is_one_line_whatever_the_workers(setup, tmp_path, workers):
    root, label, image = bad_world(setup, tmp_path)
    proc = subprocess.run(command(setup, 'evaluate.py', '--checkpoint', str(setup / 'run' / 'last.pt'),
                                  '--data-root', str(root), '--crop', '64', '--workers', workers),
                          cwd=REPO, capture_output=True, text=True, env=env())
    assert proc.returncode == 1
    assert error_lines(proc) == [f'error: {label}: label values [77] outside the valid raw values 0..24, 255']
    proc = subprocess.run(command(setup, 'train.py', *TOY, '--data-root', str(root), '--pretrained', str(setup / 'clip.pt'),
                                  '--out-dir', str(tmp_path / 'run'), '--iters', '2', '--no-eval', '--workers', workers),
                          cwd=REPO, capture_output=True, text=True, env=env())
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith(f'error: {image}: unreadable image (')


def test_bad_file_on_one_rank_is_one_line_from_rank_0(setup, tmp_path):
    """Rank 1 meets the bad label in a loader worker; both ranks stop, rank 0 alone prints it."""
    root, label, _ = bad_world(setup, tmp_path)
    cmd = command(setup, 'evaluate.py', '--checkpoint', str(setup / 'run' / 'last.pt'), '--data-root', str(root),
                  '--crop', '64', '--workers', '1')
    dist = dict(WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), LOCAL_RANK='0')
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(RANK=str(r), **dist)) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    rank0, rank1 = (subprocess.CompletedProcess(cmd, p.returncode, *o) for p, o in zip(procs, outs))
    assert rank0.returncode == rank1.returncode == 1
    assert error_lines(rank0) == [f'error: {label}: label values [77] outside the valid raw values 0..24, 255']
    assert error_lines(rank1) == [] and rank1.stderr.strip() == '' and rank1.stdout.strip() == ''


def test_two_nodes_of_one_process(setup, tmp_path):
    """torchrun --nnodes 2 (c10d rendezvous on localhost), one process per node, LOCAL_RANK 0 on both:
    training and its evaluation run, only global rank 0 writes (each node's cwd stands for its local
    disk: the relative --out-dir stays empty on the other node); a resume that only one node can see
    stops both with one line."""
    port = free_port()

    def launch(*extra):
        procs = []
        for node in range(2):
            cwd = tmp_path / f'node{node}'
            cwd.mkdir(exist_ok=True)
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc-per-node', '1',
                   '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', f'job{len(extra)}',
                   *command(setup, str(REPO / 'train.py'))[1:], *TOY, '--data-root', str(setup / 'toy'),
                   '--pretrained', str(setup / 'clip.pt'), '--out-dir', 'run', '--iters', '2', '--eval-every', '2',
                   '--workers', '0', '--crop', '64', *extra]
            procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()))
        return [(p, *p.communicate(timeout=300)) for p in procs]

    runs = launch()
    assert [p.returncode for p, _, _ in runs] == [0, 0], runs[0][2][-3000:] + runs[1][2][-3000:]
    wrote = [sorted(f.name for f in (tmp_path / f'node{k}' / 'run').glob('*')) for k in range(2)]
    main = wrote.index(['best.pt', 'config.json', 'last.pt', 'log.jsonl', 'metrics.json'])  # the global rank 0 node
    assert wrote[1 - main] == []  # rank 1 made no folder and wrote nothing
    assert 'hIoU' in runs[main][1] and 'hIoU' not in runs[1 - main][1]  # the metrics table: rank 0 only
    m = json.loads((tmp_path / f'node{main}' / 'run' / 'metrics.json').read_text())
    assert m['step'] == 2 and set(m['per_class']) == set(train.DATASETS['toy'].classes)

    runs = launch('--resume', 'auto')  # last.pt is on global rank 0's disk only
    assert [p.returncode for p, _, _ in runs] == [1, 1]
    lines = [l for _, _, err in runs for l in err.splitlines() if l.startswith('error')]
    assert lines == ["error: run/last.pt: found by ranks [0] only; --out-dir must be on storage that every node shares"]
