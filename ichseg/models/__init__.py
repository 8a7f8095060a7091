"""Models: the paper's 24-convolution U-Net and the threshold baseline.

``ThresholdModule``, ``IntensityBand`` and ``fit_thresholds`` (:mod:`ichseg.models.threshold`)
are imported on first use (they need Lightning; the U-Net does not).
"""

from __future__ import annotations

from typing import Any

from ichseg.models.unet import UNet

__all__ = ["IntensityBand", "ThresholdModule", "UNet", "fit_thresholds"]

_THRESHOLD_NAMES = ("IntensityBand", "ThresholdModule", "fit_thresholds")


def __getattr__(name: str) -> Any:
    if name in _THRESHOLD_NAMES:
        from ichseg.models import threshold

        return getattr(threshold, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
