"""Picture grids for TensorBoard: the input slice with ground truth and prediction overlaid."""

from __future__ import annotations

import torch

#: RGB colours of the overlays.
TRUTH_COLOUR = (1.0, 0.15, 0.15)
PREDICTION_COLOUR = (0.1, 1.0, 0.2)


def _tint(
    grey: torch.Tensor, mask: torch.Tensor, colour: tuple[float, float, float], alpha: float
) -> torch.Tensor:
    """(H, W) grey in [0, 1] and (H, W) bool mask -> (3, H, W) with the mask tinted."""
    rgb = grey.expand(3, *grey.shape).clone()
    tint = torch.tensor(colour, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    mask = mask.to(torch.bool).expand_as(rgb)
    rgb = torch.where(mask, (1 - alpha) * rgb + alpha * tint, rgb)
    return rgb


def overlay_grid(
    images: torch.Tensor,
    truth: torch.Tensor,
    prediction: torch.Tensor,
    alpha: float = 0.5,
    separator: int = 2,
) -> torch.Tensor:
    """One row per sample: input | ground truth overlaid (red) | prediction overlaid (green).

    ``images`` (B, C, H, W) in [0, 1] (channel 0 is shown); ``truth`` and ``prediction``
    (B, 1, H, W) binary. Returns a (3, rows, cols) float tensor in [0, 1] for
    ``SummaryWriter.add_image``.
    """
    images = images.detach().float().cpu().clamp(0, 1)
    truth = truth.detach().cpu().bool()
    prediction = prediction.detach().cpu().bool()
    batch, _, height, width = images.shape
    grid = torch.ones(
        3, batch * (height + separator) - separator, 3 * (width + separator) - separator
    )
    for row in range(batch):
        grey = images[row, 0]
        tiles = (
            grey.expand(3, height, width),
            _tint(grey, truth[row, 0], TRUTH_COLOUR, alpha),
            _tint(grey, prediction[row, 0], PREDICTION_COLOUR, alpha),
        )
        top = row * (height + separator)
        for column, tile in enumerate(tiles):
            left = column * (width + separator)
            grid[:, top : top + height, left : left + width] = tile
    return grid
