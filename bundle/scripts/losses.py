"""Loss for the three-class lung/opacity network that learns from partially annotated label maps.

Targets use the values of :mod:`scripts.labels`. A pixel labelled 3 (lung whose opacity was never annotated) is
known to be lung but may or may not be opaque, so it is scored on the summed probability of the two lung classes
(clear lung + opacity) and never on which of the two it is. Lung-only masks therefore train the lung output
without teaching the network that their lungs are clear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scripts.labels import BACKGROUND, CLEAR_LUNG, LUNG_UNANNOTATED, OPACITY


def soft_dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - Dice over the whole batch (one ratio for all pixels, stable for small or absent structures)."""
    intersection = (probability * target).sum()
    total = probability.sum() + target.sum()
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


class PartialLabelDiceCELoss(nn.Module):
    """Cross-entropy with a marginal term for unannotated lung, plus batch Dice for the lung and the opacity.

    Not MONAI's DiceCELoss: it cannot count lung whose opacity was not annotated (label 3) as lung-or-opacity.

    Args:
        dice_weight: weight of the mean of the lung and opacity Dice losses added to the cross-entropy.
    """

    def __init__(self, dice_weight: float = 1.0):
        super().__init__()
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target[:, 0].long()  # (B, H, W)
        log_probability = F.log_softmax(logits.float(), dim=1)
        unannotated = target == LUNG_UNANNOTATED
        known_class = torch.where(unannotated, torch.full_like(target, BACKGROUND), target)
        known_log_likelihood = log_probability.gather(1, known_class[:, None])[:, 0]
        lung_log_likelihood = torch.logsumexp(log_probability[:, [CLEAR_LUNG, OPACITY]], dim=1)
        cross_entropy = -torch.where(unannotated, lung_log_likelihood, known_log_likelihood).mean()

        probability = log_probability.exp()
        lung_probability = probability[:, CLEAR_LUNG] + probability[:, OPACITY]
        lung_dice = soft_dice_loss(lung_probability, (target != BACKGROUND).float())
        opacity_known = (~unannotated).float()
        opacity_dice = soft_dice_loss(probability[:, OPACITY] * opacity_known, (target == OPACITY).float())
        return cross_entropy + self.dice_weight * 0.5 * (lung_dice + opacity_dice)
