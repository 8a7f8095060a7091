"""Every conf/model/*.yaml lists one key per constructor argument of its ``_target_`` (no dead keys,
none missing), its nested networks and losses only arguments they take, and the earlier
``_target_`` names still resolve to the same objects."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class, get_method
from omegaconf import OmegaConf
from test_train import compose_train

CONF = Path(__file__).resolve().parents[1] / "conf"
MODEL_CONFIGS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))


def parameters(target: str) -> set[str]:
    return set(inspect.signature(get_class(target)).parameters)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_keys_are_the_constructor_arguments(name, tmp_path):
    model = OmegaConf.to_container(compose_train([f"model={name}"], tmp_path / "run").model)
    keys = set(model) - {"_target_"}
    assert keys == parameters(model["_target_"]), name
    for key, value in model.items():
        if isinstance(value, dict) and "_target_" in value and not value.get("_partial_"):
            assert set(value) - {"_target_"} <= parameters(value["_target_"]), f"{name}.{key}"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("ichseg.module.ICHSegmentationModule", "ichseg.lit.segmentation.ICHSegmentationModule"),
        ("ichseg.models.threshold.ThresholdModule", "ichseg.lit.threshold.ThresholdModule"),
        ("ichseg.models.threshold.IntensityBand", "ichseg.models.intensity_band.IntensityBand"),
        ("ichseg.losses.DiceBCELoss", "ichseg.models.losses.DiceBCELoss"),
        ("ichseg.losses.SoftDiceLoss", "ichseg.models.losses.SoftDiceLoss"),
    ],
)
def test_earlier_targets_resolve_to_the_same_classes(old, new):
    assert get_class(old) is get_class(new)


def test_earlier_scheduler_target_resolves():
    assert get_method("ichseg.module.inverse_time_decay") is get_method(
        "ichseg.lit.segmentation.inverse_time_decay"
    )
