"""The best and worst ICH slices of an evaluation, by slice Dice, kept in bounded memory for the
TensorBoard overlays (:class:`OverlayGallery`). See docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ichseg.eval.counts import SliceCounts
from ichseg.eval.metrics import slice_dice
from ichseg.inference.predictor import Predictor
from ichseg.inference.stitch import to_original_grid


@dataclass
class _Overlay:
    """One slice kept for the best / worst overlays (original grid)."""

    dice: float
    gt_pixels: int
    patient: int
    slice_number: int
    image: np.ndarray  # (H, W) uint8
    truth: np.ndarray  # (H, W) bool
    prediction: np.ndarray  # (H, W) bool


class OverlayGallery:
    """The ``n`` best and ``n`` worst ICH slices seen so far, by slice Dice (bounded memory)."""

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self.best: list[_Overlay] = []
        self.worst: list[_Overlay] = []

    @staticmethod
    def _best_key(item: _Overlay) -> tuple[float, int]:
        return (-item.dice, -item.gt_pixels)

    @staticmethod
    def _worst_key(item: _Overlay) -> tuple[float, int]:
        return (item.dice, -item.gt_pixels)

    def candidates(self, dice: np.ndarray, gt_pixels: np.ndarray) -> np.ndarray:
        """Rows of one patient's slices that could enter the gallery (ICH slices only)."""
        positive = np.flatnonzero(~np.isnan(dice))
        if positive.size == 0 or self.n == 0:
            return positive[:0]
        order = np.lexsort((-gt_pixels[positive], dice[positive]))  # worst first
        chosen = np.concatenate([order[: self.n], order[::-1][: self.n]])
        return positive[np.unique(chosen)]

    def add(self, items: Iterable[_Overlay]) -> None:
        """Offer slices; each (patient, slice) is kept once."""
        unique = {(i.patient, i.slice_number): i for i in [*items, *self.best, *self.worst]}
        pool = list(unique.values())
        self.best = sorted(pool, key=self._best_key)[: self.n]
        self.worst = sorted(pool, key=self._worst_key)[: self.n]

    def merge(self, others: Iterable[OverlayGallery]) -> None:
        """Add the slices of other ranks' galleries."""
        for other in others:
            if other is not self:
                self.add(other.best + other.worst)


def offer_scan(
    gallery: OverlayGallery,
    predictor: Predictor,
    scan: Any,
    native: np.ndarray,
    counts: SliceCounts,
) -> None:
    """Offer one scan's best / worst ICH slices (by slice Dice at the predictor's threshold) to
    ``gallery``, from its original-grid probabilities ``native`` and their ``counts``."""
    if gallery.n <= 0:
        return
    dice = slice_dice(counts, predictor.inference_spec.threshold)
    rows = gallery.candidates(dice, counts.gt_pixels)
    if not rows.size:
        return
    truth = np.moveaxis(np.asarray(scan.mask, dtype=bool), -1, 0)
    predicted = predictor.mask(native[rows])
    shown = to_original_grid(scan.images[rows, :1].astype(np.float32), scan.original_shape,
                             scan.working_mode)[:, 0]  # fmt: skip
    gallery.add(
        _Overlay(float(dice[r]), int(counts.gt_pixels[r]), int(scan.patient_id), int(r + 1),
                 np.clip(np.rint(img), 0, 255).astype(np.uint8), truth[r], pred)
        for r, img, pred in zip(rows, shown, predicted, strict=True)
    )  # fmt: skip
