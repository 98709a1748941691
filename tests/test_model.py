"""model.py: shapes, frozen CLIP, paper Eq. 4-8 and Eq. 12 on hand-checkable tensors."""

import math
from dataclasses import replace

import open_clip
import pytest
import torch
import torch.nn.functional as F

from checkpoint import build_model, load_clip, load_model, make_checkpoint, read_checkpoint
import model as model_py
from model import TEMPLATES, ATMLayer, TagCLIPConfig, TrustyLearner, fused_attention_block, trusty_scores, vit_block


@pytest.mark.parametrize('trusty', [True, False])
@pytest.mark.parametrize('size', [(64, 64), (64, 96)])
def test_shapes(tiny_cfg, trusty, size):
    torch.manual_seed(0)
    model = build_model(replace(tiny_cfg, trusty=trusty, trusty_learner=trusty)).eval()
    text = model.encode_text(['cat', 'dog', 'red car'])
    assert text.shape == (3, 32) and torch.allclose(text.norm(dim=-1), torch.ones(3))
    out = model(torch.randn(2, 3, *size), text)
    H, W = size[0] // 16, size[1] // 16
    assert out['pred_masks'].shape == (2, 3 + trusty, H, W)
    assert [m.shape for m in out['aux_masks']] == [(2, 3 + trusty, H, W)] * 2
    assert (model.trusty_learner is not None) == trusty  # --no-trusty is ZegCLIP: no self-attention


def test_no_trusty_learner_keeps_token(tiny_cfg):
    model = build_model(replace(tiny_cfg, trusty_learner=False))
    assert model.trusty_token is not None and model.trusty_learner is None


def test_self_attention_without_token(tiny_cfg):
    """The authors' VOC transductive phase 2: no trusty token, self-attention across the C class queries."""
    model = build_model(replace(tiny_cfg, trusty=False)).eval()
    assert model.trusty_token is None and model.trusty_learner is not None
    text = model.encode_text(['cat', 'dog', 'red car'])
    assert model(torch.randn(1, 3, 64, 64), text)['pred_masks'].shape == (1, 3, 4, 4)


def test_checkpoint_from_before_the_learner_without_token(tiny_cfg, tmp_path):
    """A checkpoint saved when trusty=False implied no Trusty Learner still loads as ZegCLIP."""
    zeg = build_model(replace(tiny_cfg, trusty=False, trusty_learner=False))
    ckpt = make_checkpoint(zeg, {}, 'inductive', 'unseen', {}, store_clip=True)
    ckpt['config']['trusty_learner'] = True  # as such checkpoints recorded it
    torch.save(ckpt, tmp_path / 'old.pt')
    model = load_model(read_checkpoint(tmp_path / 'old.pt'))
    assert model.trusty_learner is None and model.trusty_token is None


def test_template_ensemble_is_normalised_mean(tiny_cfg):
    model = build_model(replace(tiny_cfg, templates='ensemble')).eval()
    text = model.encode_text(['tree', 'sky'])
    each = model.clip.encode_text(model.tokenizer([t.format('tree') for t in TEMPLATES['ensemble']]), normalize=True)
    assert len(TEMPLATES['ensemble']) == 15
    assert torch.allclose(text[0], F.normalize(each.mean(0), dim=0), atol=1e-6)


def test_truncated_text_tower_equals_open_clip(tiny_cfg):
    model = build_model(tiny_cfg).eval()
    tokens = model.tokenizer(['a photo of a cat', 'This is one wall-concrete in the scene.', 'x'])
    with torch.no_grad():
        assert torch.allclose(model.encode_tokens(tokens), model.clip.encode_text(tokens, normalize=True), atol=1e-5)


def test_only_trainable_parts_change(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).train()
    assert not model.clip.training and model.decoder.training  # frozen CLIP stays in eval mode
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    rest_before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    opt = torch.optim.AdamW(model.param_groups(1e-2, 0.01))
    text = model.encode_text(['a', 'b'])
    out = model(torch.randn(2, 3, 64, 64), text)
    (out['pred_masks'].sum() + sum(m.sum() for m in out['aux_masks'])).backward()
    opt.step()
    assert all(torch.equal(v, clip_before[k]) for k, v in model.clip.state_dict().items())
    changed = {k.split('.')[0] for k, v in model.trainable_state_dict().items() if not torch.equal(v, rest_before[k])}
    assert changed == {'prompts', 'prompt_proj', 'prompt_norm', 'trusty_token', 'descriptor',
                       'trusty_learner', 'decoder'}
    assert all(not p.requires_grad for p in model.clip.parameters())


def test_relationship_descriptor_eq4(tiny_cfg):
    """Eq. 4: the queries are Linear(concat[t' * h, t']) with T' = [text; t_A]."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    seen = {}
    model.descriptor.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    images, text = torch.randn(2, 3, 64, 64), F.normalize(torch.randn(3, 32), dim=-1)
    model(images, text)
    h = model.encode_image(images)[0]                          # (B, d)
    t = torch.cat([text, model.trusty_token])                  # (C+1, d)
    x = torch.stack([torch.cat([t * h[b], t], -1) for b in range(2)])  # (B, C+1, 2d), by hand
    assert torch.allclose(seen['x'], x, atol=1e-6)
    W, b = model.descriptor.weight, model.descriptor.bias
    assert torch.allclose(seen['y'], x @ W.T + b, atol=1e-5)


def test_atm_mask_logits_eq7():
    torch.manual_seed(0)
    layer = ATMLayer(d=8, heads=2).eval()
    q, E = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    _, logits = layer(q, E)
    Q, K = layer.q_proj(q)[0], layer.k_proj(E)[0]              # (3, 8), (5, 8)
    by_hand = torch.zeros(3, 5)
    for head in range(2):
        s = slice(4 * head, 4 * head + 4)
        by_hand += Q[:, s] @ K[:, s].T / math.sqrt(4) / 2
    assert torch.allclose(logits[0], by_hand, atol=1e-6)


def test_trusty_learner_eq5_by_hand():
    """Eq. 5 with one head and identity projections is Norm(softmax(T^ T^T / sqrt(d)) T^ + T^)."""
    layer = TrustyLearner(d=3, heads=1, dropout=0.0).eval()
    with torch.no_grad():
        layer.attn.in_proj_weight.copy_(torch.eye(3).repeat(3, 1))  # W_q = W_k = W_v = I, stacked (9, 3)
        layer.attn.in_proj_bias.zero_()
        layer.attn.out_proj.weight.copy_(torch.eye(3))
        layer.attn.out_proj.bias.zero_()
    assert torch.equal(layer.norm.weight, torch.ones(3)) and torch.equal(layer.norm.bias, torch.zeros(3))
    T = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 2.0]]])  # T^ = [x1; x2], (1, 2, 3)
    # T^ T^T = [[2, 1], [1, 5]], / sqrt(3); a row softmax of [a, b] is [sigmoid(a - b), sigmoid(b - a)]:
    #   row 1: sigmoid(1 / sqrt(3)) = 0.64046, 0.35954      row 2: sigmoid(-4 / sqrt(3)) = 0.09035, 0.90965
    # + shortcut: row 1 = 0.64046 x1 + 0.35954 x2 + x1 = [1.64046, 2, 0.71909] (mean 1.45318, var 0.29099)
    #             row 2 = 0.09035 x1 + 0.90965 x2 + x2 = [0.09035, 2, 3.81931] (mean 1.96988, var 2.31797)
    # Norm: (x - mean) / sqrt(var + 1e-5), e.g. (1.64046 - 1.45318) / 0.53945 = 0.34716
    want = torch.tensor([[[0.34716, 1.01367, -1.36083], [-1.23451, 0.01978, 1.21473]]])
    assert torch.allclose(layer(T), want, atol=1e-4)


def test_atm_eq6_eq7_by_hand():
    """Eq. 6-7 with d = 2 and two heads of width 1: Q = q_proj(T~) = diag(2, 1) T~, K = V = E (identity)."""
    layer = ATMLayer(d=2, heads=2, dropout=0.0).eval()
    with torch.no_grad():
        for proj, w in ((layer.q_proj, torch.diag(torch.tensor([2.0, 1.0]))), (layer.k_proj, torch.eye(2)),
                        (layer.v_proj, torch.eye(2))):
            proj.weight.copy_(w)
            proj.bias.zero_()
    seen = {}
    layer.out_proj.register_forward_hook(lambda m, i, o: seen.update(P=i[0]))
    q = torch.tensor([[[1.0, 2.0]]])                   # T~, one query: Q = [2, 2]
    E = torch.tensor([[[3.0, -1.0], [0.5, 4.0]]])      # two patches
    _, logits = layer(q, E)
    # head 0 (dim 0): 2 x [3, 0.5] / sqrt(1) = [6, 1]; head 1 (dim 1): 2 x [-1, 4] = [-2, 8]; mean [2, 4.5]
    assert torch.allclose(logits, torch.tensor([[[2.0, 4.5]]]), atol=1e-6)
    # P = softmax(Q K^T / sqrt(d/heads)) V per head: head 0 sigmoid(5) = 0.993307: 0.993307 x 3 + 0.006693 x 0.5;
    # head 1 sigmoid(-10) = 4.54e-5: 4.54e-5 x -1 + 0.9999546 x 4
    assert torch.allclose(seen['P'], torch.tensor([[[2.98327, 3.99977]]]), atol=1e-5)


def test_eq12_trusty_scores():
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0]).view(1, 4, 1, 1)   # 3 classes + trusty M_A
    seen = torch.tensor([True, False, True])
    S = torch.sigmoid(torch.tensor([0.0, 2.0, -1.0]))
    a = torch.sigmoid(torch.tensor(1.0))                             # sigmoid(M_A)
    plain = trusty_scores(logits, seen, calibration=0.0, trusty_weighting=False).flatten()
    assert torch.allclose(plain, S)
    calib = trusty_scores(logits, seen, calibration=0.1, trusty_weighting=False).flatten()
    assert torch.allclose(calib, S - torch.tensor([0.1, 0.0, 0.1]))
    # authors' polarity: sigmoid(M_A) = P(unseen), A = 1 - sigmoid(M_A)
    A = 1 - a
    w = trusty_scores(logits, seen, calibration=0.1, trusty_weighting=True).flatten()
    assert torch.allclose(w, torch.stack([(S[0] - 0.1) * A, S[1] * (1 - A), (S[2] - 0.1) * A]))
    # paper's polarity: A = sigmoid(M_A)
    w = trusty_scores(logits, seen, calibration=0.0, trusty_weighting=True, polarity='seen').flatten()
    assert torch.allclose(w, torch.stack([S[0] * a, S[1] * (1 - a), S[2] * a]))
    # no trusty channel: weighting has nothing to weight
    assert torch.allclose(trusty_scores(logits[:, :3], seen, 0.0, True).flatten(), S)


def test_eq12_trusty_scores_literal():
    """Eq. 12 on two pixels with the same class logits [0, 2, -1] and M_A = 1, -1; classes 0 and 2 seen.
    S = sigmoid([0, 2, -1]) = [0.5, 0.88080, 0.26894]; sigmoid(1) = 0.73106, sigmoid(-1) = 0.26894."""
    logits = torch.tensor([[0.0, 0.0], [2.0, 2.0], [-1.0, -1.0], [1.0, -1.0]]).view(1, 4, 1, 2)
    seen = torch.tensor([True, False, True])
    # authors' polarity, A = 1 - sigmoid(M_A) = 0.26894, 0.73106; seen (S - 0.1) A, unseen S (1 - A):
    #   pixel 1: [0.4 x 0.26894, 0.88080 x 0.73106, 0.16894 x 0.26894]
    #   pixel 2: [0.4 x 0.73106, 0.88080 x 0.26894, 0.16894 x 0.73106]
    want = torch.tensor([[0.10758, 0.29242], [0.64391, 0.23688], [0.04544, 0.12351]])
    assert torch.allclose(trusty_scores(logits, seen)[0, :, 0], want, atol=1e-5)
    # paper's polarity, no calibration, pixel 1: A = sigmoid(M_A) = 0.73106; seen S A, unseen S (1 - A):
    #   [0.5 x 0.73106, 0.88080 x 0.26894, 0.26894 x 0.73106]
    got = trusty_scores(logits, seen, calibration=0.0, polarity='seen')[0, :, 0, 0]
    assert torch.allclose(got, torch.tensor([0.36553, 0.23688, 0.19661]), atol=1e-5)


def test_positional_embedding_interpolation(tiny_cfg):
    model = build_model(tiny_cfg)
    pos = model.clip.visual.positional_embedding                 # (1 + 4*4, D)
    assert torch.equal(model.positional_embedding(4, 4), pos)
    p = model.positional_embedding(8, 12)
    assert p.shape == (1 + 96, pos.shape[1]) and torch.equal(p[0], pos[0])
    assert torch.allclose(p[1:].mean(0), pos[1:].mean(0), atol=0.05)  # bilinear keeps the mean roughly


def test_param_groups(tiny_cfg):
    model = build_model(tiny_cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    (group,) = model.param_groups(2e-4, 0.01)
    assert len(group['params']) == len(trainable) and group['lr'] == 2e-4 and group['weight_decay'] == 0.01
    decay, no_decay = model.param_groups(2e-4, 0.01, exempt_norms=True)
    assert no_decay['weight_decay'] == 0.0 and len(decay['params']) + len(no_decay['params']) == len(trainable)
    ids = {id(p) for p in no_decay['params']}
    assert id(model.prompts) in ids and id(model.trusty_token) in ids and id(model.prompt_norm.weight) in ids
    assert id(model.descriptor.weight) not in ids and id(model.descriptor.bias) in ids


def test_trainable_state_dict_roundtrip(tiny_cfg):
    a, b = build_model(tiny_cfg), build_model(tiny_cfg)
    state = a.trainable_state_dict()
    assert not any(k.startswith('clip.') for k in state)
    b.load_trainable_state_dict(state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match='does not match'):
        build_model(replace(tiny_cfg, trusty=False, trusty_learner=False)).load_trainable_state_dict(state)


def test_openai_torchscript_file_loads(tiny_clip, tmp_path):
    """The official repos ship OpenAI's TorchScript ViT-B-16.pt: it must load like a state dict."""
    src = open_clip.create_model(tiny_clip, pretrained=None, force_quick_gelu=True)
    path = tmp_path / 'tiny-openai.pt'
    torch.jit.save(torch.jit.script(src), str(path))
    clip = load_clip(tiny_clip, str(path))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in clip.state_dict().items())
    plain = tmp_path / 'tiny-open_clip.pt'
    torch.save(src.state_dict(), plain)
    assert torch.equal(load_clip(tiny_clip, str(plain)).visual.proj, src.visual.proj)


@pytest.mark.parametrize('name,size', [('ViT-B-16', (224, 160)), ('ViT-L-14', (112, 140))])
def test_real_backbones_random_init(name, size):
    model = build_model(TagCLIPConfig(clip_model=name, pretrained=None)).eval()
    p = model.patch_size
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size), F.normalize(torch.randn(4, model.descriptor.out_features), dim=-1))
    assert out['pred_masks'].shape == (1, 5, size[0] // p, size[1] // p)
    if name == 'ViT-B-16':  # README: learnable parameters of the VOC config (ZegCLIP reports 13.8M)
        n = sum(q.numel() for q in model.parameters() if q.requires_grad)
        assert 10e6 < n < 14e6, n


def test_fp16_text_as_openai_clip(tiny_cfg):
    """precision='fp16' equals OpenAI's recipe built independently: open_clip's copy of OpenAI's
    convert_weights, LayerNorms in fp32, fp16 norms and ensemble mean (the authors' notebook)."""
    import copy

    from open_clip.transformer import LayerNorm, LayerNormFp32
    model = build_model(tiny_cfg).eval()
    ref = copy.deepcopy(model.clip)
    open_clip.convert_weights_to_lp(ref, torch.float16)
    for m in ref.modules():
        if type(m) is LayerNorm:
            m.__class__ = LayerNormFp32
    names = ['cat', 'dog', 'red car']
    for templates in ('single', 'ensemble'):
        rows = []
        for c in names:
            e = ref.encode_text(model.tokenizer([t.format(c) for t in TEMPLATES[templates]]))  # (T, d) fp16
            e = e / e.norm(dim=-1, keepdim=True)
            if len(e) > 1:
                e = e.mean(0, keepdim=True)
                e = e / e.norm(dim=-1, keepdim=True)
            rows.append(e[0])
        ref_emb = torch.stack(rows)
        assert ref_emb.dtype == torch.float16
        fp16 = model.encode_text(names, templates, precision='fp16')
        assert fp16.dtype == torch.float32 and torch.equal(fp16, ref_emb.float())
        fp32 = model.encode_text(names, templates)
        assert 1e-5 < (fp16 - fp32).abs().max() < 5e-3  # ~fp16 rounding, not another embedding
    assert all(p.dtype == torch.float32 for p in model.clip.parameters())  # the live model is untouched
    with pytest.raises(ValueError, match='unknown text precision'):
        model.encode_text(names, precision='bf16')


def test_openai_tag_builds_quick_gelu(monkeypatch):
    """ViT-B-16 + 'openai' (trained with QuickGELU) must build QuickGELU: the download and the weight load
    are intercepted, so the architecture open_clip builds for the tag is checked offline."""
    import open_clip.factory as factory
    tags = []
    monkeypatch.setattr(factory, 'download_pretrained', lambda cfg, **kw: tags.append(cfg) or 'weights.bin')
    monkeypatch.setattr(factory, 'load_checkpoint', lambda model, path, **kw: {})
    clip = load_clip('ViT-B-16', 'openai')
    assert tags and tags[0]['quick_gelu']  # the tag's own config says so
    acts = {type(b.mlp.gelu) for b in [*clip.visual.transformer.resblocks, *clip.transformer.resblocks]}
    assert acts == {open_clip.transformer.QuickGELU}
    assert type(load_clip('ViT-B-16', None).visual.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU


def test_authors_quirks_in_the_image_embedding(tiny_cfg):
    """double_cls_embedding adds the class embedding again at [CLS] only; pos_table_grid keeps a resized
    table whose resize to the window grid is bilinear; imagenet_mean_std changes the normalisation."""
    torch.manual_seed(0)
    plain = build_model(tiny_cfg).eval()
    quirky = build_model(replace(tiny_cfg, double_cls_embedding=True, imagenet_mean_std=True, pos_table_grid=8),
                     clip_state=None)
    v = plain.clip.visual
    assert quirky.clip.visual.positional_embedding.shape == (65, 64)
    quirky.clip.load_state_dict(plain.clip.state_dict() | {'visual.positional_embedding': quirky.clip.visual.positional_embedding})
    images = torch.randn(2, 3, 64, 96)
    x, _ = quirky.embed_patches(images)
    table = quirky.clip.visual.positional_embedding  # (1 + 8*8, D)
    grid = F.interpolate(table[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(4, 6), mode='bilinear')
    tokens = torch.cat([v.class_embedding.expand(2, 1, -1), v.conv1(images).flatten(2).transpose(1, 2)], 1)
    pos = torch.cat([table[:1] + v.class_embedding, grid.flatten(2)[0].T])
    assert torch.allclose(x, v.ln_pre(tokens + pos), atol=1e-6)
    assert quirky.mean == (0.485, 0.456, 0.406) and quirky.std == (0.229, 0.224, 0.225)
    assert plain.mean == open_clip.OPENAI_DATASET_MEAN


MODES = [(mode, ctx) for mode in ('train', 'eval') for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode)]


@pytest.mark.parametrize('name,ls', [('tiny_test_clip', None), ('toy_clip', None), ('ViT-B-16', None),
                                     ('ViT-B-32', None), ('ViT-L-14', None), ('tiny_test_clip', 0.5)])
def test_vit_block_equals_open_clip(name, ls):
    """vit_block computes the attention itself (one q/k/v GEMM, fused SDPA) and equals the block's own
    forward: nn.MultiheadAttention's fast path under no_grad / inference_mode, its SDPA path with grad;
    the block in eval and train mode; one block of each ViT used here, QuickGELU and LayerScale too."""
    from open_clip.model import _build_vision_tower
    torch.manual_seed(0)
    cfg = open_clip.get_model_config(name)
    vision = cfg['vision_cfg'] | {'layers': 1, 'ls_init_value': ls}
    block = _build_vision_tower(cfg['embed_dim'], vision, quick_gelu=ls is None).transformer.resblocks[0]
    block.requires_grad_(False)
    assert fused_attention_block(block)
    used = block.attn.register_forward_hook(lambda *a: pytest.fail('nn.MultiheadAttention ran'))
    x = torch.randn(2, 1 + 3 + 20, block.ln_1.normalized_shape[0])  # (B, 1+Np+N, D)
    for mode, ctx in MODES:
        block.train(mode == 'train')
        with ctx():
            ours = vit_block(block, x)
            used.remove()
            theirs = block(x)
            used = block.attn.register_forward_hook(lambda *a: pytest.fail('nn.MultiheadAttention ran'))
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (mode, ctx.__name__, (ours - theirs).abs().max())


def test_vit_block_falls_back_to_other_blocks():
    """Blocks with extra norms or another attention (open_clip's CustomResidualAttentionBlock: qk-norm,
    ln_attn, scaled heads and MLP; its scaled cosine attention fails in open_clip 3.3 itself) run their
    own forward, bit for bit."""
    from open_clip.transformer import Transformer
    torch.manual_seed(0)
    x = torch.randn(2, 9, 64)
    for kw in ({'qk_norm': True}, {'scale_attn': True, 'scale_heads': True, 'scale_fc': True}):
        block = Transformer(64, 1, 2, **kw).eval().resblocks[0]
        assert not fused_attention_block(block)
        assert torch.equal(vit_block(block, x), block(x))


def test_prompted_vit_equals_open_clip_blocks(tiny_cfg, monkeypatch):
    """TagCLIP with vit_block equals TagCLIP running every frozen block's own forward: mask logits under
    inference_mode (eval) and, in train mode with the same dropout draws, the gradients to the prompts."""
    torch.manual_seed(0)
    model = build_model(replace(tiny_cfg, clip_model='toy_clip'))
    images, text = torch.randn(2, 3, 64, 80), F.normalize(torch.randn(4, 128), dim=-1)

    def run():
        with torch.inference_mode():
            out = model.eval()(images, text)
        torch.manual_seed(1)
        model.train().zero_grad()
        step = model(images, text)
        (step['pred_masks'].square().mean() + sum(m.mean() for m in step['aux_masks'])).backward()
        return out, model.prompts.grad.clone(), model.prompt_proj.weight.grad.clone()

    ours, g_prompts, g_proj = run()
    monkeypatch.setattr(model_py, 'vit_block', lambda block, x, batch_first=True: block(x))
    theirs, g_prompts_ref, g_proj_ref = run()
    for a, b in zip([ours['pred_masks'], *ours['aux_masks']], [theirs['pred_masks'], *theirs['aux_masks']]):
        assert (a - b).abs().max() < 1e-6, (a - b).abs().max()
    for g, ref in ((g_prompts, g_prompts_ref), (g_proj, g_proj_ref)):
        assert g.abs().max() > 0 and (g - ref).abs().max() / ref.abs().max() < 1e-5, (g - ref).abs().max() / ref.abs().max()
