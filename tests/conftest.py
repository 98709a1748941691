"""Shared fixtures: a tiny random-weight open_clip ViT, registered as an ordinary open_clip config."""

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)

TINY_CLIP = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 64, 'layers': 2, 'width': 64, 'head_width': 32, 'patch_size': 16},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 1},
}


@pytest.fixture(scope='session', autouse=True)
def tiny_clip(tmp_path_factory):
    """Registers 'tiny_test_clip' (patch 16, 2 layers, d = 32) with open_clip; returns its name."""
    path = tmp_path_factory.mktemp('cfg') / 'tiny_test_clip.json'
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return 'tiny_test_clip'


@pytest.fixture
def tiny_cfg():
    from model import TagCLIPConfig
    return TagCLIPConfig(clip_model='tiny_test_clip', pretrained=None, n_prompts=3, heads=4)
