"""losses.py: focal, dice and trusty terms against hand computations (Eq. 9-11, DESIGN §6)."""

import math

import torch

from losses import TagCLIPLoss

sig = lambda x: 1 / (1 + math.exp(-x))


def focal_px(x, g, alpha=0.25, gamma=2.0):
    p = sig(x)
    p_t = p if g else 1 - p
    return -(alpha if g else 1 - alpha) * (1 - p_t) ** gamma * math.log(p_t)


def dice_map(xs, gs):
    ps = [sig(x) for x in xs]
    return 1 - (2 * sum(p * g for p, g in zip(ps, gs)) + 1) / (sum(ps) + sum(gs) + 1)


# one image, 2 classes, a 1x4 label: class 0, class 1, ignore (255), class 0
LABEL = torch.tensor([[[0, 1, 255, 0]]])
LOGITS = torch.tensor([[[[1.0, -2.0, 0.5, 3.0]], [[-1.0, 2.0, 1.5, -0.5]]]])  # (1, 2, 1, 4)


def test_focal_and_dice_by_hand():
    crit = TagCLIPLoss(trusty=False)
    out = crit({'pred_masks': LOGITS, 'aux_masks': []}, LABEL)
    G = [[1, 0, 0, 1], [0, 1, 0, 0]]  # 255 is a negative for every class map (authors' default)
    X = LOGITS[0, :, 0].tolist()
    focal = sum(sum(focal_px(x, g) for x, g in zip(X[c], G[c])) / 4 for c in range(2)) / 2  # num_masks = 2
    dice = sum(dice_map(X[c], G[c]) for c in range(2)) / 2
    assert math.isclose(out['loss_focal'].item(), focal, rel_tol=1e-5)
    assert math.isclose(out['loss_dice'].item(), dice, rel_tol=1e-5)
    assert math.isclose(out['loss'].item(), 20 * focal + dice, rel_tol=1e-5)
    assert 'loss_trusty' not in out


def test_exclude_mode_by_hand_and_255_pixels_change_nothing():
    crit = TagCLIPLoss(trusty=False, ignore_mode='exclude')
    out = crit({'pred_masks': LOGITS, 'aux_masks': []}, LABEL)
    keep = [0, 1, 3]
    X = [[LOGITS[0, c, 0, i].item() for i in keep] for c in range(2)]
    G = [[1, 0, 1], [0, 1, 0]]
    focal = sum(sum(focal_px(x, g) for x, g in zip(X[c], G[c])) / 3 for c in range(2)) / 2
    assert math.isclose(out['loss_focal'].item(), focal, rel_tol=1e-5)
    assert math.isclose(out['loss_dice'].item(), sum(dice_map(X[c], G[c]) for c in range(2)) / 2, rel_tol=1e-5)
    moved = LOGITS.clone()
    moved[..., 2] = torch.tensor([9.0, -7.0]).view(1, 2, 1)
    out2 = crit({'pred_masks': moved, 'aux_masks': []}, LABEL)
    assert all(torch.equal(out[k], out2[k]) for k in out)


def test_255_pixels_are_negatives_by_default():
    crit = TagCLIPLoss(trusty=False)
    base = crit({'pred_masks': LOGITS, 'aux_masks': []}, LABEL)
    up = LOGITS.clone()
    up[0, 0, 0, 2] = 6.0  # a confident "class 0" on an ignore pixel is penalised
    out = crit({'pred_masks': up, 'aux_masks': []}, LABEL)
    assert out['loss_focal'] > base['loss_focal'] and out['loss_dice'] > base['loss_dice']


def _trusty_case(trusty_loss, ignore_mode='negative', **kw):
    # label in vocabulary indices: pixel 1 belonged to an unseen class (masked to 255), pixel 2 is plain 255
    label = torch.tensor([[[0, 255, 255, 0]]])
    unseen = torch.tensor([[[False, True, False, False]]])
    M_A = torch.tensor([0.3, -1.2, 0.7, 2.0])
    logits = torch.cat([LOGITS[:, :1], M_A.view(1, 1, 1, 4)], 1)  # 1 class + trusty channel
    crit = TagCLIPLoss(trusty=True, trusty_loss=trusty_loss, ignore_mode=ignore_mode, **kw)
    return crit({'pred_masks': logits, 'aux_masks': []}, label, unseen)['loss_trusty'].item(), M_A.tolist()


def test_trusty_focal_predicts_unseen():
    loss, X = _trusty_case('focal')
    g = [0, 1, 0, 0]  # authors' polarity: 1 on unseen pixels, 0 elsewhere (255 included)
    assert math.isclose(loss, sum(focal_px(x, t) for x, t in zip(X, g)) / 4, rel_tol=1e-5)  # num_masks = 1
    loss, X = _trusty_case('focal', 'exclude')
    assert math.isclose(loss, sum(focal_px(X[i], g[i]) for i in (0, 1, 3)) / 3, rel_tol=1e-5)
    loss, X = _trusty_case('focal', trusty_alpha=0.75)  # the unseen pixels weighted 0.75, the rest 0.25
    assert math.isclose(loss, sum(focal_px(x, t, alpha=0.75) for x, t in zip(X, g)) / 4, rel_tol=1e-5)


def test_trusty_dice_predicts_seen_eq9_eq10():
    loss, X = _trusty_case('dice')
    assert math.isclose(loss, dice_map(X, [1, 0, 1, 1]), rel_tol=1e-5)  # G_A: 1 seen (and 255), 0 unseen
    loss, X = _trusty_case('dice', 'exclude')
    assert math.isclose(loss, dice_map([X[i] for i in (0, 1, 3)], [1, 0, 1]), rel_tol=1e-5)
    assert TagCLIPLoss(trusty_loss='dice').polarity == 'seen' and TagCLIPLoss().polarity == 'unseen'


def test_trusty_balanced_by_hand():
    loss, X = _trusty_case('balanced')
    G = [1, 0, 1, 1]  # predicts seen, as Eq. 9 (255 on the seen side by default)
    bce = sum(-math.log(sig(x) if g else 1 - sig(x)) for x, g in zip(X, G)) / 4
    want = dice_map(X, G) + dice_map([-x for x in X], [1 - g for g in G]) + bce  # 1 - A is sigmoid(-M_A)
    assert math.isclose(loss, want, rel_tol=1e-5)
    assert TagCLIPLoss(trusty_loss='balanced').polarity == 'seen'


def test_deep_supervision_adds_each_layer():
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 8, 8))
    label[0, :2] = 255
    unseen = torch.zeros(2, 8, 8, dtype=torch.bool)
    unseen[1, :3] = True
    final, aux = torch.randn(2, 4, 4, 4), [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)]
    outputs = {'pred_masks': final, 'aux_masks': aux}
    plain = TagCLIPLoss(trusty=True)(outputs, label, unseen)
    deep = TagCLIPLoss(trusty=True, aux_loss=True)(outputs, label, unseen)
    assert set(deep) == set(plain) | {f'{k}_{i}' for k in ('loss_focal', 'loss_dice', 'loss_trusty') for i in (0, 1)}
    layer0 = TagCLIPLoss(trusty=True)({'pred_masks': aux[0], 'aux_masks': []}, label, unseen)
    assert torch.allclose(deep['loss_dice_0'], layer0['loss_dice']) and torch.equal(deep['loss_focal'], plain['loss_focal'])
    w = {'loss_focal': 20, 'loss_dice': 1, 'loss_trusty': 10}
    total = sum(w[k.rstrip('_01')] * v for k, v in deep.items() if k != 'loss')
    assert torch.allclose(deep['loss'], total)
    assert deep['loss'] > plain['loss']


def test_num_masks_counts_present_pairs():
    label = torch.tensor([[[0, 0, 1, 255]], [[2, 2, 2, 2]]])
    present = (label.unsqueeze(1) == torch.arange(3).view(1, 3, 1, 1)).flatten(2).any(-1)
    assert TagCLIPLoss.num_masks(present).item() == 3
    assert TagCLIPLoss.num_masks(torch.zeros(2, 3, dtype=torch.bool)).item() == 1
