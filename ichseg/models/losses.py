"""Segmentation losses on logits: soft Dice, and Dice + binary cross-entropy as nnU-Net trains.

The paper trained with binary cross-entropy alone. ICH is well under 1 % of the pixels, so BCE is
dominated by the background and a network can lower it by predicting little or nothing; a Dice term
measures the overlap of the foreground itself and does not care how large the background is.
nnU-Net (Isensee et al. 2021) trains every task with the sum of cross-entropy and a soft Dice
computed over the whole batch ("batch Dice").

Definitions, for logits ``z`` and binary targets ``g`` of shape ``(B, 1, H, W)`` and
probabilities ``p = sigmoid(z)``:

* soft Dice over the batch: ``D = (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth)``, the sums
  running over the batch AND the pixels (one Dice for the whole batch, so a batch with few ICH
  pixels still has a defined, stable value; nnU-Net's ``batch_dice``). With ``batch_dice=False``
  each sample gets its own Dice and the losses are averaged.
* :class:`SoftDiceLoss`: ``1 - D`` (in [0, 1]; nnU-Net minimises ``-D``, which has the same
  gradient).
* :class:`DiceBCELoss`: ``bce_weight * BCE(z, g; pos_weight) + dice_weight * (1 - D)``; BCE is
  ``torch.nn.functional.binary_cross_entropy_with_logits`` averaged over all pixels, optionally
  with positive (ICH) pixels weighted by ``pos_weight``.

Usable on their own::

    from ichseg.models.losses import DiceBCELoss
    loss = DiceBCELoss(dice_weight=1.0, bce_weight=1.0)
    value = loss(logits, masks)

or from a config: ``model.loss={_target_: ichseg.models.losses.DiceBCELoss, dice_weight: 1.0}``
(docs/recipes.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: nnU-Net's smoothing term (``SoftDiceLoss(smooth=1e-5)``).
DEFAULT_SMOOTH = 1e-5


def soft_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = DEFAULT_SMOOTH,
    batch_dice: bool = True,
) -> torch.Tensor:
    """Soft Dice of ``sigmoid(logits)`` against ``target``: a scalar (batch Dice) or ``(B,)``.

    Both tensors are ``(B, ...)``; sums run over everything but the batch axis, and over the batch
    axis too when ``batch_dice``.
    """
    if logits.shape != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape"
        )
    probabilities = torch.sigmoid(logits.float())
    target = target.float()
    dims = tuple(range(probabilities.ndim)) if batch_dice else tuple(range(1, probabilities.ndim))
    intersection = (probabilities * target).sum(dims)
    total = probabilities.sum(dims) + target.sum(dims)
    return (2.0 * intersection + smooth) / (total + smooth).clamp_min(1e-8)


class SoftDiceLoss(nn.Module):
    """``1 - soft Dice`` (batch Dice by default; module docstring)."""

    def __init__(self, smooth: float = DEFAULT_SMOOTH, batch_dice: bool = True) -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError(f"the Dice smoothing term must be non-negative, got {smooth}")
        self.smooth = float(smooth)
        self.batch_dice = bool(batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - soft_dice(logits, target, self.smooth, self.batch_dice).mean()


class DiceBCELoss(nn.Module):
    """``bce_weight * BCE + dice_weight * (1 - soft Dice)`` on logits (nnU-Net's Dice + CE).

    Args:
        dice_weight: weight of the soft-Dice term (0 switches it off).
        bce_weight: weight of the binary cross-entropy term (0 switches it off).
        smooth: the Dice smoothing term added to numerator and denominator.
        pos_weight: weight of positive (ICH) pixels in the BCE term; None: 1.
        batch_dice: one Dice over the whole batch (nnU-Net) rather than one per sample.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth: float = DEFAULT_SMOOTH,
        pos_weight: float | None = None,
        batch_dice: bool = True,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError(
                "dice_weight and bce_weight must be non-negative and not both 0, "
                f"got {dice_weight} and {bce_weight}"
            )
        if pos_weight is not None and pos_weight <= 0:
            raise ValueError(f"pos_weight must be positive, got {pos_weight}")
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.dice = SoftDiceLoss(smooth, batch_dice)
        weight = None if pos_weight is None else torch.tensor([float(pos_weight)])
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        loss = logits.new_zeros(())
        if self.bce_weight:
            bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
            loss = loss + self.bce_weight * bce
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss

    def extra_repr(self) -> str:
        weight = None if self.pos_weight is None else float(self.pos_weight)
        return f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, pos_weight={weight}"
