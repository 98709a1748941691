"""Efficiency benchmark: parameters, FLOPs, latency, memory, and the overhead TagCLIP adds over bare CLIP.

Builds TagCLIP with random weights (no download) and measures, for one S x S image (512 by default):
  - learnable / total parameters of TagCLIP and of the ZegCLIP configuration (`trusty=False`);
  - FLOPs of one forward with `torch.utils.flop_counter.FlopCounterMode`, which counts matmuls and
    convolutions only, as 2 x multiply-accumulates; reported as GFLOPs and GMACs (= GFLOPs / 2),
    the latter being the unit of the "110.4 GFLOPs" in ZegCLIP's table (mmcv's get_flops counts MACs);
  - latency of the bare frozen CLIP visual tower (no prompts, no decoder), of TagCLIP's prompted ViT
    alone (`encode_image`: splits the overhead into prompts and decoder), of TagCLIP without and with
    the trusty token, of sliding inference on an S x 1.33S image (2 windows, one batch: the whole-image
    path of evaluate.py and infer.py) and of one forward of those two windows;
  - one training step at batch B (`--train-batch`, default 2): forward, TagCLIPLoss and
    backward to the prompts and the decoder, against the bare tower's forward and backward from its
    patch embeddings (autograd runs through every frozen block in both);
    all variants alternate round-robin so load changes hit them alike;
  - the one-off cost of embedding a 171-class vocabulary with the 15-template ensemble (DESIGN §1);
  - peak memory per variant (CUDA max allocated, or process peak RSS on CPU) and the working memory
    above what was in use before the call (for sliding inference: the whole-image path's).

    python benchmark.py                                    # ViT-B-16, CPU, 512 x 512, training rows included
    python benchmark.py --train-batch 0                    # without the training rows: less than half the time
    python benchmark.py --device cuda --repeats 50 --warmup 5
    python benchmark.py --clip-model tiny_test_clip --size 64 --repeats 2 --classes 5   # smoke test
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext

import open_clip
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from data import COCO_STUFF_CLASSES, IGNORE_INDEX
from inference import default_stride, slide_inference
from checkpoint import build_model
from losses import TagCLIPLoss
from model import TEMPLATES, TagCLIP, TagCLIPConfig, vit_block
from runtime import HelpFormatter

# the ratios the implementation should reach (the brief; DESIGN §7: windows batched, text cached)
TARGETS = {'trusty / bare': 1.05, 'trusty / no_trusty': 1.01, 'slide / batch': 1.05}


# ----------------------------------------------------------------------------- models

def bare_clip(model: TagCLIP, images, grad_input: bool = False):
    """The frozen CLIP visual tower on the same input as TagCLIP: conv1, [CLS], positions interpolated
    to the patch grid, ln_pre, the blocks (through model.vit_block, as TagCLIP runs them), ln_post and
    proj on every token. No prompts, no prompt LayerNorm, no decoder. grad_input: the embedded tokens
    require grad, so that a backward runs through every block as TagCLIP's does to its prompts.
    Returns (B, 1+N, d)."""
    v = model.clip.visual
    x, _ = model.embed_patches(images)                                     # (B, 1+N, D)
    if grad_input:
        x = x.detach().requires_grad_()
    batch_first = getattr(v.transformer, 'batch_first', True)
    for block in v.transformer.resblocks:
        x = vit_block(block, x, batch_first)                               # (B, 1+N, D)
    x = v.ln_post(x)
    return x @ v.proj if v.proj is not None else x                         # (B, 1+N, d)


def count_params(model: TagCLIP):
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {'learnable': learnable, 'total': sum(p.numel() for p in model.parameters()),
            'learnable_backbone': learnable - sum(p.numel() for p in model.decoder_parameters()),
            'learnable_decoder': sum(p.numel() for p in model.decoder_parameters()),
            'frozen_clip': sum(p.numel() for p in model.clip.parameters())}


def count_flops(fn, grad: bool = False) -> int:
    """FLOPs (2 x MACs of matmuls and convolutions) of one call; with grad, its backward's too. The
    counter misses attention run by fused kernels (nn.MultiheadAttention's fast path, CPU flash
    attention), so both are switched to plain matmuls here; FlopCounterMode cannot run under
    inference_mode, hence no_grad for a forward."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.set_grad_enabled(grad), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- measuring

class Memory:
    """Peak memory of one call: CUDA max allocated, or on CPU the process's peak RSS (VmHWM), reset
    before each call through /proc/self/clear_refs when the kernel allows it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'
        self.resettable = self.cuda or self._try_reset()

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # "reset the peak resident set size"
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int:  # bytes
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # hand freed heap back to the OS, so that the next call's activations show up in its RSS
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
        if self.resettable:
            self._try_reset()

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        try:
            return self._status('VmRSS:')
        except (OSError, StopIteration):
            return 0

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        try:
            return self._status('VmHWM:')
        except (OSError, StopIteration):  # no /proc: ru_maxrss is KiB on Linux
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def round_robin(variants: dict, repeats: int, warmup: int, device, memory: Memory, progress=True):
    """Time every variant once per round, in turn (a, b, c, a, b, c, ...), so that load from other
    processes and clock changes fall on all of them alike. Each round starts one variant later
    (a b c, b c a, c a b, ...): on a shared CPU a fixed order showed position effects of a few per
    cent, larger than the differences measured. Warm-up rounds are not recorded.
    Returns {name: [wall seconds per round]}, {name: [process CPU seconds per round]},
    {name: (peak bytes, peak bytes above what was in use just before the call)}."""
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    peaks = {k: (0, 0) for k in variants}
    for r in tqdm(range(warmup + repeats), desc='timing rounds', disable=not progress, dynamic_ncols=True):
        order = list(variants)
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn = variants[name]
            memory.reset()
            before = memory.current()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                times[name].append(dt)
                cpu[name].append(dc)
                peak = memory.peak()
                peaks[name] = (max(peaks[name][0], peak), max(peaks[name][1], peak - before))
    return times, cpu, peaks


def summarize(seconds: list, cpu_seconds: list, images: int):
    med, best = statistics.median(seconds), min(seconds)
    return {'median_ms': 1e3 * med, 'min_ms': 1e3 * best, 'images_per_s': images / med,
            'all_ms': [round(1e3 * s, 2) for s in seconds],
            'cpu_median_ms': 1e3 * statistics.median(cpu_seconds), 'cpu_all_ms': [round(1e3 * s, 2) for s in cpu_seconds]}


def ratio(a: list, b: list, cpu_a: list, cpu_b: list):
    """a / b of round-robin timings: of the medians, of the minima, and the median of the per-round
    ratios ('paired': each pair ran seconds apart, so slow drifts in load cancel); the same paired
    ratio on process CPU time, which leaves out time spent descheduled by other processes (but
    counts worker threads spinning while they wait for each other)."""
    paired = lambda x, y: statistics.median(p / q for p, q in zip(x, y))
    return {'median': statistics.median(a) / statistics.median(b), 'min': min(a) / min(b),
            'paired_median': paired(a, b), 'cpu_paired_median': paired(cpu_a, cpu_b)}


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter)
    p.add_argument('--clip-model', default='ViT-B-16', help='any open_clip ViT config name (random weights)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'],
                   help='cuda: bf16 autocast and synchronised timing')
    p.add_argument('--out', default='bench.json', help='write the results JSON here')
    p.add_argument('--repeats', type=int, default=5, help='timed rounds (every variant once per round)')
    p.add_argument('--warmup', type=int, default=1, help='untimed rounds first')
    p.add_argument('--size', type=int, default=512, help='square input side S (crop); multiple of the patch size')
    p.add_argument('--classes', type=int, default=20, help='vocabulary size C of the forward (VOC: 20)')
    p.add_argument('--n-prompts', type=int, default=10, help='deep visual prompts per layer (VOC 10, COCO 100)')
    p.add_argument('--train-batch', type=int, default=2,
                   help='batch B of the training-step rows (0: no training rows)')
    p.add_argument('--text-classes', type=int, default=171,
                   help='vocabulary embedded for the text timing (first K COCO-Stuff names, 15 templates)')
    p.add_argument('--threads', type=int, default=0,
                   help='torch CPU threads (0: torch default); 1 is steadier on cores other jobs share')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights and inputs')
    p.add_argument('--no-progress', action='store_true', help='no tqdm bars')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    amp = lambda: torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    load_start = os.getloadavg()

    # TagCLIP (trusty token + Trusty Learner, the default) and ZegCLIP (no token, no self-attention),
    # sharing one frozen CLIP; the bare tower runs that same CLIP
    base = dict(clip_model=args.clip_model, pretrained=None, n_prompts=args.n_prompts)
    tag = build_model(TagCLIPConfig(**base)).to(device).eval()
    zeg = build_model(TagCLIPConfig(**base, trusty=False, trusty_learner=False)).eval()
    params = {'trusty': count_params(tag), 'no_trusty': count_params(zeg)}
    zeg.clip = tag.clip
    zeg.to(device)
    p = tag.patch_size
    if args.size % p:
        raise SystemExit(f'--size {args.size} must be a multiple of the patch size {p}')

    S = args.size
    d = tag.descriptor.out_features
    text = F.normalize(torch.randn(args.classes, d, device=device), dim=-1)  # (C, d); content does not matter
    seen = torch.arange(args.classes, device=device) < max(1, args.classes * 3 // 4)  # (C,) last quarter unseen
    image = torch.randn(1, 3, S, S, device=device)                                   # (1, 3, S, S)
    wide = torch.randn(3, S, round(S * 683 / 512), device=device)                     # (3, S, 1.33 S): 2 windows
    stride = default_stride(S)
    windows = torch.stack([wide[:, :, :S], wide[:, :, -S:]])                          # (2, 3, S, S)

    # a training batch: B random crops, random labels whose unseen classes' pixels are 255 (as train.py
    # masks them), the loss train.py builds by default
    Bt = args.train_batch
    crops = torch.randn(Bt, 3, S, S, device=device)                                  # (Bt, 3, S, S)
    label = torch.randint(0, args.classes, (Bt, S, S), device=device)                # (Bt, S, S)
    unseen = ~seen[label]                                                            # (Bt, S, S)
    label = label.masked_fill(unseen, IGNORE_INDEX)
    criterion = TagCLIPLoss(trusty=True)

    def forward(model, x):
        with amp():
            return model(x, text)

    def bare():
        with amp():
            return bare_clip(tag, image)

    def encoder():  # TagCLIP's image side alone (prompted ViT), to split its overhead from the decoder's
        with amp():
            return tag.encode_image(image)

    def train_step():  # as train.py: model.train() (the frozen CLIP stays in eval), forward, loss, backward
        tag.train().zero_grad(set_to_none=True)
        try:
            with amp():
                outputs = tag(crops, text)
            criterion(outputs, label, unseen)['loss'].backward()
        finally:
            tag.eval()

    def bare_step():  # the same autograd through every frozen block, from the tokens instead of the prompts
        with amp():
            x = bare_clip(tag, crops, grad_input=True)
        x.float().mean().backward()

    def inference(fn):  # as evaluate.py and infer.py run the model
        def run():
            with torch.inference_mode():
                return fn()
        return run

    variants = {
        'bare': inference(bare),
        'encoder': inference(encoder),
        'no_trusty': inference(lambda: forward(zeg, image)),
        'trusty': inference(lambda: forward(tag, image)),
        'slide': inference(lambda: slide_inference(tag, wide, text, seen, crop=S, stride=stride,
                                                   amp=torch.bfloat16 if device.type == 'cuda' else None)),
        'batch': inference(lambda: forward(tag, windows)),
    }
    images = {'bare': 1, 'encoder': 1, 'no_trusty': 1, 'trusty': 1, 'slide': 1, 'batch': 2}
    if Bt:
        variants |= {'bare_train': bare_step, 'train': train_step}
        images |= {'bare_train': Bt, 'train': Bt}

    # FLOPs of one S x S forward, and of a training step with its backward
    flops = {'bare': count_flops(lambda: bare_clip(tag, image)),
             'encoder': count_flops(lambda: tag.encode_image(image)),
             'no_trusty': count_flops(lambda: zeg(image, text)),
             'trusty': count_flops(lambda: tag(image, text))}
    if Bt:
        flops |= {'bare_train': count_flops(bare_step, grad=True), 'train': count_flops(train_step, grad=True)}

    memory = Memory(device)
    times, cpu, peaks = round_robin(variants, args.repeats, args.warmup, device, memory, not args.no_progress)
    tag.zero_grad(set_to_none=True)
    with torch.inference_mode():
        # text: once per vocabulary and run (DESIGN §1); the first call is what a run pays
        names = list(COCO_STUFF_CLASSES[:args.text_classes])
        sync(device)
        t0 = time.perf_counter()
        tag.encode_text(names, 'ensemble')
        sync(device)
        text_s = time.perf_counter() - t0

    latency = {k: summarize(times[k], cpu[k], images[k]) for k in times}
    ratios = {}
    for name, (a, b) in {'trusty / bare': ('trusty', 'bare'), 'no_trusty / bare': ('no_trusty', 'bare'),
                         'encoder / bare': ('encoder', 'bare'), 'trusty / encoder': ('trusty', 'encoder'),
                         'trusty / no_trusty': ('trusty', 'no_trusty'), 'slide / batch': ('slide', 'batch'),
                         'train / bare_train': ('train', 'bare_train')}.items():
        if a not in times:
            continue
        r = ratio(times[a], times[b], cpu[a], cpu[b])
        if name in TARGETS:  # judged on the paired wall-clock ratio
            r |= {'target': TARGETS[name], 'met': r['paired_median'] <= TARGETS[name]}
        ratios[name] = r

    result = {
        'setup': {**{k: v for k, v in vars(args).items() if k != 'no_progress'},
                  'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name(),
                  'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                  'torch': torch.__version__, 'open_clip': open_clip.__version__,
                  'precision': 'bf16 autocast' if device.type == 'cuda' else 'fp32',
                  'loadavg_start': load_start, 'loadavg_end': os.getloadavg(),
                  'slide_image': list(wide.shape[1:]), 'slide_windows': windows.shape[0],
                  'train_loss': 'TagCLIPLoss (focal, dice, trusty focal; no aux)'},
        'params': params,
        'gflops': {k: v / 1e9 for k, v in flops.items()},
        'gmacs': {k: v / 2e9 for k, v in flops.items()},
        'latency': latency,
        'peak_memory_mib': {k: v[0] / 2 ** 20 for k, v in peaks.items()},
        'peak_memory_added_mib': {k: v[1] / 2 ** 20 for k, v in peaks.items()},
        'memory_kind': ('cuda max allocated' if device.type == 'cuda' else
                        'peak RSS per variant (VmHWM reset)' if memory.resettable else 'process peak RSS'),
        'ratios': ratios,
        'text_encoding': {'classes': len(names), 'templates': len(TEMPLATES['ensemble']),
                          'prompts': len(names) * len(TEMPLATES['ensemble']),
                          'seconds': text_s, 'ms_per_class': 1e3 * text_s / len(names)},
    }
    print(format_report(result))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=2, allow_nan=False)
    return result


def format_report(r) -> str:
    s = r['setup']
    cpu = s['device'] == 'cpu'  # process CPU time is shown on CPU only
    M = lambda n: f'{n / 1e6:.2f}M'
    lines = [f"TagCLIP benchmark: {s['clip_model']}, {s['size']}x{s['size']}, C={s['classes']}, "
             f"{s['n_prompts']} prompts/layer, {s['device']} ({s['device_name']}, {s['torch_threads']} threads, "
             f"{s['precision']}), {s['repeats']} rounds after {s['warmup']} warm-up",
             '',
             f"{'parameters':<24} {'learnable':>10} {'(prompts':>10} {'decoder)':>10} {'total':>10}"]
    for k, name in (('no_trusty', 'ZegCLIP (no trusty)'), ('trusty', 'TagCLIP')):
        p = r['params'][k]
        lines.append(f"{name:<24} {M(p['learnable']):>10} {M(p['learnable_backbone']):>10} "
                     f"{M(p['learnable_decoder']):>10} {M(p['total']):>10}")
    lines += ['', f"{'one forward, B=1':<24} {'GFLOPs':>8} {'GMACs':>8} {'median ms':>10} {'min ms':>9} "
                  f"{'img/s':>7} {'peak MiB':>9} {'(+MiB)':>7}" + (f" {'CPU ms':>9}" if cpu else '')]
    names = {'bare': 'bare CLIP visual', 'encoder': 'prompted ViT (no dec.)', 'no_trusty': 'TagCLIP w/o trusty', 'trusty': 'TagCLIP',
             'slide': f"slide {s['slide_image'][0]}x{s['slide_image'][1]}", 'batch': f"batch of {s['slide_windows']} windows",
             'bare_train': 'bare CLIP fwd + bwd', 'train': 'TagCLIP training step'}
    for k, name in names.items():
        if k not in r['latency']:
            continue
        t = r['latency'][k]
        fl = f"{r['gflops'][k]:8.2f} {r['gmacs'][k]:8.2f}" if k in r['gflops'] else f"{'':8} {'':8}"
        if k == 'slide':
            lines += ['', 'sliding inference (1 image, windows batched: the whole-image path) vs one forward of its windows']
        if k == 'bare_train':
            lines += ['', f"training step, B={s['train_batch']} (forward, loss, backward to prompts and decoder) vs the bare "
                          'tower from tokens that require grad; FLOPs include the backward']
        lines.append(f"{name:<24} {fl} {t['median_ms']:10.1f} {t['min_ms']:9.1f} {t['images_per_s']:7.2f} "
                     f"{r['peak_memory_mib'][k]:9.0f} {r['peak_memory_added_mib'][k]:7.0f}" + (f" {t['cpu_median_ms']:9.1f}" if cpu else ''))
    lines += ['', f"{'ratio (wall clock)':<24} {'median':>8} {'min':>8} {'paired':>8}" + (f" {'CPU':>8}" if cpu else '')
              + f" {'target':>8}"]
    for k, v in r['ratios'].items():
        mark = f" {'<= ' + format(v['target'], '.2f'):>8} {'✓' if v['met'] else '✗'}" if 'target' in v else ''
        lines.append(f"{k:<24} {v['median']:8.3f} {v['min']:8.3f} {v['paired_median']:8.3f}"
                     + (f" {v['cpu_paired_median']:8.3f}" if cpu else '') + mark)
    t = r['text_encoding']
    lines += ['', 'median/min: ratio of the medians/minima; paired: median of the per-round ratios (judged against '
                  'the target)' + ('; CPU: paired ratio of process CPU time' if cpu else ''),
              f"text encoding (once per run): {t['classes']} classes x {t['templates']} templates = "
              f"{t['prompts']} prompts in {t['seconds']:.1f} s ({t['ms_per_class']:.0f} ms/class)",
              f"memory: {r['memory_kind']}, (+MiB) above the memory in use before the call; load average {s['loadavg_start'][0]:.2f} -> {s['loadavg_end'][0]:.2f} "
              f"on {s['cpu_count']} cores",
              'GFLOPs: FlopCounterMode (matmul/conv, 2 per MAC); GMACs = GFLOPs / 2 compare with the '
              '"GFLOPs" of mmcv get_flops (ZegCLIP: 110.4).']
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
