"""Per-slice pixel counts (:class:`SliceCounts`): everything the metrics are computed from.

One row per slice (patient, slice, ground-truth pixels, and per threshold the predicted pixels and
the intersection, plus the voxel volume and the area scale of the scored grid). Counts are plain
integers, so results merge across folds and processes by concatenation. See docs/evaluation.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ichseg.errors import ConfigError
from ichseg.eval.postprocess import PAPER, PostprocessConfig, postprocess_thresholds
from ichseg.utils.atomic import atomic_path

#: Table 6's probability thresholds.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


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

    def at_thresholds(self, thresholds: Sequence[float]) -> SliceCounts:
        """The same slices with only the columns of ``thresholds`` (each must be scored)."""
        columns = [self.column(t) for t in thresholds]
        return SliceCounts(
            self.patient,
            self.slice_index,
            self.thresholds[columns],
            self.gt_pixels,
            self.pred_pixels[:, columns],
            self.intersection[:, columns],
            self.voxel_ml,
            self.area_scale,
        )

    @staticmethod
    def shared_thresholds(parts: Iterable[SliceCounts]) -> list[float]:
        """The thresholds every part was scored at (e.g. folds whose own calibrated operating
        point adds a column of its own), in order."""
        parts = list(parts)
        shared = [float(t) for t in parts[0].thresholds] if parts else []
        for part in parts[1:]:
            shared = [t for t in shared if np.isclose(part.thresholds, t, rtol=0, atol=1e-9).any()]
        return shared

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
