"""Segmentation and detection metrics from slice counts: the paper's (Tables 5 and 6, subtype,
age) per slice, per patient and summarised over patients.

The functions only read :class:`~ichseg.eval.counts.SliceCounts`; the volume metrics are in
:mod:`ichseg.eval.volumes`, all tables of one evaluation in :mod:`ichseg.eval.tables`. The
definitions (slice Dice on ICH slices only, population std, the strict area minimum, ...) are in
docs/evaluation.md.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ichseg.data.labels import SUBTYPES
from ichseg.errors import ConfigError
from ichseg.eval.counts import (
    DEFAULT_THRESHOLDS,
    SliceCounts,
    count_slices,
    score_probabilities,
)
from ichseg.eval.postprocess import pixel_scale

__all__ = ["DEFAULT_THRESHOLDS", "SliceCounts", "count_slices", "score_probabilities"]

#: The authors' slice-detection minimum: 400 predicted pixels at 640x640.
PAPER_MIN_AREA = 400.0
#: Pixels of a working-resolution slice (the unit of ``min_area``).
WORKING_AREA = 640 * 640
#: The ICH subtypes, in the label CSVs' order (one owner: :data:`ichseg.data.labels.SUBTYPES`).
SUBTYPE_NAMES: tuple[str, ...] = SUBTYPES
#: Age groups of the paper.
AGE_GROUPS: tuple[str, ...] = ("<18", ">=18")


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is 0."""
    return float(numerator) / float(denominator) if denominator else math.nan


def _ratios(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio in float64, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def area_scale_of(shape: Sequence[int], mode: str = "resize", working_size: int = 640) -> float:
    """Pixels of a ``shape`` grid per working-resolution pixel: the product of
    :func:`~ichseg.eval.postprocess.pixel_scale` (``(H * W) / working_size**2`` for slices
    resized to the working size, 1 for slices cropped to it)."""
    scale_h, scale_w = pixel_scale(shape, working_size, mode)
    return scale_h * scale_w


# --------------------------------------------------------------------------- per slice


def slice_dice(counts: SliceCounts, threshold: float = 0.5) -> np.ndarray:
    """(N,) slice Dice ``2I / (G + P)``; NaN on slices without ground-truth ICH."""
    t = counts.column(threshold)
    dice = _ratios(2 * counts.intersection[:, t], counts.gt_pixels + counts.pred_pixels[:, t])
    return np.where(counts.gt_positive, dice, np.nan)


def slice_jaccard(counts: SliceCounts, threshold: float = 0.5) -> np.ndarray:
    """(N,) slice Jaccard ``I / (G + P - I)``; NaN on slices without ground-truth ICH."""
    t = counts.column(threshold)
    union = counts.gt_pixels + counts.pred_pixels[:, t] - counts.intersection[:, t]
    return np.where(counts.gt_positive, _ratios(counts.intersection[:, t], union), np.nan)


def predicted_positive(
    counts: SliceCounts, threshold: float = 0.5, min_area: float = PAPER_MIN_AREA
) -> np.ndarray:
    """(N,) bool: the predicted area exceeds the minimum, ``P > min_area * area_scale``."""
    if min_area < 0:
        raise ConfigError(f"the detection area minimum must be non-negative, got {min_area}")
    return counts.pred_pixels[:, counts.column(threshold)] > min_area * counts.area_scale


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Summary:
    """Mean, population std (``ddof=0``), min, max and count of the non-NaN values."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float] | np.ndarray) -> Summary:
        """Summary of ``values`` with NaN left out (all NaN when nothing is left)."""
        array = np.asarray(
            list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64
        )
        array = array[~np.isnan(array)]
        if array.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        return cls(
            float(array.mean()),
            float(array.std(ddof=0)),
            float(array.min()),
            float(array.max()),
            int(array.size),
        )

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class DetectionScores:
    """Slice-detection confusion counts at one threshold and area minimum, and their rates."""

    threshold: float
    min_area: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def sensitivity(self) -> float:
        """``TP / (TP + FN)``; NaN without positive slices."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """``TN / (TN + FP)``; NaN without negative slices."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def accuracy(self) -> float:
        """``(TP + TN) / N``; NaN without slices."""
        return _ratio(self.tp + self.tn, self.n)

    def to_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "accuracy": self.accuracy,
        }


def _confusion(predicted: np.ndarray, actual: np.ndarray) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` of bool vectors, with torchmetrics' binary stat scores."""
    if predicted.size == 0:
        return 0, 0, 0, 0
    from torchmetrics.functional.classification import binary_stat_scores

    stats = binary_stat_scores(
        torch.from_numpy(predicted.astype(np.int64)), torch.from_numpy(actual.astype(np.int64))
    )
    tp, fp, tn, fn, _ = (int(v) for v in stats.tolist())
    return tp, fp, tn, fn


def detection_scores(
    counts: SliceCounts, threshold: float = 0.5, min_area: float = PAPER_MIN_AREA
) -> DetectionScores:
    """Slice detection pooled over all slices of ``counts`` (one row of Table 6)."""
    tp, fp, tn, fn = _confusion(predicted_positive(counts, threshold, min_area), counts.gt_positive)
    return DetectionScores(float(threshold), float(min_area), tp, fp, tn, fn)


def detection_table(
    counts: SliceCounts, thresholds: Sequence[float] | None = None, min_area: float = PAPER_MIN_AREA
) -> list[DetectionScores]:
    """Table 6: :func:`detection_scores` at each threshold (default: all of ``counts``)."""
    levels = counts.thresholds.tolist() if thresholds is None else list(thresholds)
    return [detection_scores(counts, level, min_area) for level in levels]


# --------------------------------------------------------------------------- per patient


@dataclass(eq=False)
class PatientMetrics:
    """Per-patient metrics at one threshold, one row per patient (sorted by id). NaN = undefined."""

    threshold: float
    min_area: float
    patient: np.ndarray  # (P,) int64
    n_slices: np.ndarray  # (P,) int64
    n_positive_slices: np.ndarray  # (P,) int64: slices with ground-truth ICH
    dice: np.ndarray  # (P,) the paper's: mean slice Dice over positive slices
    jaccard: np.ndarray  # (P,) the paper's: mean slice Jaccard over positive slices
    dice_3d: np.ndarray  # (P,) volume Dice, nnU-Net empty rule
    sensitivity: np.ndarray  # (P,) slice detection within the patient
    specificity: np.ndarray  # (P,)
    true_ml: np.ndarray  # (P,) ground-truth bleed volume
    predicted_ml: np.ndarray  # (P,) predicted bleed volume
    outside_ml: np.ndarray  # (P,) predicted volume outside the ground-truth bleed

    @property
    def has_ich(self) -> np.ndarray:
        """(P,) bool: the patient has a ground-truth ICH pixel."""
        return self.n_positive_slices > 0

    @property
    def abs_error_ml(self) -> np.ndarray:
        """(P,) ``|predicted - true|`` mL on patients with ICH, NaN on the others."""
        return np.where(self.has_ich, np.abs(self.predicted_ml - self.true_ml), np.nan)

    @property
    def false_positive_ml(self) -> np.ndarray:
        """(P,) predicted mL on patients without ICH, NaN on the others."""
        return np.where(self.has_ich, np.nan, self.predicted_ml)

    def __len__(self) -> int:
        return int(self.patient.size)

    def rows(self, patients: Iterable[int]) -> np.ndarray:
        """Row indices of the ``patients`` that are present (absent ids are skipped)."""
        wanted = np.asarray(list(patients), dtype=np.int64)
        return np.flatnonzero(np.isin(self.patient, wanted))

    def to_dict(self) -> dict[str, Any]:
        names = (
            "patient", "n_slices", "n_positive_slices", "dice", "jaccard", "dice_3d", "sensitivity",
            "specificity", "true_ml", "predicted_ml", "outside_ml", "abs_error_ml",
            "false_positive_ml",
        )  # fmt: skip
        arrays = {name: getattr(self, name).tolist() for name in names}
        return {"threshold": self.threshold, "min_area": self.min_area, **arrays}


def patient_metrics(
    counts: SliceCounts, threshold: float = 0.5, min_area: float = PAPER_MIN_AREA
) -> PatientMetrics:
    """Per-patient metrics (module docstring), vectorised with one ``bincount`` per quantity."""
    t = counts.column(threshold)
    patients, group = np.unique(counts.patient, return_inverse=True)
    group = group.reshape(-1)
    n_patients = patients.size

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(
            group, weights=np.asarray(values, dtype=np.float64), minlength=n_patients
        )

    positive = counts.gt_positive
    dice_values = np.nan_to_num(slice_dice(counts, threshold))  # NaN (negative slices) -> weight 0
    jaccard_values = np.nan_to_num(slice_jaccard(counts, threshold))
    n_positive = total(positive)
    gt_sum, pred_sum = total(counts.gt_pixels), total(counts.pred_pixels[:, t])
    detected = predicted_positive(counts, threshold, min_area)
    return PatientMetrics(
        threshold=float(threshold),
        min_area=float(min_area),
        patient=patients.astype(np.int64),
        n_slices=np.bincount(group, minlength=n_patients).astype(np.int64),
        n_positive_slices=n_positive.astype(np.int64),
        dice=_ratios(total(np.where(positive, dice_values, 0.0)), n_positive),
        jaccard=_ratios(total(np.where(positive, jaccard_values, 0.0)), n_positive),
        dice_3d=_ratios(2 * total(counts.intersection[:, t]), gt_sum + pred_sum),
        sensitivity=_ratios(total(detected & positive), n_positive),
        specificity=_ratios(total(~detected & ~positive), total(~positive)),
        true_ml=total(counts.gt_pixels * counts.voxel_ml),
        predicted_ml=total(counts.pred_pixels[:, t] * counts.voxel_ml),
        outside_ml=total((counts.pred_pixels[:, t] - counts.intersection[:, t]) * counts.voxel_ml),
    )


# --------------------------------------------------------------------------- the paper's tables


@dataclass(frozen=True)
class SegmentationTable:
    """Table 5: the paper's per-patient Jaccard / Dice and per-patient slice sensitivity /
    specificity summarised over patients, with the pooled slice detection beside them."""

    threshold: float
    min_area: float
    jaccard: Summary
    dice: Summary
    sensitivity: Summary
    specificity: Summary
    pooled: DetectionScores

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "min_area": self.min_area,
            **{
                name: getattr(self, name).to_dict()
                for name in ("jaccard", "dice", "sensitivity", "specificity")
            },
            "pooled": self.pooled.to_dict(),
        }


def segmentation_table(
    counts: SliceCounts, threshold: float = 0.5, min_area: float = PAPER_MIN_AREA
) -> SegmentationTable:
    """Table 5 from slice counts."""
    per_patient = patient_metrics(counts, threshold, min_area)
    return SegmentationTable(
        threshold=float(threshold),
        min_area=float(min_area),
        jaccard=Summary.of(per_patient.jaccard),
        dice=Summary.of(per_patient.dice),
        sensitivity=Summary.of(per_patient.sensitivity),
        specificity=Summary.of(per_patient.specificity),
        pooled=detection_scores(counts, threshold, min_area),
    )


def subtype_groups(
    patient_subtypes: Mapping[int, Iterable[str] | np.ndarray], names: Sequence[str] = SUBTYPE_NAMES
) -> dict[str, list[int]]:
    """``{subtype: [patients]}`` from each patient's subtypes (names, or flags in ``names`` order).

    A patient with several subtypes is listed under each; every name in ``names`` is a key.
    """
    groups: dict[str, list[int]] = {name: [] for name in names}
    for patient, subtypes in patient_subtypes.items():
        if (
            isinstance(subtypes, np.ndarray)
            and subtypes.dtype != object
            and subtypes.dtype.kind in "biu"
        ):
            flags = subtypes.astype(bool).reshape(-1)
            if flags.size != len(names):
                raise ConfigError(
                    f"patient {patient}: {flags.size} subtype flags for subtypes {list(names)}"
                )
            present = [name for name, flag in zip(names, flags, strict=True) if flag]
        else:
            present = list(subtypes)
        for name in present:
            if name not in groups:
                raise ConfigError(
                    f"patient {patient}: unknown subtype {name!r}; expected one of {list(names)}"
                )
            groups[name].append(int(patient))
    return groups


def patient_subtypes_from_slices(
    patient: np.ndarray, slice_flags: np.ndarray, names: Sequence[str] = SUBTYPE_NAMES
) -> dict[int, list[str]]:
    """Each patient's subtypes: those flagged on any of its slices (``slice_flags`` ``(N, 5)``)."""
    patients, group = np.unique(np.asarray(patient, dtype=np.int64), return_inverse=True)
    flags = np.asarray(slice_flags, dtype=bool).reshape(len(group.reshape(-1)), len(names))
    any_flag = np.zeros((patients.size, len(names)), dtype=bool)
    np.logical_or.at(any_flag, group.reshape(-1), flags)
    return {
        int(p): [n for n, f in zip(names, row, strict=True) if f]
        for p, row in zip(patients, any_flag, strict=True)
    }


def age_groups(ages: Mapping[int, float | None], cutoff: float = 18.0) -> dict[str, list[int]]:
    """``{"<18": [...], ">=18": [...]}``: patients by age (unknown ages are left out)."""
    groups: dict[str, list[int]] = {AGE_GROUPS[0]: [], AGE_GROUPS[1]: []}
    for patient, age in ages.items():
        if age is None or not np.isfinite(age):
            continue
        groups[AGE_GROUPS[0] if age < cutoff else AGE_GROUPS[1]].append(int(patient))
    return groups


def group_summaries(
    metrics: PatientMetrics, groups: Mapping[str, Iterable[int]], field: str = "dice"
) -> dict[str, Summary]:
    """``{group: Summary}`` of a per-patient field (default the paper's Dice) over each group."""
    values = getattr(metrics, field)
    return {name: Summary.of(values[metrics.rows(members)]) for name, members in groups.items()}


#: Names kept here from before the volume metrics and the tables had their own modules.
_MOVED = {
    "voxel_volume_ml": "volumes", "VolumeTable": "volumes", "volume_table": "volumes",
    "EvaluationTables": "tables", "evaluation_tables": "tables", "assemble_tables": "tables",
    "concatenate_patient_metrics": "tables", "operating_point_tables": "tables",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """The volume and table names of :mod:`ichseg.eval.volumes` / :mod:`ichseg.eval.tables`."""
    if name in _MOVED:
        return getattr(importlib.import_module(f"ichseg.eval.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
