"""Training losses of TagCLIP (paper Eq. 9-11, DESIGN §6), kept outside the model as in DETR.

L = alpha * focal(M_R, G_R) + beta * dice(M_R, G_R) + gamma * L_A, {alpha, beta, gamma} = {20, 1, 10},
optionally repeated for every earlier decoder layer (deep supervision, off by default).
Departure: no BCE L_cls of paper Eq. 11: the authors' code, which gave the paper's numbers, has none (DESIGN §6).
Label-255 pixels (VOC background, masked unseen pixels, crop padding) are negatives for every class
map by default (the authors' code); `ignore_mode='exclude'` drops them from every term instead.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import IGNORE_INDEX


def sigmoid_focal(logits, target, valid, alpha: float = 0.25, gamma: float = 2.0):
    """Sigmoid focal loss -alpha_t (1 - p_t)^gamma log p_t, mean over the valid pixels of each map.
    logits/target/valid (M, HW), target in {0, 1} -> (M,)."""
    z = logits * (2 * target - 1)                            # logit of p_t
    loss = F.softplus(-z) * torch.sigmoid(-z) ** gamma       # -log p_t * (1 - p_t)^gamma, fewer passes
    alpha_t = (1 - alpha) + (2 * alpha - 1) * target         # alpha on positives, 1 - alpha on negatives
    return (loss * alpha_t * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def dice(logits, target, valid):
    """1 - (2 sum(p g) + 1) / (sum p + sum g + 1) on sigmoid maps over valid pixels. (M, HW) -> (M,)."""
    p = logits.sigmoid() * valid
    return 1 - (2 * (p * target).sum(-1) + 1) / (p.sum(-1) + (target * valid).sum(-1) + 1)


class TagCLIPLoss(nn.Module):
    """Named loss terms for TagCLIP's mask logits.

    trusty_loss: 'focal' (authors' code: M_A predicts *unseen*, target 1 on unseen pixels; alpha
                 `trusty_alpha`, theirs 0.25), 'dice' (paper Eq. 10: M_A predicts *seen*, G_A of paper Eq. 9) or
                 'balanced' (M_A predicts seen: dice on A vs G_A, dice on 1 - A vs 1 - G_A so the unseen
                 minority counts as much as the seen majority, plus per-pixel BCE; motivated by the toy world).
    ignore_mode: 'negative' (default) or 'exclude' for label-255 pixels.
    """

    def __init__(self, trusty: bool = True, trusty_loss: str = 'focal', ignore_mode: str = 'negative',
                 aux_loss: bool = False, weight_focal: float = 20.0, weight_dice: float = 1.0,
                 weight_trusty: float = 10.0, trusty_alpha: float = 0.25):
        super().__init__()
        assert trusty_loss in ('focal', 'dice', 'balanced') and ignore_mode in ('negative', 'exclude')
        self.trusty, self.trusty_loss, self.ignore_mode, self.aux_loss = trusty, trusty_loss, ignore_mode, aux_loss
        self.trusty_alpha = trusty_alpha  # focal alpha on the trusty map's positives (the unseen pixels)
        self.weight_dict = {'loss_focal': weight_focal, 'loss_dice': weight_dice, 'loss_trusty': weight_trusty}

    @property
    def polarity(self) -> str:
        """What sigmoid(M_A) predicts; stored in checkpoints so inference reads A the right way."""
        return 'unseen' if self.trusty_loss == 'focal' else 'seen'  # 'dice' and 'balanced' predict seen

    def forward(self, outputs, label, unseen=None, num_masks=None):
        """outputs: the model's dict; label (B, H, W) in vocabulary indices with unseen/ignored
        pixels = 255; unseen (B, H, W) bool: pixels of unseen classes (from the unmasked label).
        num_masks: the divisor of every term instead of this batch's (image, present class) pairs
        averaged over ranks (gradient accumulation passes 1, then divides the step's gradient)."""
        B, H, W = label.shape
        C = outputs['pred_masks'].shape[1] - int(self.trusty)
        valid = label != IGNORE_INDEX                                              # (B, H, W)
        classes = torch.arange(C, device=label.device).view(1, C, 1, 1)      # (1, C, 1, 1)
        target = (label.unsqueeze(1) == classes).flatten(2).float()          # (B, C, HW) one-hot G_R
        present = target.sum(-1) > 0                                         # (B, C), as present_classes
        num_masks = self.num_masks(present) if num_masks is None else num_masks

        if self.ignore_mode == 'exclude':
            valid_px = valid.flatten(1).float()                              # (B, HW)
            if self.trusty:                                                  # unseen pixels are G_A = 0 data
                trusty_valid = (valid | unseen).flatten(1).float()
        else:
            valid_px = trusty_valid = torch.ones(B, H * W, device=label.device)
        if self.trusty:
            is_unseen = unseen.flatten(1).float()                            # (B, HW)
            # paper Eq. 9 prints G_A = 1 on seen pixels: 'dice' and 'balanced' use it; the authors' focal
            # variant trains the complement 1 - G_A (M_A predicts unseen, DESIGN §6)
            trusty_target = is_unseen if self.trusty_loss == 'focal' else 1 - is_unseen

        layers = [('', outputs['pred_masks'])]
        if self.aux_loss:  # deep supervision: the same terms for decoder layers 1..L-1
            layers += [(f'_{i}', m) for i, m in enumerate(outputs['aux_masks'])]
        losses, total = {}, 0.0
        for suffix, logits in layers:
            logits = F.interpolate(logits.float(), size=(H, W), mode='bilinear', align_corners=False)  # (B, C[+1], H, W)
            M_R = logits[:, :C].flatten(2)                                   # (B, C, HW)
            v = valid_px.unsqueeze(1).expand_as(M_R)                         # (B, C, HW)
            terms = {'loss_focal': sigmoid_focal(M_R, target, v).sum() / num_masks,
                     'loss_dice': (dice(M_R, target, v) * present).sum() / num_masks}
            if self.trusty:
                M_A = logits[:, C].flatten(1)                                # (B, HW)
                if self.trusty_loss == 'focal':
                    term = sigmoid_focal(M_A, trusty_target, trusty_valid, alpha=self.trusty_alpha)
                elif self.trusty_loss == 'dice':
                    term = dice(M_A, trusty_target, trusty_valid)                # paper Eq. 10
                else:  # 'balanced': the unseen minority is a dice target of its own, plus per-pixel BCE
                    bce = F.binary_cross_entropy_with_logits(M_A, trusty_target, reduction='none')
                    term = (dice(M_A, trusty_target, trusty_valid) + dice(-M_A, 1 - trusty_target, trusty_valid)
                            + (bce * trusty_valid).sum(-1) / trusty_valid.sum(-1).clamp(min=1))
                terms['loss_trusty'] = term.sum() / num_masks
            total = total + sum(self.weight_dict[k] * v for k, v in terms.items())  # paper Eq. 11, no L_cls
            losses.update({k + suffix: v for k, v in terms.items()})
        losses['loss'] = total
        return losses

    @staticmethod
    def present_classes(label, C: int):
        """(B, C) bool: the classes each label map (B, H, W) holds, the pairs num_masks counts."""
        return (label.unsqueeze(1) == torch.arange(C, device=label.device).view(1, C, 1, 1)).flatten(2).any(-1)

    @staticmethod
    def num_masks(present):
        """(image, present class) pairs, averaged over ranks, at least 1 (DETR/MaskFormer)."""
        n = present.sum().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1)
