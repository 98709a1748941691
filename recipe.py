"""What train.py trains: the authors' recipe as every dataset's defaults, the command line, the model
config it makes, and the jobs of a run (the transductive setting is the authors' two, DESIGN §6).

Each dataset's defaults: RECIPE (TagCLIP's configs), then its data.py entry's model settings (iters,
crop, n_prompts, templates), then that entry's `recipe`, then what the command line says.
"""

import argparse
from collections import Counter
from dataclasses import fields
from pathlib import Path

import toy
from checkpoint import read_checkpoint
from data import DATASETS, IGNORE_INDEX, DatasetError, dataset_info
from model import TagCLIPConfig
from runtime import HelpFormatter

# The authors' recipe (TagCLIP's configs) for every dataset; strings are formatted with the dataset and
# the setting.
RECIPE = dict(batch_size=16, lr=2e-4, warmup=1500, eval_every=2000, workers=4, trusty_loss='focal',
              ratio_range=(0.5, 2.0), photometric='on', trusty_alpha=0.25, clip_model='ViT-B-16',
              normalize='imagenet', save_best='off', phase2_batch_size=None,
              data_root=None, out_dir='runs/{dataset}-{setting}')


def recipe(dataset):
    """train.py's defaults for `dataset` (before the command line)."""
    info = DATASETS[dataset]
    return {**RECIPE, 'iters': info.iters, 'crop': info.crop, 'n_prompts': info.n_prompts,
            'templates': info.templates, **info.recipe}


def shown_default(key, none='none'):
    """A recipe default as --help shows it, once for every dataset: '(default: 16; toy: 8)': RECIPE's
    value (or else the most common one), then each dataset whose value differs; a None first value
    reads `none` instead of 'default: None'."""
    values = {name: recipe(name)[key] for name in DATASETS}
    common = RECIPE[key] if key in RECIPE else Counter(values.values()).most_common(1)[0][0]
    differ = {}
    for name, value in values.items():
        if value != common:
            differ.setdefault(value, []).append(name)

    def text(v):  # as it is typed on the command line
        return ' '.join(map(text, v)) if isinstance(v, tuple) else f'{v:g}' if isinstance(v, float) else str(v)
    first = none if common is None else f'default: {text(common)}'
    return '(' + '; '.join([first] + [f"{', '.join(names)}: {text(v)}" for v, names in differ.items()]) + ')'


def get_args(argv=None, description=None):
    """train.py's command line, every flag left unset filled in from the dataset's recipe."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument_group('data').add_argument
    a('--dataset', default='toy', choices=sorted(DATASETS),
      help="data.py's DATASETS entry: classes, zero-shot split, folder layout, recipe")
    a('--data-root', help="dataset folder in the dataset's layout (README); the toy world is generated there "
                          + shown_default('data_root', none='required'))
    a('--setting', default='inductive', choices=['inductive', 'transductive', 'fully'],
      help='inductive: zero-shot, unseen pixels ignored; transductive: phase 1 the inductive model for half of '
           '--iters (in OUT/phase1), phase 2 a fresh schedule of the other half that also self-trains on pseudo '
           'labels of the unseen pixels (OUT/phase2; --init-from: phase 2 alone); fully: supervised on every class')
    a('--out-dir', help=f"checkpoints, log.jsonl and metrics.json {shown_default('out_dir')}")
    a('--workers', type=int, help=f"data loader processes per rank {shown_default('workers')}")
    a('--crop', type=int, help=f"train crop {shown_default('crop')}")
    a('--ratio-range', type=float, nargs=2, metavar=('LO', 'HI'),
      help=f"random rescale ratio {shown_default('ratio_range')}")
    a('--cat-max-ratio', type=float, default=0.75, help='crop retries while one class covers more')
    a('--photometric', choices=['on', 'off'],
      help=f"mmseg's photometric distortion {shown_default('photometric')}")
    a('--normalize', choices=['imagenet', 'clip'],
      help=f"input mean/std: ImageNet's (the authors') or CLIP's own; stored in the checkpoint "
           f"{shown_default('normalize')}")
    a = p.add_argument_group('model').add_argument
    a('--clip-model', help=f"open_clip ViT {shown_default('clip_model')}")
    a('--pretrained', help="open_clip tag, checkpoint file or 'none' (random) "
                           "(default: openai; toy: the tiny CLIP pretrained on the toy world, cached in --data-root)")
    a('--n-prompts', type=int, help=f"deep prompts per layer {shown_default('n_prompts')}")
    a('--decoder-layers', type=int, default=3, help='ATM decoder layers')
    a('--heads', type=int, default=8, help='attention heads of the decoder and the Trusty Learner')
    a('--dropout', type=float, default=0.1, help='decoder dropout')
    a('--prompt-dropout', type=float, default=0.1, help='dropout on the deep visual prompts')
    a('--trusty', default='auto', choices=['auto', 'on', 'off', 'no-token'],
      help='trusty token and Trusty Learner; no-token: the self-attention across the class queries only '
           '(auto: on, except no-token in VOC transductive phase 2, off fully supervised on VOC/toy)')
    a('--no-trusty', dest='trusty', action='store_const', const='off', help='= --trusty off: exactly ZegCLIP')
    a('--no-trusty-learner', action='store_true', help='keep the token, drop the self-attention (Tab. 1b)')
    a('--templates', choices=['single', 'ensemble'], help=f"prompt templates {shown_default('templates')}")
    a = p.add_argument_group('loss').add_argument
    a('--trusty-loss', choices=['focal', 'dice', 'balanced'],
      help="focal: authors' code; dice: paper Eq. 10; balanced: dice on seen and on unseen + BCE "
           + shown_default('trusty_loss'))
    a('--ignore-mode', default='negative', choices=['negative', 'exclude'], help='label-255 pixels')
    a('--aux-loss', action='store_true', help='deep supervision of the earlier decoder layers')
    a('--weight-focal', type=float, help="weight of the focal loss of the class masks (default: 20, TagCLIP's "
                                         "configs; 100 with --no-trusty / --trusty off, ZegCLIP's)")
    a('--weight-dice', type=float, default=1.0, help='weight of the dice loss of the class masks')
    a('--weight-trusty', type=float, default=10.0, help='weight of the trusty-map loss')
    a('--trusty-alpha', type=float,
      help=f"focal alpha of the trusty map's unseen pixels {shown_default('trusty_alpha')}")
    a = p.add_argument_group('optimisation').add_argument
    a('--iters', type=int, help=f"train iterations {shown_default('iters')}")
    a('--batch-size', type=int, help=f"global batch, split over ranks {shown_default('batch_size')}")
    a('--phase2-batch-size', type=int, help='global batch of the transductive phase 2 '
                                            + shown_default('phase2_batch_size', none='default: --batch-size'))
    a('--micro-batch', type=int, help='images per forward and backward on each rank; the rest of its share of '
                                      'the batch is gradient accumulation, the same gradient (default: its whole share)')
    a('--lr', type=float, help=f"AdamW lr for every trainable parameter {shown_default('lr')}")
    a('--weight-decay', type=float, default=0.01, help='AdamW weight decay')
    a('--exempt-norms', action='store_true', help='no weight decay on norms, biases, prompts, t_A')
    a('--warmup', type=int, help=f"linear warm-up iterations {shown_default('warmup')}")
    a('--warmup-ratio', type=float, default=1e-6, help='the warm-up starts at this fraction of the lr')
    a('--poly-power', type=float, default=0.9, help='power of the poly decay after the warm-up')
    a('--min-lr', type=float, default=1e-6, help='the lr the poly decay ends at')
    a('--amp', default='off', choices=['off', 'bf16', 'fp16'],
      help="off: fp32 (TF32 matmuls on CUDA, as the authors' runs); bf16 / fp16 autocast: faster, "
           "not compared with the paper's numbers yet")
    a('--seed', type=int, default=0, help='training seed (rank r: seed + r; the augmentation: seed, epoch, index)')
    a('--threads', type=int, default=0, help='CPU: torch threads per process (0: the cores the data workers leave free)')
    a = p.add_argument_group('run').add_argument
    a('--eval-every', type=int, help=f"evaluate and checkpoint every N steps {shown_default('eval_every')}")
    a('--log-every', type=int, default=20, help='log the losses every N steps')
    a('--resume', help="checkpoint to continue exactly, or 'auto' (latest in --out-dir)")
    a('--init-from', help='start from these weights with a fresh schedule (transductive: phase 2 alone, from any '
                          'inductive checkpoint of the same dataset)')
    a('--calibration', type=float, help='seen-score calibration at evaluation (default: 0.1 inductive, else 0)')
    a('--no-eval', action='store_true', help='skip evaluation (checkpoints only)')
    a('--save-best', choices=['on', 'off'],
      help='also keep best.pt, the checkpoint of the best validation hIoU (mIoU fully supervised); on VOC and '
           "COCO-Stuff 'val' is the test set, so a number chosen this way is biased; the reported metrics are "
           f"always the final model's {shown_default('save_best')}")
    a('--toy-clip-steps', type=int, help=f'toy world: tiny CLIP pretraining steps (default: {toy.CLIP_STEPS})')
    a('--toy-images', type=int, nargs=2, default=(5000, 500), metavar=('TRAIN', 'VAL'),
      help='toy world: train and val images')
    a('--toy-seed', type=int, default=0, help='toy world: seed of the generated images and of the tiny CLIP')
    return apply_defaults(p.parse_args(argv))


def apply_defaults(args):
    """The dataset's recipe for every flag left unset, then the two rules of --weight-focal and
    --trusty auto; a real dataset needs --data-root."""
    for k, v in recipe(args.dataset).items():
        if getattr(args, k) is None:
            setattr(args, k, v.format(dataset=args.dataset, setting=args.setting) if isinstance(v, str) else v)
    if args.weight_focal is None:  # before 'auto' resolves: only an explicit --no-trusty trains as ZegCLIP did
        args.weight_focal = 100.0 if args.trusty == 'off' else 20.0
    if args.trusty == 'auto' and args.setting != 'transductive':  # transductive: per phase (jobs)
        args.trusty = 'off' if args.setting == 'fully' and args.dataset != 'coco_stuff' else 'on'
    args.phase2_batch_size = args.phase2_batch_size or args.batch_size
    args.phase, args.stop_at = None, args.iters  # jobs() sets them for the transductive phases
    if args.data_root is None:
        raise SystemExit(f'--data-root is required for --dataset {args.dataset}')
    return args


def model_config(args):
    """TagCLIPConfig from the flags of the same names; --trusty (on: token and Trusty Learner; no-token:
    the self-attention only; off: neither), --no-trusty-learner and --pretrained 'none' translated."""
    kw = {f.name: getattr(args, f.name) for f in fields(TagCLIPConfig) if hasattr(args, f.name)}
    kw.update(pretrained=None if args.pretrained == 'none' else args.pretrained, trusty=args.trusty == 'on',
              trusty_learner=args.trusty in ('on', 'no-token') and not args.no_trusty_learner,
              imagenet_mean_std=args.normalize == 'imagenet',
              fp32_inference=args.amp == 'off')
    return TagCLIPConfig(**kw)


def class_split(args):
    """(training dataset's class names, unseen names) for the setting; fully supervised: none unseen."""
    info = dataset_info(args.dataset, args.data_root)  # a folder dataset: its classes.txt and unseen.txt
    if len(info.classes) >= IGNORE_INDEX:
        raise DatasetError(f'{args.data_root}: {len(info.classes)} classes; training takes fewer than {IGNORE_INDEX} '
                           f'(label {IGNORE_INDEX} is ignore)')
    return list(info.classes), ([] if args.setting == 'fully' else list(info.unseen))


def jobs(args):
    """What the run trains: itself, or the authors' two transductive jobs (DESIGN §6). Phase 1, in
    OUT/phase1: the inductive model (trusty token on), its poly schedule over --iters stopped half-way.
    Phase 2, in OUT/phase2: from phase 1's last.pt, a fresh warm-up + poly schedule over the other half
    that self-trains on all classes, at --phase2-batch-size; VOC's model drops the trusty token and keeps
    the self-attention across the class queries. --init-from (or a phase-2 checkpoint to resume) starts
    at phase 2."""
    if args.setting != 'transductive':
        return [args]
    out, auto = Path(args.out_dir), args.trusty == 'auto'
    phase2 = argparse.Namespace(**{**vars(args), 'phase': 2, 'out_dir': str(out / 'phase2'),
                                   'iters': args.iters - args.iters // 2, 'batch_size': args.phase2_batch_size,
                                   'trusty': ('no-token' if args.dataset == 'voc' else 'on') if auto else args.trusty})
    phase2.stop_at = phase2.iters
    started = Path(phase2.out_dir, 'last.pt').is_file() if args.resume == 'auto' else \
        bool(args.resume) and read_checkpoint(args.resume)['args'].get('phase') == 2
    if args.init_from or started:
        return [phase2]
    phase1 = argparse.Namespace(**{**vars(args), 'phase': 1, 'setting': 'inductive', 'out_dir': str(out / 'phase1'),
                                   'stop_at': args.iters // 2, 'trusty': 'on' if auto else args.trusty})
    phase2.init_from, phase2.resume = str(out / 'phase1' / 'last.pt'), args.resume and 'auto'
    return [phase1, phase2]
