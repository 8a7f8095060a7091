"""Models, pure torch: the paper's 24-convolution U-Net, the threshold baseline's
:class:`IntensityBand` and the segmentation losses (:mod:`ichseg.models.losses`).

No Lightning here: the LightningModules are in :mod:`ichseg.lit` (the threshold baseline's
``ThresholdModule``: :mod:`ichseg.lit.threshold`; its band search:
:mod:`ichseg.baselines.threshold`).
"""

from __future__ import annotations

from typing import Any

from ichseg.models.intensity_band import IntensityBand
from ichseg.models.unet import UNet

__all__ = ["IntensityBand", "UNet", "fit_thresholds"]

_MOVED = {
    "ThresholdModule": "ichseg.lit.threshold",
}


def __getattr__(name: str) -> Any:
    if name == "fit_thresholds":  # numpy only, imported on first use
        from ichseg.baselines.threshold import fit_thresholds

        return fit_thresholds
    if name in _MOVED:
        raise AttributeError(
            f"ichseg.models.{name} is a LightningModule and ichseg.models does not import "
            f"Lightning: from {_MOVED[name]} import {name} (or ichseg.models.threshold)"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
