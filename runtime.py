"""Process-level helpers shared by train.py, evaluate.py and infer.py: torchrun's distributed set-up
(global rank for shards and rank-0 writes, local rank only for the GPU), errors that every rank agrees
on so that one line comes out, CPU thread sizing, atomic file writes and strict JSON."""

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import DatasetError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default shown once: argparse's '(default: X)', unless the help text already
    says what the default is, or there is none (None, or off for an on/off switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or 'default' in (action.help or ''):  # 0 is shown
            return action.help
        return super()._get_help_string(action)


def setup_distributed():
    """Process group from torchrun's environment (NCCL on CUDA, gloo on CPU); a no-op when launched
    plainly. Returns (rank, world_size, device)."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device('cuda', local)
    else:
        device = torch.device('cpu')
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def is_main():
    return rank_world()[0] == 0


def first_error(error):
    """Every rank's error message (or None) -> the lowest failing rank's message (or None), on every
    rank: all ranks then stop together, and rank 0 alone prints it."""
    rank, world = rank_world()
    if world == 1:
        return error
    errors = [None] * world
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def agreed_exit(error):
    """SystemExit for an error all ranks agree on (first_error, in_step): rank 0 prints the one
    line 'error: ...', the other ranks exit with status 1 quietly, after closing the process group."""
    rank = rank_world()[0]
    for bar in list(tqdm._instances):  # an open progress bar would leave the line half-written
        bar.close()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return SystemExit(f'error: {error}' if rank == 0 else 1)


def in_step(loader, device):
    """Iterates a DataLoader on all ranks in step: a DatasetError on any rank (also one raised in a
    worker process) stops every rank with the same DatasetError, instead of leaving the others
    waiting in a collective. One all_reduce of two numbers per item; a rank whose share is shorter
    keeps answering until every rank is done."""
    if rank_world()[1] == 1:
        yield from loader
        return
    it, done = iter(loader), False
    while True:
        error = None
        if not done:
            try:
                item = next(it)
            except StopIteration:
                done = True
            except DatasetError as e:
                error = str(e)
        flags = torch.tensor([error is not None, not done], dtype=torch.int32, device=device)  # failed, going
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, going = flags.tolist()
        if failed:
            raise DatasetError(first_error(error))
        if not going:
            return
        if not done:
            yield item


def cpu_threads(workers: int) -> int:
    """Torch threads for one process on CPU: the cores that its data workers (and the other local
    processes) leave free, at least 1. Oversubscribed cores make every parallel op wait for a
    descheduled thread: steps then stall for seconds whenever anything else runs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) - workers)


def strict(obj):
    """obj with every NaN / inf float as None: strict JSON writes null (e.g. the IoU of a class absent
    from both labels and predictions, or mIoU(U) without unseen classes)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def atomic_write(path, write):
    """write(tmp) into a hidden temp file beside `path`, then os.replace it onto `path`: a crash
    never leaves a half-written file under the real name, and a failed write leaves nothing."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path):
    """Strict JSON (NaN -> null, never a bare NaN token), written atomically."""
    text = json.dumps(strict(obj), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))
