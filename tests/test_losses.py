"""Soft Dice and Dice + BCE against values computed by hand, selection from the config (new and
earlier ``_target_`` names), and the one pos_weight."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ichseg.errors import ConfigError
from ichseg.lit.segmentation import ICHSegmentationModule
from ichseg.models.losses import DiceBCELoss, SoftDiceLoss, soft_dice

LN3 = math.log(3.0)


def pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two pixels: probabilities 0.5 and 0.75, targets 1 and 0."""
    logits = torch.tensor([0.0, LN3]).reshape(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    return logits, target


def test_soft_dice_by_hand():
    logits, target = pair()
    # 2 * 0.5 / (0.5 + 0.75 + 1) = 1 / 2.25
    assert soft_dice(logits, target, smooth=0).item() == pytest.approx(4 / 9)
    assert SoftDiceLoss(smooth=0)(logits, target).item() == pytest.approx(5 / 9)
    # the smoothing term goes into numerator and denominator: (1 + 1) / (2.25 + 1)
    assert soft_dice(logits, target, smooth=1).item() == pytest.approx(2 / 3.25)


def test_batch_dice_pools_the_batch_and_per_sample_dice_averages():
    logits = torch.tensor([[0.0, 0.0], [LN3, LN3]]).reshape(2, 1, 1, 2)  # p 0.5, 0.5 | 0.75, 0.75
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    # batch: 2 * 1 / (2.5 + 2) = 4 / 9; per sample: 2 / 3 and 0, mean 1 / 3
    assert SoftDiceLoss(smooth=0)(logits, target).item() == pytest.approx(1 - 4 / 9)
    per_sample = soft_dice(logits, target, smooth=0, batch_dice=False)
    assert per_sample.tolist() == pytest.approx([2 / 3, 0.0])
    assert SoftDiceLoss(smooth=0, batch_dice=False)(logits, target).item() == pytest.approx(2 / 3)


def test_an_empty_target_with_smoothing_rewards_an_empty_prediction():
    target = torch.zeros(1, 1, 2, 2)
    assert SoftDiceLoss(smooth=1)(torch.full((1, 1, 2, 2), -30.0), target).item() < 1e-6
    # p = 0.5 everywhere: (0 + 1) / (2 + 1)
    assert SoftDiceLoss(smooth=1)(torch.zeros(1, 1, 2, 2), target).item() == pytest.approx(2 / 3)


def test_dice_bce_by_hand():
    logits, target = pair()
    bce = (math.log(2.0) + math.log(4.0)) / 2  # -(ln 0.5 + ln 0.25) / 2
    weighted_bce = (2 * math.log(2.0) + math.log(4.0)) / 2  # positive pixel counted twice
    dice_loss = 5 / 9
    assert DiceBCELoss(smooth=0)(logits, target).item() == pytest.approx(bce + dice_loss)
    assert DiceBCELoss(1.0, 0.0, smooth=0)(logits, target).item() == pytest.approx(dice_loss)
    assert DiceBCELoss(0.0, 1.0)(logits, target).item() == pytest.approx(bce)
    assert DiceBCELoss(2.0, 0.5, smooth=0, pos_weight=2.0)(logits, target).item() == pytest.approx(
        0.5 * weighted_bce + 2 * dice_loss
    )


def test_bce_part_equals_torch_and_gradients_flow():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    target = (torch.rand(3, 1, 8, 8) > 0.8).float()
    reference = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0]))(logits, target)
    ours = DiceBCELoss(0.0, 1.0, pos_weight=3.0)(logits, target)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    DiceBCELoss()(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="not both 0"):
        DiceBCELoss(0.0, 0.0)
    with pytest.raises(ValueError, match="pos_weight"):
        DiceBCELoss(pos_weight=0.0)
    with pytest.raises(ValueError, match="shape"):
        soft_dice(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))


@pytest.mark.parametrize(
    ("module_target", "loss_target"),
    [
        ("ichseg.lit.segmentation.ICHSegmentationModule", "ichseg.models.losses.DiceBCELoss"),
        ("ichseg.module.ICHSegmentationModule", "ichseg.losses.DiceBCELoss"),  # earlier names
    ],
)
def test_loss_is_selected_from_the_config(module_target, loss_target):
    cfg = OmegaConf.create(
        {
            "_target_": module_target,
            "net": {"_target_": "ichseg.models.UNet", "base_filters": 4, "depth": 2},
            "loss": {
                "_target_": loss_target,
                "dice_weight": 1.0,
                "pos_weight": 2.0,
            },
        }
    )
    module = instantiate(cfg)
    assert isinstance(module, ICHSegmentationModule) and isinstance(module.loss, DiceBCELoss)
    assert float(module.loss.pos_weight) == 2.0
    # the loss is not part of the checkpoint's weights
    assert not any(key.startswith("loss.") for key in module.state_dict())
    batch = {"image": torch.rand(2, 1, 16, 16), "mask": (torch.rand(2, 1, 16, 16) > 0.9).float()}
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    assert torch.isfinite(module.training_step(batch, 0))


def test_pos_weight_beside_a_loss_module_is_refused():
    from ichseg.models import UNet

    net = UNet(base_filters=4, depth=2)
    with pytest.raises(ConfigError, match=r"model.pos_weight=3.0 applies to the default BCE only"):
        ICHSegmentationModule(net, loss=DiceBCELoss(), pos_weight=3.0)
    weighted = ICHSegmentationModule(net, pos_weight=3.0)  # the default BCE takes it
    assert float(weighted.loss.pos_weight) == 3.0
    assert ICHSegmentationModule(net, loss=DiceBCELoss(pos_weight=3.0)).loss.pos_weight == 3.0
