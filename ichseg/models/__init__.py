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
    if name in _MOVED:  # a LightningModule under its earlier name: Lightning loads on first use
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
