"""Segmentation and detection metrics: the paper's (Tables 5 and 6, subtype, age) and beyond.

Everything is computed from per-slice pixel counts held in a :class:`SliceCounts` (one row per
slice: patient, slice, ground-truth pixels, and per probability threshold the predicted pixels and
the intersection, plus the voxel volume and the area scale of the slice's grid). Counts are plain
integers, so a fold's results merge across folds and across DDP processes by concatenation
(:meth:`SliceCounts.concatenate`, then :meth:`SliceCounts.deduplicate` for the samples Lightning
repeats to pad the last batch). The aggregation functions below only read counts; the report code
only formats what they return.

Definitions (``G``, ``P``, ``I``: ground-truth, predicted and intersection pixel counts of a slice
at one threshold, after post-processing):

* slice Dice ``2I / (G + P)`` and slice Jaccard ``I / (G + P - I)``, defined ONLY on slices with
  ``G > 0`` (NaN elsewhere, as the authors' code skipped them);
* the paper's per-patient Dice / Jaccard: the mean of the slice values over the patient's slices
  with ``G > 0``; patients without such a slice have none (NaN) and drop out;
* summaries over patients (:class:`Summary`): mean, POPULATION standard deviation (``ddof=0``, as
  the authors' ``np.nanstd``), min, max and the number of patients, NaN values left out;
* slice detection: ground truth positive when ``G > 0``; predicted positive when ``P`` EXCEEDS the
  area minimum, strictly: ``P > min_area * area_scale`` (the authors' ``sum > 400``). ``min_area``
  is in working-resolution (640x640) pixels, 400 in the paper; ``area_scale`` is the number of
  pixels of the slice's grid per working pixel (``(H * W) / 640**2`` for a slice resized to 640,
  1 for the JPG release cropped from 650). Sensitivity ``TP / (TP + FN)``, specificity
  ``TN / (TN + FP)``, accuracy ``(TP + TN) / N``, pooled over all slices (Table 6), or per patient
  then summarised (Table 5's sensitivity / specificity columns); 0 / 0 is NaN;
* 3D Dice per patient ``2 sum(I) / (sum(G) + sum(P))`` over all its slices, with nnU-Net's empty
  rule: both empty -> NaN (left out of the mean), ground truth empty but prediction not -> 0;
* volumes in mL: pixel count x voxel volume (mm^3 / 1000, from the header spacing of the grid
  that was scored, :func:`voxel_volume_ml`); absolute error ``|predicted - true|`` on patients with
  ICH; false-positive volume = the predicted volume on patients without ICH; volume outside the
  bleed = the predicted volume not on ground-truth ICH pixels (``sum(P - I)``), on every patient;
* subtype / age groups: the paper's per-patient Dice summarised over the patients of each group; a
  patient with several subtypes is in each of their groups; ages ``< 18`` and ``>= 18``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ichseg.errors import ConfigError
from ichseg.eval.postprocess import PAPER, PostprocessConfig, postprocess_thresholds
from ichseg.utils.atomic import atomic_path

#: Table 6's probability thresholds.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
#: The authors' slice-detection minimum: 400 predicted pixels at 640x640.
PAPER_MIN_AREA = 400.0
#: Pixels of a working-resolution slice (the unit of ``min_area``).
WORKING_AREA = 640 * 640
#: Subtype names, in the order of the label CSV columns.
SUBTYPE_NAMES: tuple[str, ...] = ("IVH", "IPH", "SAH", "EDH", "SDH")
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


def voxel_volume_ml(spacing_mm: Sequence[float]) -> float:
    """Voxel volume in mL of a grid with ``spacing_mm`` (the first three values: x, y, z in mm)."""
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)[:3]
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ConfigError(f"voxel spacing must be three positive numbers in mm, got {spacing_mm}")
    return float(np.prod(spacing) / 1000.0)


def area_scale_of(shape: Sequence[int], mode: str = "resize", working_size: int = 640) -> float:
    """Pixels of a ``shape`` grid per working-resolution pixel: ``(H * W) / working_size**2``
    for slices resized to the working size, 1 for slices cropped to it."""
    if mode == "crop":
        return 1.0
    if mode != "resize":
        raise ConfigError(f"working-size mode must be 'resize' or 'crop', not {mode!r}")
    return float(shape[-2]) * float(shape[-1]) / float(working_size * working_size)


# --------------------------------------------------------------------------- per-slice counts


@dataclass(eq=False)
class SliceCounts:
    """Per-slice pixel counts: everything the metrics need, mergeable across folds and processes.

    ``N`` slices, ``T`` thresholds. ``pred_pixels`` and ``intersection`` are ``(N, T)``: column
    ``t`` is the post-processed prediction at ``thresholds[t]``.
    """

    patient: np.ndarray  # (N,) int64
    slice_index: np.ndarray  # (N,) int64
    thresholds: np.ndarray  # (T,) float64
    gt_pixels: np.ndarray  # (N,) int64
    pred_pixels: np.ndarray  # (N, T) int64
    intersection: np.ndarray  # (N, T) int64
    voxel_ml: np.ndarray = field(default=None)  # type: ignore[assignment]  # (N,) float64, NaN unknown
    area_scale: np.ndarray = field(default=None)  # type: ignore[assignment]  # (N,) float64

    def __post_init__(self) -> None:
        self.patient = np.asarray(self.patient, dtype=np.int64).reshape(-1)
        n = self.patient.size
        self.slice_index = np.asarray(self.slice_index, dtype=np.int64).reshape(-1)
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64).reshape(-1)
        n_thresholds = self.thresholds.size
        self.gt_pixels = np.asarray(self.gt_pixels, dtype=np.int64).reshape(-1)
        self.pred_pixels = np.asarray(self.pred_pixels, dtype=np.int64).reshape(n, n_thresholds)
        self.intersection = np.asarray(self.intersection, dtype=np.int64).reshape(n, n_thresholds)
        self.voxel_ml = np.broadcast_to(
            np.asarray(np.nan if self.voxel_ml is None else self.voxel_ml, dtype=np.float64), (n,)
        ).copy()
        self.area_scale = np.broadcast_to(
            np.asarray(1.0 if self.area_scale is None else self.area_scale, dtype=np.float64), (n,)
        ).copy()
        if self.slice_index.size != n or self.gt_pixels.size != n:
            raise ConfigError("patient, slice_index and gt_pixels must have one value per slice")
        if n_thresholds == 0 or len(np.unique(self.thresholds)) != n_thresholds:
            raise ConfigError(
                f"thresholds must be distinct and at least one, got {self.thresholds.tolist()}"
            )
        if (
            np.any(self.gt_pixels < 0)
            or np.any(self.intersection < 0)
            or np.any(self.intersection > self.pred_pixels)
            or np.any(self.intersection > self.gt_pixels[:, None])
        ):
            raise ConfigError(
                "inconsistent slice counts: need 0 <= intersection <= min(gt, predicted)"
            )
        if np.any(self.area_scale <= 0):
            raise ConfigError("area scales must be positive")

    # ---- construction and merging

    @classmethod
    def empty(cls, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> SliceCounts:
        """No slices."""
        t = len(thresholds)
        zeros = np.zeros(0, dtype=np.int64)
        return cls(zeros, zeros, thresholds, zeros, np.zeros((0, t)), np.zeros((0, t)))

    @classmethod
    def concatenate(cls, parts: Iterable[SliceCounts]) -> SliceCounts:
        """All slices of ``parts`` (e.g. the five test folds), which must share their thresholds."""
        parts = list(parts)
        if not parts:
            raise ConfigError("nothing to concatenate: no slice counts given")
        thresholds = parts[0].thresholds
        for part in parts[1:]:
            if part.thresholds.shape != thresholds.shape or not np.allclose(
                part.thresholds, thresholds
            ):
                raise ConfigError(
                    f"cannot merge slice counts with thresholds {part.thresholds.tolist()} "
                    f"and {thresholds.tolist()}"
                )
        return cls(
            **{
                name: np.concatenate([getattr(part, name) for part in parts])
                for name in (
                    "patient",
                    "slice_index",
                    "gt_pixels",
                    "pred_pixels",
                    "intersection",
                    "voxel_ml",
                    "area_scale",
                )
            },
            thresholds=thresholds,
        )

    def select(self, rows: np.ndarray) -> SliceCounts:
        """The slices at ``rows`` (bool mask or integer indices)."""
        return SliceCounts(
            self.patient[rows],
            self.slice_index[rows],
            self.thresholds,
            self.gt_pixels[rows],
            self.pred_pixels[rows],
            self.intersection[rows],
            self.voxel_ml[rows],
            self.area_scale[rows],
        )

    def deduplicate(self) -> SliceCounts:
        """One row per ``(patient, slice)``, the first seen (DDP padding repeats samples).

        Raises :class:`ConfigError` when two rows of the same slice disagree (the same slice scored
        twice differently, e.g. a patient in two test folds).
        """
        keys = np.stack([self.patient, self.slice_index], axis=1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        for name in ("gt_pixels", "pred_pixels", "intersection"):
            values = getattr(self, name)
            if not np.array_equal(values, values[first[inverse]]):
                raise ConfigError(f"the same (patient, slice) appears with different {name}")
        return self.select(np.sort(first))

    def sorted(self) -> SliceCounts:
        """Rows ordered by patient, then slice."""
        return self.select(np.lexsort((self.slice_index, self.patient)))

    # ---- access

    def __len__(self) -> int:
        return int(self.patient.size)

    @property
    def gt_positive(self) -> np.ndarray:
        """(N,) bool: the slice's ground truth has an ICH pixel."""
        return self.gt_pixels > 0

    def column(self, threshold: float) -> int:
        """Index of ``threshold`` in :attr:`thresholds`."""
        matches = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-9))
        if matches.size == 0:
            raise ConfigError(
                f"no counts at threshold {threshold}; "
                f"the slices were scored at {self.thresholds.tolist()}"
            )
        return int(matches[0])

    # ---- persistence

    def to_dict(self) -> dict[str, list]:
        """Plain lists (JSON-able; NaN voxel volumes stay float NaN)."""
        return {name: getattr(self, name).tolist() for name in self._fields()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SliceCounts:
        """Inverse of :meth:`to_dict` (also accepts the arrays of :meth:`save`)."""
        return cls(**{name: np.asarray(data[name]) for name in cls._fields()})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` file atomically."""
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **{name: getattr(self, name) for name in self._fields()})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SliceCounts:
        """Read a file written by :meth:`save`."""
        with np.load(path) as data:
            return cls.from_dict({name: data[name] for name in cls._fields()})

    @staticmethod
    def _fields() -> tuple[str, ...]:
        return (
            "patient",
            "slice_index",
            "thresholds",
            "gt_pixels",
            "pred_pixels",
            "intersection",
            "voxel_ml",
            "area_scale",
        )


def _pixel_sums(masks: np.ndarray | torch.Tensor) -> np.ndarray:
    """Foreground pixels over the last two axes, as int64 numpy."""
    if isinstance(masks, torch.Tensor):
        return masks.bool().flatten(-2).sum(-1).cpu().numpy().astype(np.int64)
    masks = np.asarray(masks, dtype=bool)
    return np.count_nonzero(masks.reshape(*masks.shape[:-2], -1), axis=-1).astype(np.int64)


def count_slices(
    gt: np.ndarray | torch.Tensor,
    predicted: np.ndarray | torch.Tensor,
    patient: int | Sequence[int] | np.ndarray,
    slice_index: Sequence[int] | np.ndarray | None = None,
    thresholds: Sequence[float] = (0.5,),
    voxel_ml: float | np.ndarray = math.nan,
    area_scale: float | np.ndarray = 1.0,
) -> SliceCounts:
    """:class:`SliceCounts` of masks: ground truth ``(N, H, W)``, predictions ``(T, N, H, W)``.

    ``predicted`` may be ``(N, H, W)`` when there is one threshold. ``patient`` is one id for all
    slices or one per slice; ``slice_index`` defaults to ``0 .. N-1``. Works on numpy arrays and
    on torch tensors (summed on their device).
    """
    if gt.ndim != 3:
        raise ConfigError(f"ground-truth masks must be (N, H, W), got shape {tuple(gt.shape)}")
    if predicted.ndim == 3:
        predicted = predicted[None]
    if predicted.ndim != 4 or tuple(predicted.shape[1:]) != tuple(gt.shape):
        raise ConfigError(
            f"predicted masks of shape {tuple(predicted.shape)} "
            f"do not match ground truth {tuple(gt.shape)}"
        )
    if predicted.shape[0] != len(thresholds):
        raise ConfigError(
            f"{predicted.shape[0]} predicted mask stacks for {len(thresholds)} thresholds"
        )
    n_slices = gt.shape[0]
    if isinstance(predicted, torch.Tensor):
        gt_t = torch.as_tensor(gt, device=predicted.device).bool()
        overlap = predicted.bool() & gt_t.unsqueeze(0)
    else:
        gt_t = np.asarray(gt, dtype=bool)
        overlap = np.asarray(predicted, dtype=bool) & gt_t[None]
    patients = np.broadcast_to(np.asarray(patient, dtype=np.int64), (n_slices,))
    slices = np.arange(n_slices) if slice_index is None else np.asarray(slice_index)
    return SliceCounts(
        patient=patients,
        slice_index=slices,
        thresholds=thresholds,
        gt_pixels=_pixel_sums(gt_t),
        pred_pixels=_pixel_sums(predicted).T,
        intersection=_pixel_sums(overlap).T,
        voxel_ml=voxel_ml,
        area_scale=area_scale,
    )


def score_probabilities(
    probabilities: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    patient: int | Sequence[int] | np.ndarray,
    slice_index: Sequence[int] | np.ndarray | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    config: PostprocessConfig = PAPER,
    scale: float | Sequence[float] = 1.0,
    voxel_ml: float | np.ndarray = math.nan,
    area_scale: float | np.ndarray | None = None,
) -> SliceCounts:
    """Post-process probability maps ``(N, H, W)`` at every threshold and count against ``gt``.

    ``config`` gives the morphology (its own threshold is replaced by each of ``thresholds``);
    ``scale`` is the grid's pixel scale (:func:`ichseg.eval.postprocess.pixel_scale`);
    ``area_scale`` defaults to its product (the grid's pixels per working pixel).
    """
    if area_scale is None:
        scale_h, scale_w = (scale, scale) if np.isscalar(scale) else tuple(scale)  # type: ignore[arg-type]
        area_scale = float(scale_h) * float(scale_w)
    predicted = postprocess_thresholds(probabilities, thresholds, config, scale)
    return count_slices(gt, predicted, patient, slice_index, thresholds, voxel_ml, area_scale)


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


# --------------------------------------------------------------------------- beyond the paper


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

    ``parts`` holds ``(counts, threshold)`` per evaluation (disjoint patients, the same threshold
    columns), e.g. folds whose operating point was chosen on their own validation split. Table 5,
    the per-patient, subtype, age and volume tables use each part's counts at its threshold
    (their ``threshold`` is NaN when the parts differ); the pooled detection of Table 5 sums the
    parts' confusion counts at their thresholds; Table 6 is computed over all parts at every
    threshold of the counts.
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
    merged = SliceCounts.concatenate([counts for counts, _ in parts])
    detection = detection_table(merged, None, min_area)
    return assemble_tables(segmentation, detection, per_patient, patient_subtypes, ages)
