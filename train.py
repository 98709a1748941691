"""Train TagCLIP (paper §3-4, DESIGN §6 and §8), with the same code on one CPU and on N GPUs.

    python train.py                                   # offline toy world: train, evaluate, print hIoU
    torchrun --nproc_per_node 8 train.py --dataset voc --data-root data/VOCdevkit/VOC2012

Settings: inductive zero-shot (default; unseen pixels ignored, vocabulary = seen classes),
transductive (the authors' two jobs: the inductive model for half its schedule, then a fresh schedule
that self-trains on pseudo labels for the masked unseen pixels), fully supervised. Checkpoints are
plain dicts written atomically on rank 0; `--resume auto` continues exactly where a run stopped.
"""

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import toy
from checkpoint import ARCHITECTURE_QUIRKS, build_model, make_checkpoint, read_checkpoint, save_checkpoint
from data import DATASETS, IGNORE_INDEX, DatasetError, build_dataset
from inference import CALIBRATION, amp_dtype, default_stride, eval_loader, evaluate, format_table
from losses import TagCLIPLoss
from recipe import class_split, jobs, model_config
from recipe import get_args as parse_args
from runtime import (agreed_exit, atomic_write, cpu_threads, first_error, is_main, lockstep,
                     setup_distributed, strict, write_json)
from transforms import eval_transform, train_transform

# ----------------------------------------------------------------------------- data

class TrainSampler(torch.utils.data.Sampler):
    """Endless DistributedSampler stream of (epoch, index) from a given step on: set_epoch every
    epoch, every rank a disjoint share, and resuming at step k yields exactly what an unbroken run
    would have yielded after step k."""

    def __init__(self, dataset, rank, world, seed, batch_per_rank, start_step=0):
        self.inner = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = start_step * batch_per_rank

    def __iter__(self):
        epoch, offset = divmod(self.skip, len(self.inner))
        while True:
            self.inner.set_epoch(epoch)
            for i, idx in enumerate(self.inner):
                if i >= offset:
                    yield epoch, idx
            epoch, offset = epoch + 1, 0


class SeededSamples(torch.utils.data.Dataset):
    """Seeds the augmentation of each sample by (seed, epoch, index): the same crop and flip whatever
    the worker, the world size or a resume."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key):
        epoch, idx = key
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG (dropout) untouched
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + idx)
            sample = self.dataset[idx]
        return sample['image'], sample['label']


def label_luts(classes, unseen, vocabulary, device):
    """256-entry lookups from dataset label ids: to vocabulary ids (255 where not in it), and is-unseen."""
    to_vocab = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    is_unseen = torch.zeros(256, dtype=torch.bool)
    for i, name in enumerate(classes):
        if name in vocabulary:
            to_vocab[i] = vocabulary.index(name)
        is_unseen[i] = name in unseen
    return to_vocab.to(device), is_unseen.to(device)


@torch.no_grad()
def pseudo_label(pred_masks, label, unseen, unseen_ids):
    """Transductive self-training (ZegCLIP): pixels masked because they belong to an unseen class get
    the argmax over the unseen classes of the current detached scores; all other pixels are kept.
    pred_masks (B, C[+1], h, w), label (B, H, W) in the full vocabulary with unseen pixels = 255."""
    logits = F.interpolate(pred_masks.float(), size=label.shape[-2:], mode='bilinear', align_corners=False)
    ids = torch.as_tensor(unseen_ids, device=label.device)
    best_unseen = ids[logits[:, ids].argmax(1)]                         # (B, H, W)
    return torch.where(unseen, best_unseen, label)


def prepare_toy(args, rank, world):
    """Rank 0 generates the toy world and pretrains its tiny CLIP (both cached on disk); the other
    ranks wait. Unless --pretrained is given, the model starts from that CLIP."""
    steps = args.toy_clip_steps or toy.CLIP_STEPS
    if rank == 0:
        if args.pretrained is None:
            toy.prepare(args.data_root, steps, *args.toy_images, seed=args.toy_seed)
        else:
            toy.generate_world(args.data_root, *args.toy_images, seed=args.toy_seed)
    if world > 1:
        dist.barrier()
    if args.pretrained is None:
        args.pretrained = str(toy.clip_path(args.data_root, steps, args.toy_seed).resolve())


# ----------------------------------------------------------------------------- schedule, checkpoints

def lr_lambda(args):
    """Poly decay (power 0.9) to min_lr, times mmcv's linear warm-up from warmup_ratio."""
    def f(step):
        poly = (1 - step / args.iters) ** args.poly_power * (1 - args.min_lr / args.lr) + args.min_lr / args.lr
        warm = 1 - (1 - step / args.warmup) * (1 - args.warmup_ratio) if step < args.warmup else 1.0
        return poly * warm
    return f


def load_checkpoint(path, cfg, resume: bool):
    """Loads `path` (one-line error if it is not a checkpoint) and checks it was made for the same model
    config; the authors' quirk fields and a stored CLIP come from the checkpoint. Returns (ckpt, cfg)."""
    ckpt = read_checkpoint(path)
    cfg = replace(cfg, **{k: ckpt['config'][k] for k in ARCHITECTURE_QUIRKS if k in ckpt['config']})
    free = {'pretrained', 'fp32_inference'} | (set() if resume else {'trusty', 'trusty_learner', 'prompt_dropout',
                                                                       'dropout', 'templates', 'imagenet_mean_std'})
    theirs = {k: v for k, v in ckpt['config'].items() if k not in free}
    ours = {k: v for k, v in asdict(cfg).items() if k not in free}
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        raise SystemExit(f'{path}: made for another model config (checkpoint vs now: {diff})')
    return ckpt, cfg


def rng_state():
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    if torch.cuda.is_available() and state['cuda']:
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- main

def get_args(argv=None):
    return parse_args(argv, description=__doc__.split('\n\n')[0])


def main(argv=None):
    """train(...); a DatasetError (a bad file, met by any rank or loader worker) ends it with one line."""
    args = get_args(argv)
    try:
        return train(args)
    except DatasetError as e:
        raise agreed_exit(e) from None


def train(args):
    """This process, then each job of the run (one; transductive: two phases). Returns the last
    job's metrics."""
    rank, world, device = setup_process(args)
    for job in jobs(args):
        metrics = train_job(job, rank, world, device)
    if world > 1:
        dist.destroy_process_group()
    return metrics


def train_job(args, rank, world, device):
    """One job top-down: its seeds and run folder, the checkpoint it starts from, the data, the model
    and its optimiser; then train_step until --iters (a phase 1: half-way), with evaluate_and_save
    every --eval-every steps."""
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    out_dir = Path(args.out_dir)
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        record_recipe(args, world)
    classes, unseen = class_split(args)
    seen = [c for c in classes if c not in unseen]
    resume, ckpt, cfg = open_checkpoint(args, model_config(args), out_dir, world)
    train_set, val_set = open_datasets(args)
    clip_state = ckpt.get('clip') if ckpt is not None else None  # a stored CLIP (random or converted) is reused
    model, criterion, optimizer, scheduler, scaler, amp = build_model_and_optimizer(args, cfg, clip_state, device)
    step, best, metrics = 0, -math.inf, None
    if ckpt is not None:
        step, best = restore(args, ckpt, resume, rank, model, optimizer, scheduler, scaler)
        metrics = ckpt.get('metrics') if resume else None  # a run resumed at its end still reports them
    # the last ATM layer's query update (out_proj, FFN, norms) never reaches the loss (only its mask
    # logits do, as in the authors' code): the same parameters are unused every step, a static graph;
    # with gradient accumulation (no_sync, which a static graph does not allow) DDP finds them each step
    accumulate = bool(args.micro_batch) and args.micro_batch < args.batch_size // world
    ddp = DistributedDataParallel(model, static_graph=not accumulate, find_unused_parameters=accumulate) \
        if world > 1 else model
    loader, val_loader = make_loaders(args, train_set, val_set, model, rank, world, device, step)
    vocab = classes if args.setting == 'transductive' else seen  # self-training: every class by name
    text, luts = model.encode_text(vocab), label_luts(classes, unseen, vocab, device)
    unseen_ids = [classes.index(c) for c in unseen] if args.setting == 'transductive' else []
    run_eval, state = make_eval_and_state(args, cfg, clip_state, model, criterion, optimizer, scheduler, scaler,
                                          amp, classes, seen, unseen, val_loader, world)

    model.train()
    log = open_log(out_dir / 'log.jsonl', step) if is_main() else None
    phase = f' phase {args.phase}' if args.phase else ''
    bar = tqdm(total=args.stop_at, initial=step, desc=f'train{phase}', disable=not is_main(), dynamic_ncols=True)
    start_step, train_time, t0 = step, 0.0, time.time()  # it/s: this run's steps, no evaluation
    for images, labels in lockstep(loader, device):
        if step >= args.stop_at:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        losses = train_step(ddp, criterion, optimizer, scaler, scheduler, amp, images, labels, text, luts,
                            unseen_ids, step, args.micro_batch)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.stop_at:
            log_losses(losses, step, scheduler.get_last_lr()[0], (step - start_step) / (train_time + time.time() - t0),
                       bar, log)
        if step % args.eval_every == 0 or step == args.stop_at:
            train_time += time.time() - t0
            metrics, best = evaluate_and_save(args, step, best, metrics, val_set, run_eval, state, out_dir, log)
            t0 = time.time()
    bar.close()
    if metrics is None and val_loader is not None:  # resumed at the end from a checkpoint without metrics
        metrics = run_eval()
    if is_main() and metrics is not None:
        print(format_table(metrics))
        write_json({k: v for k, v in metrics.items() if k != 'confusion'} | {'step': step}, out_dir / 'metrics.json')
        print(f'checkpoints and metrics.json in {out_dir}')
    if world > 1:
        dist.barrier()  # phase 2 reads phase 1's last.pt: every rank waits for rank 0 to have written it
    return metrics


def setup_process(args):
    """torchrun's process group (every job's batch must divide over it), CPU threads, the toy world
    (rank 0 makes it). Returns (rank, world size, device)."""
    rank, world, device = setup_distributed()
    batches = {'--batch-size': args.batch_size} | ({'--phase2-batch-size': args.phase2_batch_size}
                                                    if args.setting == 'transductive' else {})
    for flag, batch in batches.items():
        if batch % world:
            raise SystemExit(f'{flag} {batch} does not divide over {world} processes')
        if args.micro_batch and (batch // world) % args.micro_batch:
            raise SystemExit(f'--micro-batch {args.micro_batch} does not divide the {batch // world} images '
                             f'({flag}) of each of the {world} processes')
    if device.type == 'cuda':  # fp32 matmuls and convolutions in TF32, as the authors' torch 1.10 ran them
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == 'cpu' and args.threads:
        torch.set_num_threads(args.threads)  # an explicit --threads holds for the toy CLIP pretraining too
    if args.dataset == 'toy':
        prepare_toy(args, rank, world)  # otherwise its tiny-CLIP pretraining (no data workers) takes every core
    if device.type == 'cpu':
        torch.set_num_threads(args.threads or cpu_threads(args.workers))
    args.pretrained = args.pretrained or 'openai'
    return rank, world, device


def record_recipe(args, world):
    """config.json in the run folder: every flag's final value and what the run resolved from them;
    a short summary on the console."""
    per_rank = args.batch_size // world
    micro = args.micro_batch or per_rank
    resolved = {'world_size': world, 'per_process_batch': per_rank, 'micro_batch': micro,
                'accumulation_steps': per_rank // micro, 'normalize': args.normalize,
                'precision': 'fp32' if args.amp == 'off' else f'{args.amp} autocast', 'photometric': args.photometric,
                'torch': torch.__version__, 'open_clip': open_clip.__version__}
    write_json({'args': vars(args), 'resolved': resolved}, Path(args.out_dir) / 'config.json')
    steps = f'{args.stop_at} of {args.iters}' if args.stop_at != args.iters else f'{args.iters}'
    phase = f' (phase {args.phase})' if args.phase else ''
    print(f"{args.dataset} {args.setting}{phase}: {steps} steps of {args.batch_size} images ({world} x {per_rank}, "
          f"micro-batch {micro}), lr {args.lr:g}, {resolved['precision']}, {args.normalize} mean/std, "
          f"photometric {args.photometric}; config.json in {args.out_dir}")


def open_checkpoint(args, cfg, out_dir, world):
    """The checkpoint to start from: --resume (a path, or 'auto': out_dir/last.pt if there is one) or
    --init-from. Returns (resume path or None, checkpoint or None, cfg with the checkpoint's quirks)."""
    resume = str(out_dir / 'last.pt') if args.resume == 'auto' else args.resume
    if resume and args.resume == 'auto' and not os.path.isfile(resume):
        resume = None  # nothing to resume yet: a fresh run
    if world > 1:  # a rank that resumed and one that did not would train on different schedules
        found = [None] * world
        dist.all_gather_object(found, resume is not None)
        if len(set(found)) > 1:
            raise agreed_exit(f"{out_dir / 'last.pt'}: found by ranks {[r for r, f in enumerate(found) if f]} only; "
                              '--out-dir must be on storage that every node shares')
    ckpt = None
    if resume or args.init_from:
        ckpt, cfg = load_checkpoint(resume or args.init_from, cfg, bool(resume))
    return resume, ckpt, cfg


def open_datasets(args):
    """(train set, val set or None with --no-eval); a bad root or split file fails here, on every rank,
    before any long work."""
    try:
        train_set = build_dataset(args.dataset, args.data_root, 'train')
        train_set.check_files(sizes=args.dataset == 'folder')  # a folder of one's own: label sizes too
        val_set, error = None if args.no_eval else build_dataset(args.dataset, args.data_root, 'val'), None
    except DatasetError as e:
        error = str(e)
    if (error := first_error(error)) is not None:
        raise DatasetError(error)
    return train_set, val_set


def build_model_and_optimizer(args, cfg, clip_state, device):
    """(model, criterion, optimizer, scheduler, scaler, amp dtype or None)."""
    model = build_model(cfg, clip_state).to(device)
    criterion = TagCLIPLoss(cfg.trusty, args.trusty_loss, args.ignore_mode, args.aux_loss,
                             args.weight_focal, args.weight_dice, args.weight_trusty, args.trusty_alpha)
    optimizer = torch.optim.AdamW(model.param_groups(args.lr, args.weight_decay, args.exempt_norms))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    amp = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return model, criterion, optimizer, scheduler, scaler, amp


def restore(args, ckpt, resume, rank, model, optimizer, scheduler, scaler):
    """Loads the checkpoint's weights; on --resume also the optimiser, schedule, scaler and this rank's
    RNG states. Returns (step, best score)."""
    step, best = 0, -math.inf
    missing, unexpected = model.load_trainable_state_dict(ckpt['model'], strict=bool(resume))
    if (missing or unexpected) and is_main():  # e.g. TagCLIP from ZegCLIP: the trusty token starts fresh
        print(f'--init-from {args.init_from}: not in it, initialised here: {missing}; not used here: {unexpected}')
    if resume:
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        scaler.load_state_dict(ckpt['scaler'])
        step, best = ckpt['step'], ckpt['best']
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
    return step, best


def make_loaders(args, train_set, val_set, model, rank, world, device, step):
    """The endless, seeded training loader from `step` on (this rank's share of the global batch), and
    the evaluation loader (None without a val set) whose workers persist between evaluations."""
    per_rank = args.batch_size // world
    transform = train_transform(model.mean, model.std, args.crop, scale=(4 * args.crop, args.crop),
                                ratio_range=tuple(args.ratio_range), cat_max_ratio=args.cat_max_ratio,
                                photometric=args.photometric == 'on')
    train_set.transform = transform
    loader = torch.utils.data.DataLoader(
        SeededSamples(train_set, args.seed), batch_size=per_rank, num_workers=args.workers,
        sampler=TrainSampler(train_set, rank, world, args.seed, per_rank, step), drop_last=True,
        pin_memory=device.type == 'cuda', persistent_workers=args.workers > 0,
        generator=torch.Generator())  # keeps the global RNG (dropout) independent of the loader
    val_loader = None
    if val_set is not None:
        val_set.transform = eval_transform(model.mean, model.std, DATASETS[args.dataset].eval_short)
        val_loader = eval_loader(val_set, args.workers, persistent=True)  # workers kept between evaluations
    return loader, val_loader


def make_eval_and_state(args, cfg, clip_state, model, criterion, optimizer, scheduler, scaler, amp,
                        classes, seen, unseen, val_loader, world):
    """run_eval(): the metrics of the model now on the val set; state(step, best, metrics): the
    checkpoint dict of the run now (every rank's RNG states gathered)."""
    def run_eval():
        m = evaluate(model, val_loader, classes, [c in seen for c in classes],
                     mode='slide', crop=args.crop, stride=default_stride(args.crop), polarity=criterion.polarity,
                     calibration=(CALIBRATION if args.setting == 'inductive' else 0.0) if args.calibration is None else args.calibration,
                     trusty_weighting=True, amp=amp)
        model.train()
        return m

    def state(step, best, metrics=None):
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        # the frozen CLIP goes in too where `pretrained` cannot rebuild it (random weights, or stored ones)
        return make_checkpoint(model, {'dataset': args.dataset, 'names': classes, 'seen': seen, 'unseen': unseen},
                               args.setting, criterion.polarity, vars(args),
                               store_clip=cfg.pretrained is None or clip_state is not None,
                               optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                               scaler=scaler.state_dict(), step=step, best=best, rng=rngs, metrics=metrics)
    return run_eval, state


def train_step(ddp, criterion, optimizer, scaler, scheduler, amp, images, labels, text, luts, unseen_ids, step,
               micro_batch=None):
    """One optimiser step on a batch in the step's vocabulary (its text embeddings and label LUTs);
    unseen_ids: where the transductive phase 2 pseudo-labels the unseen pixels (else []).
    micro_batch: forward and backward this many images at a time, gradients accumulated (synced
    across ranks on the last), the summed loss divided once by the whole batch's mask count: the
    same gradient as one pass. Returns the loss terms; a non-finite one stops the run."""
    parts = list(zip(images.split(micro_batch or len(images)), labels.split(micro_batch or len(images))))
    optimizer.zero_grad(set_to_none=True)
    summed, presents = {}, []
    for i, (x, y) in enumerate(parts):
        last = i == len(parts) - 1
        with nullcontext() if last or not isinstance(ddp, DistributedDataParallel) else ddp.no_sync():
            losses, present = micro_step(ddp, criterion, scaler, amp, x, y, text, luts, unseen_ids, step,
                                         summed=len(parts) > 1)
        if len(parts) > 1:
            summed = {k: summed.get(k, 0) + v.detach() for k, v in losses.items()}
            presents.append(present)
    if len(parts) > 1:  # the losses were sums over masks: one division for the whole batch
        num_masks = criterion.num_masks(torch.cat(presents))
        for group in optimizer.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    p.grad.div_(num_masks)
        losses = {k: v / num_masks for k, v in summed.items()}
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return losses


def micro_step(ddp, criterion, scaler, amp, images, labels, text, luts, unseen_ids, step, summed):
    """Forward and backward of one (micro-)batch. summed: the loss terms as sums over the masks
    (gradient accumulation), else divided by the batch's mask count. Returns (losses, the (B, C) present
    classes when summed, else None: the loss counts its own)."""
    to_vocab, is_unseen = luts
    label, unseen_px = to_vocab[labels], is_unseen[labels]
    device = images.device
    with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
        outputs = ddp(images, text)
    if unseen_ids:
        label = pseudo_label(outputs['pred_masks'], label, unseen_px, unseen_ids)
    C = outputs['pred_masks'].shape[1] - int(criterion.trusty)
    present = criterion.present_classes(label, C) if summed else None  # (B, C)
    losses = criterion(outputs, label, unseen_px if criterion.trusty else None, 1.0 if summed else None)  # num_masks
    bad = [k for k, v in losses.items() if not torch.isfinite(v)]
    if bad:
        raise SystemExit(f'step {step}: non-finite {bad[0]} = {losses[bad[0]].item()}; stopping')
    scaler.scale(losses['loss']).backward()
    return losses, present


def log_losses(losses, step, lr, steps_per_s, bar, log):
    """The loss terms averaged over ranks, on the progress bar and (rank 0) as a line of log.jsonl."""
    logged = reduce_dict({k: v.detach() for k, v in losses.items()})
    bar.set_postfix({k.replace('loss_', ''): f'{v:.3f}' for k, v in logged.items()} | {'lr': f'{lr:.2e}'})
    if log:
        log.write(json.dumps({'step': step, 'lr': lr, **logged, 'it/s': steps_per_s}) + '\n')
        log.flush()


def evaluate_and_save(args, step, best, metrics, val_set, run_eval, state, out_dir, log):
    """Every --eval-every steps: evaluate (unless --no-eval), best.pt when the score did not drop,
    then last.pt. Returns (metrics, best score)."""
    if val_set is not None:
        metrics = run_eval()
        score = metrics['summary']['mIoU' if args.setting == 'fully' else 'hIoU']
        if is_main():
            tqdm.write(f"step {step}: " + '  '.join(f'{k} {v:.2f}' for k, v in metrics['summary'].items()))
            log.write(json.dumps({'step': step, 'eval': strict(metrics['summary'])}, allow_nan=False) + '\n')
            log.flush()
        if args.save_best == 'on' and not score < best:  # NaN (no unseen class) never blocks the first save
            best = score
            ckpt = state(step, best, metrics)
            if is_main():
                save_checkpoint(out_dir / 'best.pt', ckpt)
    ckpt = state(step, best, metrics)
    if is_main():
        save_checkpoint(out_dir / 'last.pt', ckpt)
    return metrics, best


def open_log(path, step):
    """log.jsonl for appending, its lines after `step` dropped first (atomically): a resumed run's
    log reads as the log of one unbroken run."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)['step'] <= step]
        if kept != lines:
            atomic_write(path, lambda tmp: tmp.write_text(''.join(kept)))
    return open(path, 'a')


def reduce_dict(losses):
    """Average logged loss terms over ranks (DETR's reduce_dict); floats on every rank."""
    if dist.is_initialized():
        keys = sorted(losses)
        v = torch.stack([losses[k] for k in keys])
        dist.all_reduce(v)
        losses = dict(zip(keys, v / dist.get_world_size()))
    return {k: v.item() for k, v in losses.items()}


if __name__ == '__main__':
    main()
