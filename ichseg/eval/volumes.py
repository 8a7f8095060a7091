"""Volume metrics beyond the paper: voxel volumes in mL, and the 3D Dice, volume error,
false-positive volume and volume outside the bleed summarised over patients (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ichseg.eval.metrics import PatientMetrics, Summary
from ichseg.io.nifti import spacing_volume_ml

#: Voxel volume in mL of a grid with ``spacing_mm`` (x, y, z in mm): the one of
#: :func:`ichseg.io.nifti.spacing_volume_ml` (raises :class:`~ichseg.errors.ConfigError` when
#: the spacing is not three positive numbers).
voxel_volume_ml = spacing_volume_ml


@dataclass(frozen=True)
class VolumeTable:
    """3D Dice (nnU-Net rule) over patients, volume error on ICH patients, false-positive volume
    on ICH-free patients, predicted volume outside the bleed on all patients, all in mL."""

    dice_3d: Summary
    abs_error_ml: Summary
    false_positive_ml: Summary
    outside_ml: Summary
    true_ml: Summary
    predicted_ml: Summary

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in self.__dataclass_fields__}


def volume_table(metrics: PatientMetrics) -> VolumeTable:
    """The volume metrics of :class:`PatientMetrics` summarised over patients."""
    return VolumeTable(
        dice_3d=Summary.of(metrics.dice_3d),
        abs_error_ml=Summary.of(metrics.abs_error_ml),
        false_positive_ml=Summary.of(metrics.false_positive_ml),
        outside_ml=Summary.of(metrics.outside_ml),
        true_ml=Summary.of(np.where(metrics.has_ich, metrics.true_ml, np.nan)),
        predicted_ml=Summary.of(np.where(metrics.has_ich, metrics.predicted_ml, np.nan)),
    )
