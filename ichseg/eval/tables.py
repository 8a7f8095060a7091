"""Every table of one evaluation (:class:`EvaluationTables`: Tables 5 and 6, Dice by subtype and
age, the volume metrics, the per-patient rows), the patient facts they group by
(:class:`PatientInfo`) and the paper's reference numbers. See docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ichseg.errors import ConfigError
from ichseg.eval.counts import SliceCounts
from ichseg.eval.metrics import (
    PAPER_MIN_AREA,
    DetectionScores,
    PatientMetrics,
    SegmentationTable,
    Summary,
    age_groups,
    detection_scores,
    detection_table,
    group_summaries,
    patient_metrics,
    segmentation_table,
    subtype_groups,
)
from ichseg.eval.volumes import VolumeTable, volume_table

#: Paper, Table 5 (test folds): per-patient Jaccard / Dice and slice sensitivity / specificity
#: (fractions, not percent), summarised over patients.
PAPER_TABLE5: dict[str, dict[str, float]] = {
    "jaccard": {"mean": 0.218, "std": 0.163, "min": 0.0, "max": 0.528},
    "dice": {"mean": 0.315, "std": 0.211, "min": 0.0, "max": 0.677},
    "sensitivity": {"mean": 0.9728, "std": 0.099, "min": 0.50, "max": 1.0},
    "specificity": {"mean": 0.504, "std": 0.299, "min": 0.0, "max": 1.0},
}
#: Paper, Table 6: threshold -> pooled slice sensitivity, specificity, accuracy (fractions).
PAPER_TABLE6: dict[float, dict[str, float]] = {
    0.5: {"sensitivity": 0.972, "specificity": 0.504, "accuracy": 0.566},
    0.6: {"sensitivity": 0.887, "specificity": 0.622, "accuracy": 0.659},
    0.7: {"sensitivity": 0.776, "specificity": 0.745, "accuracy": 0.760},
    0.8: {"sensitivity": 0.737, "specificity": 0.824, "accuracy": 0.825},
    0.9: {"sensitivity": 0.631, "specificity": 0.886, "accuracy": 0.870},
}
#: Paper: mean per-patient Dice of the patients with each subtype.
PAPER_SUBTYPE_DICE: dict[str, float] = {
    "SDH": 0.52, "EDH": 0.35, "IVH": 0.30, "IPH": 0.28, "SAH": 0.23,
}  # fmt: skip
#: Paper: mean per-patient Dice by age group.
PAPER_AGE_DICE: dict[str, float] = {"<18": 0.321, ">=18": 0.309}


@dataclass(frozen=True)
class EvaluationTables:
    """Every table of one evaluation (a fold, or all folds merged)."""

    segmentation: SegmentationTable  # Table 5
    detection: list[DetectionScores]  # Table 6
    subtype_dice: dict[str, Summary]
    age_dice: dict[str, Summary]
    volume: VolumeTable
    patients: PatientMetrics

    def to_dict(self) -> dict[str, Any]:
        return {
            "segmentation": self.segmentation.to_dict(),
            "detection": [row.to_dict() for row in self.detection],
            "subtype_dice": {name: s.to_dict() for name, s in self.subtype_dice.items()},
            "age_dice": {name: s.to_dict() for name, s in self.age_dice.items()},
            "volume": self.volume.to_dict(),
            "patients": self.patients.to_dict(),
        }


def evaluation_tables(
    counts: SliceCounts,
    threshold: float = 0.5,
    min_area: float = PAPER_MIN_AREA,
    detection_thresholds: Sequence[float] | None = None,
    patient_subtypes: Mapping[int, Iterable[str] | np.ndarray] | None = None,
    ages: Mapping[int, float | None] | None = None,
) -> EvaluationTables:
    """All tables from slice counts: Table 5 and the per-patient metrics at ``threshold``, Table 6
    at ``detection_thresholds`` (default: every threshold of ``counts``), Dice by subtype and age
    (empty when the mapping is not given) and the volume metrics."""
    return assemble_tables(
        segmentation_table(counts, threshold, min_area),
        detection_table(counts, detection_thresholds, min_area),
        patient_metrics(counts, threshold, min_area),
        patient_subtypes,
        ages,
    )


def assemble_tables(
    segmentation: SegmentationTable,
    detection: list[DetectionScores],
    per_patient: PatientMetrics,
    patient_subtypes: Mapping[int, Iterable[str] | np.ndarray] | None = None,
    ages: Mapping[int, float | None] | None = None,
) -> EvaluationTables:
    """:class:`EvaluationTables` from Tables 5 and 6 and the per-patient metrics, adding the Dice
    by subtype and age (empty when the mapping is not given) and the volume metrics."""
    return EvaluationTables(
        segmentation=segmentation,
        detection=detection,
        subtype_dice=group_summaries(per_patient, subtype_groups(patient_subtypes))
        if patient_subtypes
        else {},
        age_dice=group_summaries(per_patient, age_groups(ages)) if ages else {},
        volume=volume_table(per_patient),
        patients=per_patient,
    )


def concatenate_patient_metrics(parts: Sequence[PatientMetrics]) -> PatientMetrics:
    """The rows of several :class:`PatientMetrics` (disjoint patients) as one, sorted by patient.

    The threshold is kept when all parts share it, NaN otherwise (each part at its own).
    """
    if not parts:
        raise ConfigError("nothing to concatenate: no patient metrics given")
    levels = {float(p.threshold) for p in parts}
    names = ("patient", "n_slices", "n_positive_slices", "dice", "jaccard", "dice_3d",
             "sensitivity", "specificity", "true_ml", "predicted_ml", "outside_ml")  # fmt: skip
    arrays = {name: np.concatenate([getattr(p, name) for p in parts]) for name in names}
    order = np.argsort(arrays["patient"], kind="stable")
    return PatientMetrics(
        threshold=levels.pop() if len(levels) == 1 else math.nan,
        min_area=float(parts[0].min_area),
        **{name: values[order] for name, values in arrays.items()},
    )


def operating_point_tables(
    parts: Sequence[tuple[SliceCounts, float]],
    min_area: float = PAPER_MIN_AREA,
    patient_subtypes: Mapping[int, Iterable[str] | np.ndarray] | None = None,
    ages: Mapping[int, float | None] | None = None,
) -> EvaluationTables:
    """All tables of several evaluations (e.g. test folds) each at ITS OWN threshold.

    ``parts`` holds ``(counts, threshold)`` per evaluation (disjoint patients; threshold columns
    alike but for each part's own, as with a calibrated operating point), e.g. folds whose
    operating point was chosen on their own validation split. Table 5, the per-patient,
    subtype, age and volume tables use each part's counts at its threshold
    (their ``threshold`` is NaN when the parts differ); the pooled detection of Table 5 sums the
    parts' confusion counts at their thresholds; Table 6 is computed over all parts at every
    threshold the parts share.
    """
    if not parts:
        raise ConfigError("no evaluations to combine")
    per_patient = concatenate_patient_metrics(
        [patient_metrics(counts, level, min_area) for counts, level in parts]
    )
    scores = [detection_scores(counts, level, min_area) for counts, level in parts]
    threshold = per_patient.threshold
    totals = (sum(getattr(s, name) for s in scores) for name in ("tp", "fp", "tn", "fn"))
    pooled = DetectionScores(threshold, float(min_area), *totals)
    segmentation = SegmentationTable(
        threshold=threshold,
        min_area=float(min_area),
        jaccard=Summary.of(per_patient.jaccard),
        dice=Summary.of(per_patient.dice),
        sensitivity=Summary.of(per_patient.sensitivity),
        specificity=Summary.of(per_patient.specificity),
        pooled=pooled,
    )
    shared = SliceCounts.shared_thresholds(counts for counts, _ in parts)
    merged = SliceCounts.concatenate([counts.at_thresholds(shared) for counts, _ in parts])
    detection = detection_table(merged, None, min_area)
    return assemble_tables(segmentation, detection, per_patient, patient_subtypes, ages)


# --------------------------------------------------------------------------- patients


@dataclass(frozen=True)
class PatientInfo:
    """What the tables need to know of a patient besides its counts: age and subtypes."""

    patient: int
    age: float | None = None
    gender: str | None = None
    subtypes: tuple[str, ...] = ()  # ICH subtypes present on any of its slices

    def to_dict(self) -> dict[str, Any]:
        return {
            "age": self.age, "gender": self.gender, "subtypes": list(self.subtypes),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, patient: int, data: Mapping[str, Any]) -> PatientInfo:
        age = data.get("age")
        return cls(
            patient=int(patient),
            age=None if age is None else float(age),
            gender=data.get("gender"),
            subtypes=tuple(str(s) for s in data.get("subtypes") or ()),
        )


def compute_tables(
    counts: SliceCounts,
    patients: Mapping[int, PatientInfo] | None = None,
    threshold: float = 0.5,
    min_area: float = PAPER_MIN_AREA,
) -> EvaluationTables:
    """:func:`~ichseg.eval.metrics.evaluation_tables` with subtypes and ages from ``patients``."""
    return evaluation_tables(
        counts, threshold=threshold, min_area=min_area, **subtypes_and_ages(patients)
    )


def compute_operating_point_tables(
    parts: Sequence[tuple[SliceCounts, float]],
    patients: Mapping[int, PatientInfo] | None = None,
    min_area: float = PAPER_MIN_AREA,
) -> EvaluationTables:
    """:func:`~ichseg.eval.metrics.operating_point_tables` (each part at its own threshold) with
    subtypes and ages from ``patients``."""
    return operating_point_tables(parts, min_area=min_area, **subtypes_and_ages(patients))


def subtypes_and_ages(patients: Mapping[int, PatientInfo] | None) -> dict[str, Any]:
    """``patient_subtypes`` and ``ages`` keyword arguments of the table functions (None where
    ``patients`` has none)."""
    patients = patients or {}
    subtypes = {p: list(info.subtypes) for p, info in patients.items()}
    ages = {p: info.age for p, info in patients.items()}
    return {
        "patient_subtypes": subtypes if subtypes else None,
        "ages": ages if any(a is not None for a in ages.values()) else None,
    }
