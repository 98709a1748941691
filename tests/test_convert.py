"""convert.py: a synthetic mmcv checkpoint with exactly the authors' keys (tests/checkpoint_keys, ViT-B/16
names at tiny widths), converted; tensors land where the key map says; the converted model's forward
equals the authors' forward written out by hand; evaluate.py and infer.py run on it; bad files fail."""

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import convert
import infer
from checkpoint import load_model
from data import DATASETS
from evaluate import evaluate_checkpoint

KEYS = Path(__file__).with_name('checkpoint_keys')
# ViT-B/16 shapes -> tiny ones: visual width 768 -> 48 (3 heads of 16), joint/text width 512 -> 32
WIDTH = {768: 48, 2304: 144, 3072: 192, 512: 32, 1536: 96, 2048: 128, 1024: 64}
TINY = {'embed_dim': 32, 'quick_gelu': True,
        'vision_cfg': {'image_size': 64, 'layers': 12, 'width': 48, 'head_width': 16, 'patch_size': 16},
        'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 12}}
MEAN255, STD255 = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])


@pytest.fixture(scope='module', autouse=True)
def tiny_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp('cfg') / 'convert_test_clip.json'
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)


def key_map(layout):
    return json.loads((KEYS / f'{layout}_voc.json').read_text())['keys']


def mmcv_checkpoint(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k['key']: torch.randn([WIDTH.get(n, n) for n in k['shape']], generator=g) * 0.2 for k in key_map(layout)}
    for k in sd:
        if 'norm' in k.rsplit('.', 2)[-2] or 'ln_' in k:  # LayerNorm weights near 1
            sd[k] = sd[k] + (1 if k.endswith('weight') else 0)
    meta = {'CLASSES': DATASETS['voc'].classes, 'exp_name': 'vpt_seg_zero_vit-b_512x512_20k_12_10.py', 'seed': 0}
    return {'meta': meta, 'state_dict': sd, 'optimizer': {'state': {}, 'param_groups': []}}


@pytest.fixture(scope='module', params=['zegclip', 'tagclip'])
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    raw = mmcv_checkpoint(request.param)
    torch.save(raw, d / 'theirs.pth')
    convert.main(['--input', str(d / 'theirs.pth'), '--output', str(d / 'ours.pt'), '--clip-model', 'convert_test_clip'])
    return request.param, raw['state_dict'], d / 'ours.pt'


def test_every_tensor_lands_where_the_key_map_says(converted):
    layout, sd, path = converted
    ckpt = torch.load(path, weights_only=True)
    ours = {**{f'clip.{k}': v for k, v in ckpt['clip'].items()}, **ckpt['model']}
    assert ckpt['config']['trusty'] == (layout == 'tagclip') and ckpt['setting'] == 'inductive'
    assert ckpt['classes']['unseen'] == list(DATASETS['voc'].unseen)
    for k in key_map(layout):
        if k['ours'] is None:
            continue
        target = ours[k['ours']]
        if 'ours_index' in k:  # prompts: [0:1] the first layer's, [1:] the deep ones
            a, b = k['ours_index'].strip('[]').split(':')
            target = target[int(a):int(b) if b else None]
        assert torch.equal(target, sd[k['key']]), k['key']
    dropped = {k['key'] for k in key_map(layout) if k['ours'] is None}
    assert len(ours) == len(key_map(layout)) - len(dropped) - 1 + 1  # prompts: two keys -> one; + logit_scale


def authors_forward(sd, layout, image255, text):
    """Their encoder and head from their own keys: ImageNet normalisation in 0-255 units, [CLS] class
    embedding added twice, their 32x32 table resized to the grid, deep prompts, QuickGELU; ATM layers."""
    b = lambda k: sd['backbone.' + k]
    ln = lambda x, p, eps=1e-5: F.layer_norm(x, x.shape[-1:], b(p + '.weight'), b(p + '.bias'), eps)
    x = (image255 - MEAN255.view(1, 3, 1, 1)) / STD255.view(1, 3, 1, 1)
    x = F.conv2d(x, b('conv1.weight'), stride=16)
    B, D, gh, gw = x.shape
    x = torch.cat([b('class_embedding') + torch.zeros(B, 1, D), x.flatten(2).transpose(1, 2)], 1)
    pos, g = b('positional_embedding'), 32
    grid = F.interpolate(pos[1:].reshape(1, g, g, D).permute(0, 3, 1, 2), size=(gh, gw), mode='bilinear')
    x = ln(x + torch.cat([(pos[0] + b('class_embedding'))[None], grid.reshape(D, -1).T]), 'ln_pre')
    prompts = torch.cat([b('prompt_embeddings'), b('deep_prompt_embeddings')]) @ b('prompt_proj.weight').T + b('prompt_proj.bias')
    P = prompts.shape[1]
    for i in range(12):
        x = torch.cat([x[:, :1], prompts[i].expand(B, -1, -1), x[:, 1:] if i == 0 else x[:, 1 + P:]], 1)
        r = f'transformer.resblocks.{i}.'
        y = ln(x, r + 'ln_1')
        q, k, v = (y @ b(r + 'attn.in_proj_weight').T + b(r + 'attn.in_proj_bias')).chunk(3, -1)
        split = lambda t: t.view(B, -1, D // 16, 16).transpose(1, 2)
        a = (split(q) @ split(k).transpose(-1, -2) / 4).softmax(-1) @ split(v)
        x = x + a.transpose(1, 2).reshape(B, -1, D) @ b(r + 'attn.out_proj.weight').T + b(r + 'attn.out_proj.bias')
        y = ln(x, r + 'ln_2') @ b(r + 'mlp.c_fc.weight').T + b(r + 'mlp.c_fc.bias')
        x = x + (y * torch.sigmoid(1.702 * y)) @ b(r + 'mlp.c_proj.weight').T + b(r + 'mlp.c_proj.bias')
    x = torch.cat([x[:, :1], x[:, 1 + P:]], 1)
    x = F.normalize(ln(ln(x, 'prompt_norm', 1e-6), 'ln_post') @ b('proj'), dim=-1)
    h, E = x[:, 0], x[:, 1:]                                              # (B, d), (B, N, d)
    h_ = lambda k: sd['decode_head.' + k]
    lin = lambda t, p: t @ h_(p + '.weight').T + h_(p + '.bias')
    t = text
    if layout == 'tagclip':
        t = torch.cat([t, h_('disc_token')])
    t = t.expand(B, -1, -1)
    qs = lin(torch.cat([t * h[:, None], t], -1), 'relationship_discriptor.q_proj' if layout == 'tagclip' else 'q_proj')
    head = 'decoder.layers.' if layout == 'tagclip' else 'decoder_1.layers.'
    d = qs.shape[-1]
    nh = lambda t: t.view(B, -1, 8, d // 8).transpose(1, 2)
    if layout == 'tagclip':  # their first layer's self-attention and norm1 (Eq. 5)
        p = head + '0.'
        q, k, v = (qs @ h_(p + 'self_attn.in_proj_weight').T + h_(p + 'self_attn.in_proj_bias')).chunk(3, -1)
        a = (nh(q) @ nh(k).transpose(-1, -2) / math.sqrt(d // 8)).softmax(-1) @ nh(v)
        qs = F.layer_norm(qs + lin(a.transpose(1, 2).reshape(B, -1, d), p + 'self_attn.out_proj'), (d,),
                          h_(p + 'norm1.weight'), h_(p + 'norm1.bias'))
    for layer in range(3):
        p = f'{head}{layer}.'
        logits = nh(lin(qs, p + 'multihead_attn.q')) @ nh(lin(E, p + 'multihead_attn.k')).transpose(-1, -2) / math.sqrt(d // 8)
        a = logits.softmax(-1) @ nh(lin(E, p + 'multihead_attn.v'))
        qs = F.layer_norm(qs + lin(a.transpose(1, 2).reshape(B, -1, d), p + 'multihead_attn.proj'), (d,),
                          h_(p + 'norm2.weight'), h_(p + 'norm2.bias'))
        qs = F.layer_norm(qs + lin(F.relu(lin(qs, p + 'linear1')), p + 'linear2'), (d,), h_(p + 'norm3.weight'), h_(p + 'norm3.bias'))
    return logits.mean(1).view(B, -1, gh, gw)                             # (B, C[+1], gh, gw)


def test_forward_equals_the_authors_by_hand(converted):
    layout, sd, path = converted
    model = load_model(torch.load(path, weights_only=True)).eval()
    image255 = torch.rand(2, 3, 64, 96) * 255
    text = F.normalize(torch.randn(4, 32), dim=-1)
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model((image255 / 255 - mean) / std, text)['pred_masks']
        theirs = authors_forward(sd, layout, image255, text)
    assert ours.shape == theirs.shape == (2, 4 + (layout == 'tagclip'), 4, 6)
    assert torch.allclose(ours, theirs, atol=2e-5), (ours - theirs).abs().max()


def test_evaluate_and_infer_run_on_it(converted, tmp_path):
    _, _, path = converted
    root = tmp_path / 'VOC2012'
    rng = np.random.default_rng(0)
    for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (root / sub).mkdir(parents=True)
    for i in ('a', 'b'):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / 'JPEGImages' / f'{i}.jpg')
        Image.fromarray(rng.integers(0, 21, (40, 56), dtype=np.uint8)).save(root / 'SegmentationClass' / f'{i}.png')
    (root / 'ImageSets/Segmentation/val.txt').write_text('a\nb\n')
    metrics = evaluate_checkpoint(path, data_root=str(root), crop=64, workers=0, progress=False)
    assert metrics['summary']['pAcc'] >= 0 and len(metrics['per_class']) == 20
    summary = infer.main(['--checkpoint', str(path), '--input', str(root / 'JPEGImages'), '--output', str(tmp_path / 'out'),
                          '--classes', 'cat,dog', '--crop', '64', '--short', '64'])
    assert summary['processed'] == 2 and Image.open(tmp_path / 'out' / 'a.jpg.label.png').size == (56, 40)


def test_bad_checkpoints_one_line(tmp_path):
    raw = mmcv_checkpoint('zegclip')
    run = lambda: convert.main(['--input', str(tmp_path / 'x.pth'), '--output', str(tmp_path / 'y.pt'),
                                '--clip-model', 'convert_test_clip'])
    cases = [
        (lambda sd: sd.pop('decode_head.decoder_1.layers.2.linear1.weight'), 'missing key for decoder.2.ffn.0.weight'),
        (lambda sd: sd.update({'backbone.deep_prompt_embeddings': torch.zeros(11, 5, 48)}),
         'deep_prompt_embeddings has 5 prompts per layer, backbone.prompt_embeddings 10'),
        (lambda sd: sd.update({'backbone.prompt_embeddings': torch.zeros(1, 5, 48),
                               'backbone.deep_prompt_embeddings': torch.zeros(10, 5, 48)}), r'prompts: shape \(11, 5, 48\)'),
        (lambda sd: sd.pop('decode_head.q_proj.weight'), 'not a ZegCLIP or TagCLIP checkpoint'),
    ]
    for edit, message in cases:
        sd = dict(raw['state_dict'])
        edit(sd)
        torch.save({**raw, 'state_dict': sd}, tmp_path / 'x.pth')
        with pytest.raises(SystemExit, match=message):
            run()
    (tmp_path / 'x.pth').write_text('not a checkpoint\n')
    with pytest.raises(SystemExit, match='x.pth: not a PyTorch checkpoint'):
        run()
    torch.save({'model': {}}, tmp_path / 'x.pth')
    with pytest.raises(SystemExit, match=r'not an mmcv checkpoint \(no state_dict'):
        run()
    assert not (tmp_path / 'y.pt').exists()
