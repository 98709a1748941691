"""The checkpoint format of this project, and where the frozen CLIP comes from.

A checkpoint is a plain dict, read with torch.load(weights_only=True) and written atomically:
    config      asdict(TagCLIPConfig)
    model       the trainable tensors (prompts, prompt projection/norm, decoder)
    clip        the frozen CLIP's state dict, only where `config.pretrained` cannot rebuild it
                (random weights, or a converted checkpoint that carries the authors' CLIP)
    classes     {'dataset', 'names', 'seen', 'unseen'}
    setting     'inductive' | 'transductive' | 'fully'
    polarity    what sigmoid(M_A) predicts: 'unseen' (the authors' focal loss) or 'seen'
    args        the command line that made it (vars(args)); train.py adds optimizer, scheduler,
                scaler, step, best, rng and metrics for an exact --resume.
"""

import contextlib
import logging
import os
import pickle
import re
import struct
import zipfile
from dataclasses import asdict

import open_clip
import torch
import torch.nn as nn

from model import TagCLIP, TagCLIPConfig
from runtime import atomic_write

# what evaluate.py and infer.py need from a checkpoint
INFERENCE_KEYS = ('config', 'model', 'classes', 'setting', 'polarity')

# of the four config fields that reproduce the authors' forward (TagCLIPConfig says what each does; convert.py
# turns them all on), the two of the architecture: a --resume or --init-from keeps the checkpoint's (its
# weights were trained with them), while train.py sets the other two from --normalize and --amp
ARCHITECTURE_QUIRKS = ('double_cls_embedding', 'pos_table_grid')

# what torch.load(weights_only=True) raises on a file that is not a readable checkpoint (torch 2.x)
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, IndexError, KeyError, struct.error, OSError)


def load_error(e: BaseException) -> str:
    """One line on why torch.load(weights_only=True) failed; never advises weights_only=False."""
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r'GLOBAL (\S+)', str(e))
        return (f'holds a Python object ({found.group(1)}) that only tensors-and-containers loading refuses'
                if found else 'not a PyTorch checkpoint (unreadable data)')
    if isinstance(e, EOFError):
        return 'empty or truncated file'
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    if isinstance(e, RuntimeError) and 'zip archive' in str(e):
        return 'truncated or corrupt file (its zip archive cannot be read)'
    return f'not a PyTorch checkpoint ({type(e).__name__})'


def read_checkpoint(path, needs=('config', 'model'), what='a checkpoint of this project (train.py, convert.py)',
                    hint: str = '', safe_globals=()):
    """torch.load(path, weights_only=True) as a dict holding `needs`, or a one-line SystemExit naming
    the file and what is wrong with it. `safe_globals`: classes the user chose to trust as well."""
    if os.path.isdir(path):
        raise SystemExit(f'error: {path}: a folder, not a checkpoint file')
    if not os.path.isfile(path):
        raise SystemExit(f'error: {path}: no such file')
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except LOAD_ERRORS as e:
        unsafe = isinstance(e, pickle.UnpicklingError) and 'GLOBAL' in str(e)
        raise SystemExit(f"error: {path}: {load_error(e)}{hint if unsafe else ''}") from None
    if not isinstance(ckpt, dict):
        raise SystemExit(f'error: {path}: not {what} (it holds a {type(ckpt).__name__})')
    missing = [k for k in needs if k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path}: not {what} (no {', '.join(missing)}; "
                         f"it holds {', '.join(map(str, list(ckpt)[:6])) or 'nothing'})")
    if 'config' in needs:
        unknown = set(ckpt['config']) - set(TagCLIPConfig.__dataclass_fields__) if isinstance(ckpt['config'], dict) else {'?'}
        if unknown:
            raise SystemExit(f"error: {path}: not {what} (unknown config fields {sorted(map(str, unknown))[:5]})")
        if not ckpt['config'].get('trusty', True) and not any(k.startswith('trusty_learner.') for k in ckpt['model']):
            ckpt['config']['trusty_learner'] = False  # written when trusty=False implied no Trusty Learner
    return ckpt


def save_checkpoint(path, ckpt: dict):
    """The one writer, atomic: a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def make_checkpoint(model: TagCLIP, classes: dict, setting: str, polarity: str, args: dict, store_clip: bool, **extra):
    """The checkpoint dict of `model` (see the file docstring); `extra`: train.py's resume state,
    convert.py's `converted_from`."""
    clip = {'clip': model.clip.state_dict()} if store_clip else {}
    return dict(config=asdict(model.cfg), model=model.trainable_state_dict(), **clip, classes=classes,
                setting=setting, polarity=polarity, args=args, **extra)


# ----------------------------------------------------------------------------- CLIP

@contextlib.contextmanager
def _quiet_random_init():
    """open_clip logs 'No pretrained weights loaded ... initialized randomly' for an architecture
    whose weights the caller loads next: that line would not be true, so it is held back."""
    logger = logging.getLogger()
    drop = lambda record: 'No pretrained weights loaded' not in record.getMessage()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('constants.pkl') for n in z.namelist())


def load_clip(name: str, pretrained: str | None, weights: bool = True) -> nn.Module:
    """An open_clip model from a tag ('openai'), a local open_clip checkpoint, the OpenAI
    TorchScript file (e.g. ViT-B-16.pt, as the official repos use), or None (random weights).
    Tags whose weights were trained with QuickGELU (OpenAI's) get it. weights=False: the architecture
    only (the caller loads weights a checkpoint stores), nothing is read or downloaded."""
    tag = pretrained if pretrained and not os.path.isfile(pretrained) else None
    quick_gelu = bool(tag) and open_clip.get_pretrained_cfg(name, tag).get('quick_gelu', False)
    if not weights:
        with _quiet_random_init():
            return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    if pretrained and os.path.isfile(pretrained) and _is_torchscript(pretrained):
        with _quiet_random_init():
            clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)  # OpenAI uses QuickGELU
        state = torch.jit.load(pretrained, map_location='cpu').state_dict()
        expected = clip.state_dict()  # drops TorchScript extras (input_resolution, attn_mask, ...)
        clip.load_state_dict({k: v for k, v in state.items() if k in expected})
        return clip
    if pretrained and os.path.exists(pretrained):  # a bad file: one line, not open_clip's traceback
        read_checkpoint(pretrained, needs=(), what='CLIP weights')
    try:
        return open_clip.create_model(name, pretrained=pretrained or None, force_quick_gelu=quick_gelu)
    except RuntimeError as e:
        raise RuntimeError(f"could not load CLIP '{name}' with weights '{pretrained}': {e} "
                           f"(offline? pass a local file, e.g. --pretrained ViT-B-16.pt)") from None


def build_model(cfg: TagCLIPConfig, clip_state: dict | None = None) -> TagCLIP:
    """TagCLIP around a frozen CLIP: from `cfg.pretrained`, or with the weights of `clip_state` as a
    checkpoint stores them (then nothing is read or downloaded; {}: the architecture only)."""
    model = TagCLIP(cfg, load_clip(cfg.clip_model, cfg.pretrained, weights=clip_state is None))
    if clip_state:
        model.clip.load_state_dict(clip_state)
    return model


def load_model(ckpt: dict, pretrained: str | None = None) -> TagCLIP:
    """The model of a train.py or convert.py checkpoint. The frozen CLIP comes from ckpt['clip'] where
    the checkpoint stores it, else from the config's `pretrained`; `pretrained` overrides both."""
    cfg = TagCLIPConfig(**ckpt['config'])
    if pretrained is not None:
        cfg.pretrained = pretrained
    model = build_model(cfg, ckpt.get('clip') if pretrained is None else None)
    model.load_trainable_state_dict(ckpt['model'])
    return model
