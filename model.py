"""TagCLIP: a frozen CLIP with deep visual prompts, a trusty token and an ATM segmentor.

Paper: "TagCLIP: Improving Discrimination Ability of Open-Vocabulary Semantic Segmentation"
(arXiv 2304.07547). The contract we follow is docs/DESIGN.md (DESIGN §n); this file implements
  - the frozen CLIP text encoder with prompt templates (DESIGN §1),
  - the frozen CLIP ViT with deep visual prompt tuning (DESIGN §2),
  - the trusty token t_A and the relationship descriptor, paper Eq. 4 (DESIGN §3),
  - the Trusty Learner, Eq. 5 (DESIGN §4),
  - the Attention-to-Mask (ATM) segmentor, Eq. 6-8 (DESIGN §5),
  - the inference scores of Eq. 12 (DESIGN §7): `trusty_scores`.
Where the code departs from a printed equation, that equation's docstring says so in a "Departure:" line.
Shapes: B images, C classes, N = (H/p)(W/p) patches, D visual width, d joint (text/image) width,
L ViT layers, Np prompts per layer.
"""

import copy
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.transformer import ResidualAttentionBlock

# the tiny CLIP of the offline toy world (toy.py) is an ordinary open_clip config: 'toy_clip'
if Path(__file__).with_name('toy_clip.json').exists():
    open_clip.add_model_config(Path(__file__).with_name('toy_clip.json'))

# DESIGN §1: VOC and the toy world embed one template; COCO-Stuff and Context a 15-template ensemble.
TEMPLATES = {
    'single': ('a photo of a {}',),
    'ensemble': (
        'a photo of a {}.', 'a photo of a small {}.', 'a photo of a medium {}.', 'a photo of a large {}.',
        'This is a photo of a {}.', 'This is a photo of a small {}.', 'This is a photo of a medium {}.',
        'This is a photo of a large {}.', 'a {} in the scene.', 'a photo of a {} in the scene.',
        'There is a {} in the scene.', 'There is the {} in the scene.', 'This is a {} in the scene.',
        'This is the {} in the scene.', 'This is one {} in the scene.'),
}


@dataclass
class TagCLIPConfig:
    """The model. The last four fields follow the authors' code (DESIGN §11, §13, §16):
    double_cls_embedding: their image encoder adds the class embedding a second time at [CLS]
        (converted checkpoints only);
    imagenet_mean_std: inputs normalised with ImageNet's mean/std, not CLIP's (their recipe: train.py's
        default on the real datasets, --normalize; converted checkpoints);
    pos_table_grid: their positional table was resized once to this grid (32) when they loaded CLIP,
        then to each window's grid (0: CLIP's own table; converted checkpoints only);
    fp32_inference: trained (or, converted, evaluated) in fp32: evaluate.py/infer.py take --amp auto as off."""
    clip_model: str = 'ViT-B-16'        # any open_clip ViT name ('toy_clip' for the toy world)
    pretrained: str | None = 'openai'   # open_clip tag, a local checkpoint file, or None (random init)
    n_prompts: int = 10                 # deep visual prompts per layer (100 for COCO-Stuff)
    decoder_layers: int = 3             # ATM layers
    heads: int = 8
    trusty: bool = True                 # trusty token t_A (False, with trusty_learner False: ZegCLIP)
    trusty_learner: bool = True         # self-attention across the queries (Eq. 5): C classes [+ t_A]
    prompt_dropout: float = 0.1
    dropout: float = 0.1                # decoder: attention weights, residual branches, FFN
    templates: str = 'single'           # 'single' or 'ensemble' (DESIGN §1)
    double_cls_embedding: bool = False  # the authors' code: see the docstring
    imagenet_mean_std: bool = False
    pos_table_grid: int = 0
    fp32_inference: bool = False


class TrustyLearner(nn.Module):
    """Paper Eq. 5: T~ = Norm(MHSA(T^) + T^). Self-attention across the C class queries and the trusty
    token, so t_A sees every class and its relation to the image (DESIGN §4).
    Departure: Eq. 5 prints one head, no projections; here heads, q/k/v/out projections, dropout (authors' code)."""

    def __init__(self, d: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, q):  # (B, C+1, d)
        return self.norm(q + self.dropout(self.attn(q, q, q, need_weights=False)[0]))


class ATMLayer(nn.Module):
    """Attention-to-Mask layer (SegViT; paper Eq. 6-8): cross-attention from the queries to the patch
    features E, out_proj, residual + LayerNorm, FFN, residual + LayerNorm (DESIGN §5).
    Departure, Eq. 6: Q = q_proj(T~), not T~ (K, V as printed): as paper Eq. 2, SegViT's ATM, the authors' code.
    Departure, Eq. 7: Mask stays logits, the head mean of Q K^T / sqrt(d/heads); the loss and Eq. 12 apply sigmoid.
    Departure, Eq. 8: M_C = M_S x P is never formed; the mask logits are the prediction, as in the authors' code.
    P (out_proj, FFN, norms) only becomes the next layer's queries: the last layer's never reaches the loss."""

    def __init__(self, d: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * d, d))

    def forward(self, q, E):  # q (B, C+1, d) queries, E (B, N, d) patch features
        B, n_q, d = q.shape
        N, heads = E.shape[1], self.heads
        qh = self.q_proj(q).view(B, n_q, heads, d // heads).transpose(1, 2)  # (B, heads, C+1, d/heads)  Eq. 6
        kh = self.k_proj(E).view(B, N, heads, d // heads).transpose(1, 2)    # (B, heads, N, d/heads)
        vh = self.v_proj(E).view(B, N, heads, d // heads).transpose(1, 2)    # (B, heads, N, d/heads)
        logits = qh @ kh.transpose(-2, -1) / math.sqrt(d // heads)           # (B, heads, C+1, N)      Eq. 7
        x = self.attn_dropout(logits.softmax(-1)) @ vh                       # (B, heads, C+1, d/heads)
        x = self.out_proj(x.transpose(1, 2).reshape(B, n_q, d))              # (B, C+1, d)
        q = self.norm1(q + self.dropout1(x))
        q = self.norm2(q + self.dropout2(self.ffn(q)))  # P; unused after the last layer (train.py: static_graph)
        return q, logits.mean(1)                        # (B, C+1, d), (B, C+1, N) mask logits


class TagCLIP(nn.Module):
    """TagCLIP (paper §3.2-3.4): a frozen CLIP whose ViT carries deep visual prompts, text embeddings T
    extended by the trusty token t_A, the relationship descriptor (Eq. 4), the Trusty Learner (Eq. 5)
    and the ATM segmentor (Eq. 6-8). forward: images (B, 3, H, W) and T (C, d) from `encode_text` ->
    mask logits at the patch grid, C raw class maps M_R then the trusty map M_A; sigmoid is applied by
    the loss (losses.py, Eq. 9-11) and by `trusty_scores` (Eq. 12). Only prompts and decoder train."""

    def __init__(self, cfg: TagCLIPConfig, clip: nn.Module):
        """clip: the open_clip model to freeze (checkpoint.build_model makes it from cfg.pretrained)."""
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        if cfg.pos_table_grid:  # authors' quirk: their positional table, resized once when they loaded CLIP
            clip.visual.positional_embedding = nn.Parameter(self.positional_embedding(cfg.pos_table_grid, cfg.pos_table_grid))
        self.clip.requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.clip_model)
        visual = self.clip.visual
        if getattr(visual, 'attn_pool', None) is not None or not hasattr(visual, 'conv1'):
            raise ValueError(f"{cfg.clip_model}: only open_clip ViTs with a [CLS] token are supported")
        D = visual.conv1.out_channels
        L = len(visual.transformer.resblocks)
        d = visual.proj.shape[1] if visual.proj is not None else D
        self.patch_size = visual.conv1.kernel_size[0]

        # DESIGN §2 deep visual prompts: one set per layer, a shared projection, dropout, a final LayerNorm
        bound = math.sqrt(6.0 / (3 * self.patch_size ** 2 + D))  # DESIGN §11: uniform(-bound, bound)
        self.prompts = nn.Parameter(torch.empty(L, cfg.n_prompts, D).uniform_(-bound, bound))  # (L, Np, D)
        self.prompt_proj = nn.Linear(D, D)
        nn.init.kaiming_normal_(self.prompt_proj.weight, mode='fan_out')
        nn.init.zeros_(self.prompt_proj.bias)
        self.prompt_dropout = nn.Dropout(cfg.prompt_dropout)
        self.prompt_norm = nn.LayerNorm(D, eps=1e-6)

        # DESIGN §3-5 decoder: trusty token, relationship descriptor, Trusty Learner, ATM layers
        self.trusty_token = nn.Parameter(torch.empty(1, d)) if cfg.trusty else None  # t_A, (1, d)
        self.descriptor = nn.Linear(2 * d, d)  # Eq. 4
        self.trusty_learner = TrustyLearner(d, cfg.heads, cfg.dropout) if cfg.trusty_learner else None
        self.decoder = nn.ModuleList(ATMLayer(d, cfg.heads, cfg.dropout) for _ in range(cfg.decoder_layers))
        for p in self.decoder_parameters():  # DESIGN §11: Xavier-uniform on every >1-dim decoder parameter
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.descriptor.bias)

    def decoder_parameters(self):
        mods = [self.descriptor, self.trusty_learner, self.decoder]
        yield from ([self.trusty_token] if self.trusty_token is not None else [])
        yield from (p for m in mods if m is not None for p in m.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP stays in eval mode while the rest trains
        return self

    @property
    def mean(self):
        if self.cfg.imagenet_mean_std:  # the authors': (123.675, 116.28, 103.53) / 255
            return IMAGENET_MEAN
        return tuple(getattr(self.clip.visual, 'image_mean', None) or open_clip.OPENAI_DATASET_MEAN)

    @property
    def std(self):
        if self.cfg.imagenet_mean_std:  # (58.395, 57.12, 57.375) / 255
            return IMAGENET_STD
        return tuple(getattr(self.clip.visual, 'image_std', None) or open_clip.OPENAI_DATASET_STD)

    @torch.no_grad()
    def encode_text(self, class_names, templates: str | None = None, chunk: int = 1024, precision: str = 'fp32'):
        """DESIGN §1: frozen CLIP text embeddings T, (C, d), L2-normalised, template ensemble averaged (each
        prompt L2-normalised, mean, L2 again). precision 'fp16': as the authors' precomputed .npy
        files (OpenAI's clip package in fp16 on CUDA, DESIGN §15): `fp16_text_tower` on the full context,
        the norms and the mean in fp16 too; returned as float32 holding fp16 values. Runs on CPU too."""
        templates = TEMPLATES[templates or self.cfg.templates]
        if precision == 'fp16':
            encode = partial(fp16_text_tower(self.clip).encode_text, normalize=True)
        elif precision == 'fp32':
            encode = self.encode_tokens
        else:
            raise ValueError(f"unknown text precision {precision!r}; expected 'fp32' or 'fp16'")
        device = self.prompts.device
        prompts = [t.format(c) for c in class_names for t in templates]
        emb = torch.cat([encode(self.tokenizer(prompts[i:i + chunk]).to(device))
                         for i in range(0, len(prompts), chunk)])  # (C * templates, d)
        if len(templates) > 1:
            emb = F.normalize(emb.view(len(class_names), len(templates), -1).mean(1), dim=-1)  # (C, d)
        return emb.float()

    def encode_tokens(self, tokens):
        """CLIP's text tower on (M, 77) tokens -> (M, d), L2-normalised. With the causal mask, the
        positions after the longest prompt's [EOT] change nothing: they are cut (7x faster for the
        15-template ensemble, whose prompts have <= 13 tokens)."""
        c = self.clip
        if getattr(c, 'text_pool_type', None) != 'argmax' or getattr(c, 'attn_mask', None) is None:
            return c.encode_text(tokens, normalize=True)  # other text towers: as open_clip runs them
        eot = tokens.argmax(-1)                            # [EOT] has the largest token id
        n = int(eot.max()) + 1
        x = c.token_embedding(tokens[:, :n]).to(c.transformer.get_cast_dtype()) + c.positional_embedding[:n]
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask[:n, :n]))  # (M, n, width)
        x = x[torch.arange(len(tokens), device=x.device), eot]            # (M, width)
        x = c.text_projection(x) if isinstance(c.text_projection, nn.Linear) else x @ c.text_projection
        return F.normalize(x, dim=-1)

    def positional_embedding(self, gh: int, gw: int):
        """DESIGN §11: the pretrained [CLS] + grid positions, the grid interpolated bilinearly to gh x gw."""
        pos = self.clip.visual.positional_embedding  # (1 + g*g, D)
        g = int(math.sqrt(pos.shape[0] - 1))
        if (gh, gw) == (g, g):
            return pos
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(gh, gw), mode='bilinear', align_corners=False)
        return torch.cat([pos[:1], grid.flatten(2)[0].T])  # (1 + gh*gw, D)

    def embed_patches(self, images):
        """CLIP's own token embedding: patches, [CLS], interpolated positions, ln_pre.
        images (B, 3, H, W) -> (B, 1+N, D) and the patch grid (H/p, W/p)."""
        v = self.clip.visual
        x = v.conv1(images)                      # (B, D, H/p, W/p)
        B, D, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)         # (B, N, D)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(B, 1, D), x], 1)  # (B, 1+N, D)
        pos = self.positional_embedding(gh, gw).to(x.dtype)    # (1+N, D)
        if self.cfg.double_cls_embedding:  # authors' quirk: the class embedding again at [CLS]
            pos = torch.cat([pos[:1] + v.class_embedding.to(x.dtype), pos[1:]])
        return v.ln_pre(x + pos), (gh, gw)

    def encode_image(self, images):
        """DESIGN §2: frozen ViT with deep prompts, each block run by `vit_block` (its own weights, fused
        attention). Returns h (B, d) and E (B, N, d), both L2-normalised, and the patch grid (H/p, W/p).
        Departure: paper §3.1 only names deep prompt tuning; the rest is the authors' code (DESIGN §2, §11)."""
        v = self.clip.visual
        x, (gh, gw) = self.embed_patches(images)  # (B, 1+N, D)
        B, _, D = x.shape
        Np = self.prompts.shape[1]
        prompts = self.prompt_proj(self.prompts).to(x.dtype)  # (L, Np, D)
        batch_first = getattr(v.transformer, 'batch_first', True)
        for i, block in enumerate(v.transformer.resblocks):
            # before every layer: drop the previous layer's prompt outputs, insert fresh prompts
            rest = x[:, 1:] if i == 0 else x[:, 1 + Np:]
            x = torch.cat([x[:, :1], self.prompt_dropout(prompts[i].expand(B, Np, D)), rest], 1)  # (B, 1+Np+N, D)
            x = vit_block(block, x, batch_first)                     # (B, 1+Np+N, D)
        x = torch.cat([x[:, :1], x[:, 1 + Np:]], 1)  # (B, 1+N, D)
        x = v.ln_post(self.prompt_norm(x))
        if v.proj is not None:
            x = x @ v.proj                           # (B, 1+N, d)
        x = F.normalize(x, dim=-1)
        return x[:, 0], x[:, 1:], (gh, gw)           # (B, d), (B, N, d)

    def forward(self, images, text):
        """images (B, 3, H, W), H and W divisible by p; text (C, d) from `encode_text`.
        Returns {'pred_masks': (B, C[+1], H/p, W/p) logits, 'aux_masks': [earlier layers' logits]};
        channel C (last) is the trusty map logit M_A when the trusty token is on.
        Paper Eq. 4: t^ = concat[t' ⊙ h, t'] for every token of T' (⊙ elementwise, h the image's embedding),
        then the Linear(2d, d) `descriptor` (paper §3.2: the Trusty Learner's first step) gives the queries T^.
        Departure: Eq. 4 prints concat[t' ⊙ h, t] but shape (C+1) x 2d, so the second half is t' (DESIGN §3)."""
        h, E, (gh, gw) = self.encode_image(images)     # (B, d), (B, N, d)
        B = h.shape[0]
        t = text.to(h.dtype)                           # (C, d)
        if self.trusty_token is not None:
            t = torch.cat([t, self.trusty_token.to(h.dtype)])  # T' = [t_1..t_C, t_A], (C+1, d)
        t = t.unsqueeze(0).expand(B, -1, -1)                   # (B, C+1, d)
        q = self.descriptor(torch.cat([t * h.unsqueeze(1), t], -1))  # (B, C+1, 2d) -> (B, C+1, d), Eq. 4
        if self.trusty_learner is not None:
            q = self.trusty_learner(q)                          # Eq. 5
        masks = []
        for layer in self.decoder:                              # Eq. 6-8
            q, m = layer(q, E)                                  # m: (B, C+1, N)
            masks.append(m.view(B, -1, gh, gw))                # (B, C+1, H/p, W/p)
        return {'pred_masks': masks[-1], 'aux_masks': masks[:-1]}

    def trainable_state_dict(self):
        """Only what training changes: prompts, prompt projection/norm and the decoder."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith('clip.')}

    def load_trainable_state_dict(self, state, strict: bool = True):
        """strict=False: tensors the model has and `state` lacks keep their initialisation, tensors it
        has and the model lacks are ignored (e.g. starting TagCLIP from ZegCLIP); returns both lists."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith('clip.')]
        if (missing or unexpected) and strict:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return missing, unexpected

    def param_groups(self, lr: float, weight_decay: float, exempt_norms: bool = False):
        """DESIGN §8. Default: one group, every trainable parameter at lr and weight_decay (what the
        authors' configs actually ran). exempt_norms: norms, biases, prompts and t_A get no decay."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not exempt_norms:
            return [{'params': [p for _, p in params], 'lr': lr, 'weight_decay': weight_decay}]
        no_decay = lambda n, p: p.dim() < 2 or 'norm' in n or n in ('prompts', 'trusty_token')
        return [{'params': [p for n, p in params if not no_decay(n, p)], 'lr': lr, 'weight_decay': weight_decay},
                {'params': [p for n, p in params if no_decay(n, p)], 'lr': lr, 'weight_decay': 0.0}]


def fused_attention_block(block: nn.Module) -> bool:
    """Whether `vit_block` computes this block itself: open_clip's plain ResidualAttentionBlock (every
    ViT config used here: ViT-B-16, ViT-B-32, ViT-L-14, toy_clip) around a self-attention
    nn.MultiheadAttention with packed q/k/v weights and no extra key/value biases."""
    a = getattr(block, 'attn', None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, 'ln_1_kv')
            and type(a) is nn.MultiheadAttention and a._qkv_same_embed_dim and a.in_proj_weight is not None
            and a.bias_k is None and a.bias_v is None and not a.add_zero_attn)


def vit_block(block: nn.Module, x, batch_first: bool = True):
    """One frozen ViT block on x (B, T, D) -> (B, T, D): open_clip's ResidualAttentionBlock.forward
    (no attention mask), x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x))), with the block's own
    weights, but the attention computed here: one GEMM for q, k and v on the contiguous tokens, then
    fused scaled-dot-product attention. nn.MultiheadAttention (batch_first) hands its in-projection a
    transposed view, which with autograd through the block (the prompts train) runs as ~1000 small
    matmuls, forward and backward; under inference_mode its fast path computes attention as bmm +
    softmax instead of the fused kernel. Any other block (open_clip's CustomResidualAttentionBlock:
    qk-norm, scaled cosine attention, extra norms) runs its own forward, in its transformer's layout."""
    if not fused_attention_block(block):
        return block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    a = block.attn
    B, T, D = x.shape
    h = a.num_heads
    qkv = F.linear(block.ln_1(x), a.in_proj_weight, a.in_proj_bias)     # (B, T, 3D)
    q, k, v = qkv.view(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)        # 3 x (B, h, T, D/h)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=a.dropout if a.training else 0.0)  # (B, h, T, D/h)
    x = x + block.ls_1(a.out_proj(y.transpose(1, 2).reshape(B, T, D)))  # (B, T, D)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def fp16_text_tower(clip):
    """A copy of CLIP's text tower run as OpenAI's clip package runs it on CUDA (how the authors made
    their text embeddings): Linear / attention weights and the text projection in fp16 (open_clip's
    copy of OpenAI's convert_weights), activations in fp16, LayerNorms computed in fp32 and cast back."""
    tower = copy.deepcopy(clip, {id(clip.visual): None})  # the memo leaves the image tower out of the copy
    open_clip.convert_weights_to_lp(tower, torch.float16)
    for m in tower.modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_pre_hook(lambda m, args: (args[0].float(),))
            m.register_forward_hook(lambda m, args, out: out.half())
    return tower


def seen_probability(trusty_logits, polarity: str = 'unseen'):
    """The trusty map A = P(pixel belongs to a seen class) from M_A. polarity: what sigmoid(M_A) was
    trained to predict ('unseen': the authors' focal loss, so A = 1 - sigmoid(M_A); 'seen': Eq. 10's dice)."""
    p = trusty_logits.float().sigmoid()
    return 1 - p if polarity == 'unseen' else p


def trusty_scores(mask_logits, seen, calibration: float = 0.1, trusty_weighting: bool = True,
                  polarity: str = 'unseen'):
    """Paper Eq. 12 (as DESIGN §7 reads it) on upsampled logits. mask_logits (B, C[+1], H, W), seen (C,) bool.
    S = sigmoid(M_R); S[seen] -= calibration; with a trusty channel and weighting on, A = P(seen) and
    S[seen] *= A, S[unseen] *= 1 - A. polarity: what sigmoid(M_A) predicts ('unseen': authors' focal
    variant, A = 1 - sigmoid(M_A); 'seen': the paper's dice variant). Returns (B, C, H, W) scores.
    Departure: printed M_A(1 - M_R) / M_A M_R, no calibration: garbled; read as above (paper §3.4, authors' code)."""
    C = seen.numel()
    seen = seen.to(mask_logits.device).view(1, C, 1, 1)  # (1, C, 1, 1)
    S = mask_logits[:, :C].float().sigmoid() - calibration * seen  # (B, C, H, W)
    if trusty_weighting and mask_logits.shape[1] == C + 1:
        A = seen_probability(mask_logits[:, C:], polarity)  # (B, 1, H, W)
        S = torch.where(seen, S * A, S * (1 - A))
    return S
