"""The threshold baseline's band as a network (ichseg.models.intensity_band): 1 inside, 0 outside,
clear errors; and ichseg.models / ichseg.checkpoint import no Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ichseg.errors import ConfigError
from ichseg.models.intensity_band import IntensityBand


def all_levels() -> torch.Tensor:
    """Every 0-255 level as float input the way the DataModule makes it: (1, 2, 16, 16)."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    image = levels.to(torch.float32).mul_(1.0 / 255.0)
    return torch.cat([image, torch.zeros_like(image)], dim=1)  # a second channel, ignored


def test_band_predicts_one_inside_and_zero_outside():
    band = IntensityBand(140, 230)
    images = all_levels()
    inside = (torch.arange(256) >= 140) & (torch.arange(256) <= 230)
    probabilities = torch.sigmoid(band(images))
    assert probabilities.shape == (1, 1, 16, 16)
    torch.testing.assert_close(probabilities.view(-1), inside.float(), rtol=0, atol=0)
    assert dict(band.state_dict()).keys() == {"lower", "upper"}


def test_band_needs_thresholds_and_a_brain_channel():
    with pytest.raises(ConfigError, match="no thresholds"):
        IntensityBand()(all_levels())
    with pytest.raises(ConfigError, match="channel 2"):
        IntensityBand(channel=2, in_channels=1)
    with pytest.raises(ConfigError, match="both"):
        IntensityBand(lower=140)


def test_models_and_checkpoint_import_no_lightning():
    code = (
        "import sys, ichseg.models, ichseg.models.intensity_band, ichseg.models.losses, "
        "ichseg.models.unet, ichseg.checkpoint; "
        "print([m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'hydra', 'omegaconf')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_band_is_exported_and_the_lightning_module_only_on_first_use():
    import ichseg.models
    from ichseg.lit.threshold import ThresholdModule

    assert ichseg.models.IntensityBand is IntensityBand
    assert ichseg.models.ThresholdModule is ThresholdModule  # its earlier name, loaded lazily
