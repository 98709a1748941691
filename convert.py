"""Convert the authors' mmcv checkpoints (ZegCLIP's released models, or models trained with the
official TagCLIP code) into a checkpoint of this project that evaluate.py, infer.py and
train.py --init-from read as they read their own. The checkpoint holds the whole frozen CLIP from the
authors' file (nothing is downloaded) and the config fields that reproduce their forward (DESIGN §13):
the class embedding added twice at [CLS], ImageNet mean/std, their 32x32 positional table, fp32.

    python convert.py --input voc_inductive.pth --output zegclip_voc_inductive.pt --dataset voc --setting inductive
"""

import argparse
import importlib
import math
import re

import torch

from data import DATASETS
from checkpoint import build_model, make_checkpoint, read_checkpoint, save_checkpoint
from model import TagCLIPConfig
from runtime import HelpFormatter

# their decoder layer -> ours (DESIGN §13: norm2/norm3 follow the cross-attention and the FFN)
LAYER = {'multihead_attn.q.': 'q_proj.', 'multihead_attn.k.': 'k_proj.', 'multihead_attn.v.': 'v_proj.',
         'multihead_attn.proj.': 'out_proj.', 'linear1.': 'ffn.0.', 'linear2.': 'ffn.3.', 'norm2.': 'norm1.',
         'norm3.': 'norm2.'}
# ViT width and patch size -> open_clip name (the backbones the authors released or configured)
BACKBONES = {(768, 16): 'ViT-B-16', (768, 32): 'ViT-B-32', (1024, 14): 'ViT-L-14'}


def map_keys(sd: dict):
    """Their state_dict -> (ours, dropped keys, layout). Keys their forward never uses are dropped:
    ZegCLIP's per-layer self-attention and norm1, TagCLIP's norm1 after the first layer, the loss buffer."""
    tagclip = 'decode_head.relationship_discriptor.q_proj.weight' in sd
    head = 'decode_head.decoder.layers.' if tagclip else 'decode_head.decoder_1.layers.'
    if not tagclip and 'decode_head.q_proj.weight' not in sd:
        raise ValueError('not a ZegCLIP or TagCLIP checkpoint (no decode_head.q_proj or '
                         'decode_head.relationship_discriptor in its state_dict)')
    ours, dropped = {}, []
    for k, v in sd.items():
        if k in ('backbone.prompt_embeddings', 'backbone.deep_prompt_embeddings'):
            continue  # joined below
        if k.startswith(('backbone.prompt_proj.', 'backbone.prompt_norm.')):
            ours[k[len('backbone.'):]] = v
        elif k.startswith('backbone.'):
            ours['clip.visual.' + k[len('backbone.'):]] = v
        elif k.startswith('text_encoder.'):
            ours['clip.' + k[len('text_encoder.'):]] = v
        elif k in ('decode_head.q_proj.weight', 'decode_head.q_proj.bias'):  # Eq. 4 descriptor (ZegCLIP)
            ours['descriptor.' + k.rsplit('.', 1)[1]] = v
        elif k.startswith('decode_head.relationship_discriptor.q_proj.'):
            ours['descriptor.' + k.rsplit('.', 1)[1]] = v
        elif k == 'decode_head.disc_token':
            ours['trusty_token'] = v
        elif k.startswith(head) and (m := re.match(r'(\d+)\.(.*)', k[len(head):])):
            i, rest = int(m.group(1)), m.group(2)
            new = next((f'decoder.{i}.{o}{rest[len(t):]}' for t, o in LAYER.items() if rest.startswith(t)), None)
            if tagclip and i == 0 and rest.startswith('self_attn.'):
                new = 'trusty_learner.attn.' + rest[len('self_attn.'):]  # Eq. 5 lives in their first layer
            elif tagclip and i == 0 and rest.startswith('norm1.'):
                new = 'trusty_learner.norm.' + rest[len('norm1.'):]
            if new is None and rest.startswith(('self_attn.', 'norm1.')):
                dropped.append(k)
            elif new is None:
                raise ValueError(f'unexpected key {k}')
            else:
                ours[new] = v
        elif k.startswith('decode_head.loss_decode.'):
            dropped.append(k)
        else:
            raise ValueError(f'unexpected key {k}')
    for k in ('backbone.prompt_embeddings', 'backbone.deep_prompt_embeddings'):
        if k not in sd:
            raise ValueError(f'missing key {k}')
    first, deep = sd['backbone.prompt_embeddings'], sd['backbone.deep_prompt_embeddings']  # (1, P, D), (L-1, P, D)
    if first.shape[1:] != deep.shape[1:]:
        raise ValueError(f'backbone.deep_prompt_embeddings has {deep.shape[1]} prompts per layer, '
                         f'backbone.prompt_embeddings {first.shape[1]}')
    ours['prompts'] = torch.cat([first, deep])  # (L, P, D)
    return ours, dropped, 'tagclip' if tagclip else 'zegclip'


def setting_from_meta(meta: dict):
    """'inductive' / 'transductive' / 'fully' from the config file name mmseg stores, else None."""
    name = str(meta.get('exp_name', '')) if isinstance(meta, dict) else ''
    for word, setting in (('fully', 'fully'), ('transductive', 'transductive'), ('_st', 'transductive'),
                          ('inductive', 'inductive'), ('zero', 'inductive')):
        if word in name:
            return setting
    return None


def convert(sd: dict, dataset: str, setting: str, clip_model: str | None = None, pretrained: str = 'openai'):
    """Their state_dict -> (this project's checkpoint dict, dropped keys)."""
    ours, dropped, layout = map_keys(sd)
    for k in ('clip.visual.conv1.weight', 'clip.visual.positional_embedding', 'descriptor.weight'):
        if k not in ours:
            raise ValueError(f'missing key for {k}')
    conv, pos = ours['clip.visual.conv1.weight'], ours['clip.visual.positional_embedding']  # (D, 3, p, p), (1+g*g, D)
    clip_model = clip_model or BACKBONES.get((conv.shape[0], conv.shape[-1]))
    if clip_model is None:
        raise ValueError(f'unknown backbone (width {conv.shape[0]}, patch {conv.shape[-1]}): pass --clip-model')
    g = int(math.sqrt(pos.shape[0] - 1))
    layers = 1 + max(int(k.split('.')[1]) for k in ours if k.startswith('decoder.'))
    info = DATASETS[dataset]
    cfg = TagCLIPConfig(clip_model=clip_model, pretrained=pretrained, n_prompts=ours['prompts'].shape[1],
                        decoder_layers=layers, trusty='trusty_token' in ours, trusty_learner='trusty_learner.norm.weight' in ours,
                        templates=info.templates, double_cls_embedding=True, imagenet_mean_std=True,
                        pos_table_grid=g, fp32_inference=True)
    model = build_model(cfg, clip_state={})  # the architecture only; every weight comes from their file
    expected = model.state_dict()
    for k, v in ours.items():
        if k not in expected:
            raise ValueError(f'unexpected key for {k} (is --clip-model {clip_model} right?)')
        if v.shape != expected[k].shape:
            raise ValueError(f'{k}: shape {tuple(v.shape)} in the file, {clip_model} needs {tuple(expected[k].shape)}')
    missing = [k for k in expected if k not in ours and k != 'clip.logit_scale']  # CLIP's logit scale: unused
    if missing:
        raise ValueError(f'missing key for {missing[0]}' + (f' and {len(missing) - 1} more' if len(missing) > 1 else ''))
    model.load_state_dict(ours, strict=False)
    unseen = [] if setting == 'fully' else list(info.unseen)
    classes = {'dataset': dataset, 'names': list(info.classes), 'seen': [c for c in info.classes if c not in unseen],
               'unseen': unseen}
    ckpt = make_checkpoint(model, classes, setting, 'unseen', {'data_root': None}, store_clip=True, converted_from=layout)
    return ckpt, dropped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--input', required=True, help="the authors' mmcv checkpoint (.pth)")
    p.add_argument('--output', required=True, help='the checkpoint of this project to write')
    p.add_argument('--dataset', default=None, choices=sorted(DATASETS), help="default: from the checkpoint's meta (CLASSES)")
    p.add_argument('--setting', default=None, choices=['inductive', 'transductive', 'fully'],
                   help="default: from the checkpoint's meta (its config file name)")
    p.add_argument('--clip-model', default=None, help='open_clip name of the backbone (default: from the shapes, ViT-B-16)')
    p.add_argument('--allow-global', action='append', default=[], metavar='MODULE.NAME',
                   help="trust this Python class in the file's meta as well (only for a file you trust)")
    args = p.parse_args(argv)

    trusted = [getattr(importlib.import_module(n.rsplit('.', 1)[0]), n.rsplit('.', 1)[1]) for n in args.allow_global]
    raw = read_checkpoint(args.input, needs=('state_dict',), what='an mmcv checkpoint', safe_globals=trusted,
                          hint='; if you trust the file, pass --allow-global with that name')
    meta = raw.get('meta') if isinstance(raw.get('meta'), dict) else {}
    classes = tuple(meta.get('CLASSES') or ())
    dataset = args.dataset or next((n for n, i in DATASETS.items() if classes and len(i.classes) == len(classes)), None)
    setting = args.setting or setting_from_meta(meta)
    if dataset is None or setting is None:
        raise SystemExit(f"error: {args.input}: its meta names no {'dataset' if dataset is None else 'setting'}: "
                         f"pass --dataset and --setting")
    try:
        ckpt, dropped = convert(raw['state_dict'], dataset, setting, args.clip_model)
    except ValueError as e:
        raise SystemExit(f'error: {args.input}: {e}') from None
    save_checkpoint(args.output, ckpt)
    cfg, kinds = ckpt['config'], sorted({re.sub(r'layers\.\d+\.', 'layers.*.', k) for k in dropped})
    print(f"{args.input}: {ckpt['converted_from']} layout, {cfg['clip_model']}, {cfg['n_prompts']} prompts per layer, "
          f"trusty token {'on' if cfg['trusty'] else 'off'}, {dataset} {setting}; dropped {len(dropped)} tensors "
          f"their forward never uses ({', '.join(kinds)})")
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
