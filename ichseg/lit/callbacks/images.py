"""The overlay grid of a fixed validation batch (input | truth | prediction) in TensorBoard.

Shared by the LightningModules (:mod:`ichseg.lit.segmentation`, :mod:`ichseg.lit.threshold`): the
first validation batch is kept on the CPU and every few epochs its predictions are logged as one
image (:func:`ichseg.utils.overlay.overlay_grid`). docs/training.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ichseg.utils.overlay import overlay_grid

__all__ = ["keep_overlay_batch", "log_overlay_grid"]


def keep_overlay_batch(module: Any, batch: Mapping[str, torch.Tensor]) -> None:
    """Keep the first ``image_log_samples`` images and masks of ``batch`` on the CPU as the fixed
    validation batch of the overlay grid, unless one is kept already."""
    if module._fixed_val_batch is None:
        count = module.image_log_samples
        module._fixed_val_batch = {
            "image": batch["image"][:count].detach().cpu(),
            "mask": batch["mask"][:count].detach().cpu(),
        }


def log_overlay_grid(module: Any) -> None:
    """Every ``image_log_every_n_epochs`` epochs, log the fixed validation batch to TensorBoard:
    input | truth | prediction. ``module`` has ``_fixed_val_batch``, ``threshold`` and
    ``predict_probabilities`` (the network module and the threshold baseline both do)."""
    every = module.image_log_every_n_epochs
    if not every or module.current_epoch % every or module._fixed_val_batch is None:
        return
    experiment = getattr(module.logger, "experiment", None)
    if not hasattr(experiment, "add_image") or module.global_rank != 0:
        return
    images = module._fixed_val_batch["image"].to(module.device)
    probabilities = module.predict_probabilities(images).cpu()
    grid = overlay_grid(images, module._fixed_val_batch["mask"], probabilities > module.threshold)
    experiment.add_image("val/overlay (input | truth | prediction)", grid, module.global_step)
