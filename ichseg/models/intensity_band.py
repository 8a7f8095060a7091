"""The threshold baseline as a network: :class:`IntensityBand` holds the brain-window band
``lower <= round(255 x) <= upper`` as buffers and returns logits +-1e4, so ``sigmoid`` gives exactly
1 inside and 0 outside and stitching, resampling and thresholding treat it like any network.

Pure torch; the band is found by :mod:`ichseg.baselines.threshold` and fitted in a Trainer by
:mod:`ichseg.lit.threshold`. Long form: docs/threshold.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ichseg.errors import ConfigError

__all__ = ["BAND_LOGIT", "IntensityBand"]

#: Logit magnitude of :class:`IntensityBand`: ``sigmoid(+-1e4)`` is exactly 1 / 0 in float32.
BAND_LOGIT = 1.0e4


class IntensityBand(nn.Module):
    """The threshold "network": logits +1e4 where ``lower <= round(255 x) <= upper``, else -1e4.

    Input (B, C, H, W) float in [0, 1]; channel ``channel`` (default 0) is the brain window. Output
    (B, 1, H, W) float32 logits: ``sigmoid`` gives exactly 1 inside the band and 0 outside.
    ``lower`` and ``upper`` are buffers (in the state dict, -1 until set). ``in_channels``
    (optional) only checks that ``channel`` exists.
    """

    def __init__(
        self,
        lower: int | None = None,
        upper: int | None = None,
        channel: int = 0,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        if in_channels is not None and not 0 <= channel < int(in_channels):
            raise ConfigError(
                f"brain-window channel {channel} does not exist in {in_channels} input channel(s)"
            )
        self.channel = int(channel)
        self.register_buffer("lower", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("upper", torch.tensor(-1, dtype=torch.int64))
        if lower is not None or upper is not None:
            if lower is None or upper is None:
                raise ConfigError("give both lower and upper thresholds, or neither")
            self.set_band(lower, upper)

    @property
    def fitted(self) -> bool:
        """Whether a band has been set."""
        return bool(self.lower.item() >= 0 and self.upper.item() >= 0)

    def set_band(self, lower: int, upper: int) -> None:
        """Set the (inclusive) band on the 0-255 scale."""
        if not 0 <= int(lower) <= 255 or not 0 <= int(upper) <= 255:
            raise ConfigError(f"thresholds must lie in 0..255, got {lower} and {upper}")
        self.lower.fill_(int(lower))
        self.upper.fill_(int(upper))

    def to_levels(self, images: torch.Tensor) -> torch.Tensor:
        """Channel ``channel`` on the 0-255 scale, (B, 1, H, W): ``round(value * 255)``."""
        return torch.round(images[:, self.channel : self.channel + 1].float() * 255.0)

    def predict_mask(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool: inside the band."""
        if not self.fitted:
            raise ConfigError(
                "the intensity band has no thresholds yet: fit it (ThresholdModule) or give "
                "lower and upper"
            )
        levels = self.to_levels(images)
        return (levels >= self.lower) & (levels <= self.upper)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inside = self.predict_mask(images)
        return torch.where(inside, BAND_LOGIT, -BAND_LOGIT).to(torch.float32)

    def extra_repr(self) -> str:
        return f"lower={int(self.lower)}, upper={int(self.upper)}, channel={self.channel}"
