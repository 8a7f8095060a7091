"""The paper's threshold baseline: a brain-window intensity band fitted by an exact grid search.

A pixel is called ICH when its 0-255 brain-window value ``v`` lies in the band
``lower <= v <= upper`` (**both ends inclusive**). The pair is chosen by grid search, lower in
100..210 and upper in 210..255 with step 1 (111 x 46 = 5,106 pairs, :data:`LOWER_RANGE`,
:data:`UPPER_RANGE`), for the highest Jaccard on the training slices. Hssayeni et al. 2020 found
140 / 230 (test Jaccard 0.08, Dice 0.135).

Objectives (``objective=``):

* ``"slice_mean"`` (default, the paper's reading): the mean over the training slices WITH ICH of the
  per-slice Jaccard ``|P & G| / |P | G|``. Slices without ICH do not enter it (the paper's
  segmentation metrics skip them too), so its histograms need only the ICH slices.
* ``"pooled"``: one Jaccard over all training pixels, ``sum |P & G| / sum |P | G|`` over every
  training slice (false positives on ICH-free slices count).

The search is exact and never loops over pixels per pair. Per slice, two 256-bin histograms of the
intensities inside and outside the mask are built once (:class:`IntensityHistograms`); with their
cumulative sums ``C`` (``C[v]`` = pixels below ``v``), every pair's counts are differences:
``intersection(l, u) = C_in[u + 1] - C_in[l]``, ``predicted(l, u)`` likewise over both histograms,
``union = |G| + predicted - intersection``. All pairs are one array operation per chunk of slices
(``(chunk, n_lower, n_upper)``, chunked to bound memory).

Ties: the best pair is the FIRST maximum in ``(lower, upper)`` lexicographic order (the smallest
lower, then the smallest upper). Ties are real ties: the float surface only proposes the candidates
within its rounding-error bound of the maximum, and those are compared with exact rational
arithmetic (:class:`fractions.Fraction`), so float summation order can neither make nor break a
tie. The reported objective value is the exact value rounded once to float. The result equals
:func:`naive_threshold_search` (pixel comparisons per pair, exact fractions) exactly.

As a model: :class:`IntensityBand` is the "network" (an ``nn.Module`` holding ``lower`` / ``upper``
as buffers, returning logits +-1e4 so that ``sigmoid`` gives exactly 1 inside the band and 0
outside;
channel 0 of the (B, C, H, W) [0, 1] input is the brain window, brought back to 0-255 as
``round(value * 255)``, the store's rounding). :class:`ThresholdModule` is a LightningModule that
fits it without gradients, so ``python -m ichseg.train experiment=threshold`` runs through the same
entry point, Trainer, checkpoints, evaluation and TensorBoard as the networks.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex

from ichseg.errors import ConfigError, DatasetError
from ichseg.module import _plain, keep_overlay_batch, log_overlay_grid
from ichseg.utils.atomic import atomic_path, atomic_write_text

__all__ = [
    "LOWER_RANGE",
    "OBJECTIVES",
    "UPPER_RANGE",
    "IntensityBand",
    "IntensityHistograms",
    "ThresholdModule",
    "ThresholdSearch",
    "fit_thresholds",
    "level_counts",
    "naive_threshold_search",
    "objective_surface",
    "search_thresholds",
    "store_histograms",
    "surface_image",
    "write_search",
]

#: The paper's grid, inclusive: lower 100..210, upper 210..255 (step 1).
LOWER_RANGE: tuple[int, int] = (100, 210)
UPPER_RANGE: tuple[int, int] = (210, 255)
Objective = Literal["slice_mean", "pooled"]
OBJECTIVES: tuple[str, ...] = ("slice_mean", "pooled")
#: Intensity levels of a uint8 brain-window image.
LEVELS = 256
#: Logit magnitude of :class:`IntensityBand`: ``sigmoid(+-1e4)`` is exactly 1 / 0 in float32.
BAND_LOGIT = 1.0e4
_EPS = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------- histograms


def _check_range(name: str, bounds: Sequence[int]) -> np.ndarray:
    """Thresholds ``first..last`` (inclusive, step 1) of a grid axis, validated."""
    if len(bounds) != 2:
        raise ConfigError(f"{name} must be a pair (first, last), got {list(bounds)}")
    first, last = (int(b) for b in bounds)
    if not 0 <= first <= last <= LEVELS - 1:
        raise ConfigError(f"{name} must satisfy 0 <= first <= last <= 255, got ({first}, {last})")
    return np.arange(first, last + 1, dtype=np.int64)


def _check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ConfigError(
            f"threshold objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}"
        )
    return objective


def level_counts(image: np.ndarray) -> np.ndarray:
    """(256,) int64 histogram of a 2-D uint8 image: ``np.bincount(image.ravel(), minlength=256)``.

    About 3x faster on CT slices, whose pixels are mostly air (0): a long run of increments of
    one bin serialises ``np.bincount``. So the rows above and below the head (all 0) are counted
    without reading them, and the rest is counted two pixels at a time, as uint16 values in
    65,536 bins folded back to 256 (a pair ``(a, b)`` adds one to ``a`` and one to ``b``).
    """
    image = np.ascontiguousarray(image)
    busy_rows = np.flatnonzero(image.any(axis=1))
    counts = np.zeros(LEVELS, dtype=np.int64)
    if busy_rows.size:
        pixels = image[busy_rows[0] : busy_rows[-1] + 1].reshape(-1)
        if pixels.size % 2:
            counts[pixels[-1]] += 1
            pixels = pixels[:-1]
        pairs = np.bincount(pixels.view(np.uint16), minlength=LEVELS * LEVELS).reshape(
            LEVELS, LEVELS
        )
        counts += pairs.sum(axis=0) + pairs.sum(axis=1)
        counts[0] += image.size - (busy_rows[-1] + 1 - busy_rows[0]) * image.shape[1]
    else:
        counts[0] = image.size
    return counts


@dataclass
class IntensityHistograms:
    """Per-slice 256-bin histograms of brain-window values inside and outside the ICH mask.

    ``inside`` and ``outside``: (n_slices, 256) int64. Build with :meth:`from_slices`, join with
    :meth:`concatenate`.
    """

    inside: np.ndarray
    outside: np.ndarray

    def __post_init__(self) -> None:
        self.inside = np.asarray(self.inside, dtype=np.int64).reshape(-1, LEVELS)
        self.outside = np.asarray(self.outside, dtype=np.int64).reshape(-1, LEVELS)
        if self.inside.shape != self.outside.shape:
            raise ConfigError(
                "inside and outside histograms differ in shape: "
                f"{self.inside.shape} vs {self.outside.shape}"
            )

    @property
    def n_slices(self) -> int:
        return int(self.inside.shape[0])

    @property
    def truth_pixels(self) -> np.ndarray:
        """(n_slices,) ICH pixels per slice."""
        return self.inside.sum(axis=1)

    @classmethod
    def empty(cls) -> IntensityHistograms:
        return cls(np.zeros((0, LEVELS), np.int64), np.zeros((0, LEVELS), np.int64))

    @classmethod
    def from_slices(cls, images: np.ndarray, masks: np.ndarray) -> IntensityHistograms:
        """Histograms of (n, H, W) uint8 brain-window images and their (n, H, W) bool masks."""
        images, masks = np.asarray(images), np.asarray(masks, dtype=bool)
        if images.ndim == 2:
            images, masks = images[None], masks[None]
        if images.ndim != 3 or masks.shape != images.shape:
            raise ConfigError(
                "images and masks must both be (n, H, W) and equal in shape, got "
                f"{images.shape} and {masks.shape}"
            )
        has_ich = masks.reshape(masks.shape[0], -1).any(axis=1)
        return cls.from_ich_masks(images, masks[has_ich], has_ich)

    @classmethod
    def from_ich_masks(
        cls, images: np.ndarray, ich_masks: np.ndarray | None, has_ich: np.ndarray
    ) -> IntensityHistograms:
        """Histograms of (n, H, W) uint8 images given only the masks of their ICH slices.

        ``has_ich`` (n,) bool flags the slices with ICH; ``ich_masks`` (k, H, W) bool are their
        masks, in order (None when k = 0): the other masks are empty and never unpacked or read.

        Per slice, :func:`level_counts` of all its pixels and one ``np.bincount`` of its ICH
        pixels; ``outside = all - inside``. (A loop over slices, not pixels: faster than one
        bincount of ``slice * 256 + value``, which needs an int64 key per pixel.)
        """
        images, has_ich = np.asarray(images), np.asarray(has_ich, dtype=bool)
        if images.dtype != np.uint8:
            raise ConfigError(
                f"threshold histograms need uint8 brain-window images, not {images.dtype}"
            )
        n_ich = int(has_ich.sum())
        expected = (n_ich, *images.shape[1:])
        if (
            images.ndim != 3
            or has_ich.shape != images.shape[:1]
            or (n_ich and (ich_masks is None or np.shape(ich_masks) != expected))
        ):
            raise ConfigError(
                f"{n_ich} ICH masks of shape {images.shape[1:]} expected for images {images.shape}"
            )
        inside = np.zeros((images.shape[0], LEVELS), dtype=np.int64)
        total = np.empty((images.shape[0], LEVELS), dtype=np.int64)
        for i, image in enumerate(images):
            total[i] = level_counts(image)
        for i, mask in zip(np.flatnonzero(has_ich), ich_masks if n_ich else (), strict=True):
            inside[i] = np.bincount(images[i][np.asarray(mask, dtype=bool)], minlength=LEVELS)
        return cls(inside, total - inside)

    @staticmethod
    def concatenate(parts: Sequence[IntensityHistograms]) -> IntensityHistograms:
        """Join the slices of several histogram sets."""
        if not parts:
            return IntensityHistograms.empty()
        return IntensityHistograms(
            np.concatenate([p.inside for p in parts]), np.concatenate([p.outside for p in parts])
        )

    def select(self, slices: np.ndarray) -> IntensityHistograms:
        """A subset of slices (index or bool array)."""
        return IntensityHistograms(self.inside[slices], self.outside[slices])


def store_histograms(
    store: Any,
    rows: np.ndarray,
    channel: int = 0,
    ich_only: bool = False,
    chunk: int = 32,
) -> IntensityHistograms:
    """Histograms of store rows (a :class:`~ichseg.data.datamodule.SliceStore`), in row order.

    ``channel`` is the brain-window channel of ``store.images``. ``ich_only`` keeps only the rows
    with ICH (all that the ``"slice_mean"`` objective needs). Masks are unpacked a chunk at a time.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if ich_only:
        rows = rows[np.asarray(store.positive_pixels)[rows] > 0]
    positive = np.asarray(store.positive_pixels)
    parts = []
    for start in range(0, rows.size, chunk):
        block = rows[start : start + chunk]
        has_ich = positive[block] > 0
        images = np.asarray(store.images[block, channel])
        masks = store.mask_slices(block[has_ich]) if has_ich.any() else None  # ICH rows only
        parts.append(IntensityHistograms.from_ich_masks(images, masks, has_ich))
    return IntensityHistograms.concatenate(parts)


# --------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class ThresholdSearch:
    """Result of a grid search.

    ``lower`` / ``upper``: the chosen band (inclusive); ``value``: its objective (the exact value
    rounded to float); ``surface``: (n_lower, n_upper) float64 objective of every pair, rows
    ``lowers``, columns ``uppers``; ``n_slices``: slices searched; ``n_ich_slices``: those with ICH.
    """

    lower: int
    upper: int
    value: float
    objective: str
    lowers: np.ndarray
    uppers: np.ndarray
    surface: np.ndarray
    n_slices: int
    n_ich_slices: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, surface: bool = True) -> dict[str, Any]:
        """JSON-ready summary (with the surface as nested lists when ``surface``)."""
        out: dict[str, Any] = {
            "lower": self.lower,
            "upper": self.upper,
            "band": "lower <= value <= upper (0-255 brain window, both inclusive)",
            "objective": self.objective,
            "objective_value": self.value,
            "lower_range": [int(self.lowers[0]), int(self.lowers[-1])],
            "upper_range": [int(self.uppers[0]), int(self.uppers[-1])],
            "n_slices": self.n_slices,
            "n_ich_slices": self.n_ich_slices,
            "tie_rule": "first maximum in (lower, upper) lexicographic order, exact arithmetic",
            **self.extra,
        }
        if surface:
            out["surface"] = {
                "rows": "lower",
                "columns": "upper",
                "values": [[float(v) for v in row] for row in self.surface],
            }
        return out


def _cumulative(histograms: np.ndarray) -> np.ndarray:
    """(n, 256) -> (n, 257) with ``C[:, v]`` = pixels of value below ``v``."""
    cumulative = np.zeros((histograms.shape[0], LEVELS + 1), dtype=np.int64)
    np.cumsum(histograms, axis=1, out=cumulative[:, 1:])
    return cumulative


def _band_counts(cumulative: np.ndarray, lowers: np.ndarray, uppers: np.ndarray) -> np.ndarray:
    """(n, n_lower, n_upper) pixels with ``lower <= v <= upper`` (0 where lower > upper)."""
    counts = cumulative[:, None, uppers + 1] - cumulative[:, lowers, None]
    return np.maximum(counts, 0)


def _ich_slices(histograms: IntensityHistograms) -> IntensityHistograms:
    return histograms.select(histograms.truth_pixels > 0)


def _pooled_counts(
    histograms: IntensityHistograms, lowers: np.ndarray, uppers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (intersection, union) of every pair: two (n_lower, n_upper) int64 arrays."""
    inside = histograms.inside.sum(axis=0, keepdims=True)
    both = inside + histograms.outside.sum(axis=0, keepdims=True)
    intersection = _band_counts(_cumulative(inside), lowers, uppers)[0]
    predicted = _band_counts(_cumulative(both), lowers, uppers)[0]
    return intersection, int(inside.sum()) + predicted - intersection


def objective_surface(
    histograms: IntensityHistograms,
    lower_range: Sequence[int] = LOWER_RANGE,
    upper_range: Sequence[int] = UPPER_RANGE,
    objective: Objective = "slice_mean",
    chunk_slices: int = 128,
) -> np.ndarray:
    """The (n_lower, n_upper) float64 objective of every pair (see the module docstring).

    ``"slice_mean"`` sums the per-slice Jaccards of the ICH slices chunk by chunk (memory
    ``chunk_slices * n_lower * n_upper * 8`` bytes per array), then divides by their number.
    """
    lowers, uppers = (
        _check_range("lower_range", lower_range),
        _check_range("upper_range", upper_range),
    )
    _check_objective(objective)
    if not (histograms.truth_pixels > 0).any():
        raise DatasetError("the threshold search needs training slices with ICH; there are none")
    if objective == "pooled":
        intersection, union = _pooled_counts(histograms, lowers, uppers)
        return intersection / union  # union >= |G| > 0
    ich = _ich_slices(histograms)
    total = np.zeros((lowers.size, uppers.size), dtype=np.float64)
    for start in range(0, ich.n_slices, max(1, int(chunk_slices))):
        part = ich.select(slice(start, start + chunk_slices))
        cum_inside = _cumulative(part.inside)
        intersection = _band_counts(cum_inside, lowers, uppers)
        predicted = _band_counts(_cumulative(part.inside + part.outside), lowers, uppers)
        union = cum_inside[:, -1, None, None] + predicted - intersection
        total += (intersection / union).sum(axis=0)  # union >= |G| > 0 on ICH slices
    return total / ich.n_slices


def _exact_values(intersection: np.ndarray, union: np.ndarray, objective: str) -> Fraction:
    """The exact objective from per-slice (n,) intersection and union counts."""
    if objective == "pooled":
        return Fraction(int(intersection.sum()), int(union.sum()))
    return sum(
        (Fraction(int(i), int(u)) for i, u in zip(intersection, union, strict=True)), Fraction(0)
    ) / len(intersection)


def _pair_counts(
    histograms: IntensityHistograms, lower: int, upper: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (intersection, union) of one band, from the histograms."""
    band = slice(lower, upper + 1)
    intersection = histograms.inside[:, band].sum(axis=1)
    predicted = intersection + histograms.outside[:, band].sum(axis=1)
    return intersection, histograms.truth_pixels + predicted - intersection


def search_thresholds(
    histograms: IntensityHistograms,
    lower_range: Sequence[int] = LOWER_RANGE,
    upper_range: Sequence[int] = UPPER_RANGE,
    objective: Objective = "slice_mean",
    chunk_slices: int = 128,
) -> ThresholdSearch:
    """The exact grid search over histograms: the best band, its objective and the surface.

    Candidates for the maximum are the pairs whose float objective is within the rounding-error
    bound of the float maximum; among them the exact (rational) maximum wins, the first in
    (lower, upper) lexicographic order on ties.
    """
    lowers, uppers = (
        _check_range("lower_range", lower_range),
        _check_range("upper_range", upper_range),
    )
    surface = objective_surface(histograms, lower_range, upper_range, objective, chunk_slices)
    if objective == "pooled":  # one pooled "slice": its Jaccard is the pooled one
        used = IntensityHistograms(
            histograms.inside.sum(axis=0, keepdims=True),
            histograms.outside.sum(axis=0, keepdims=True),
        )
        tolerance = 0.0  # one correctly rounded division: the float order is the exact order
    else:
        used = _ich_slices(histograms)
        # the float mean is within (n + 1) eps of the exact one (Jaccards <= 1, n - 1 additions);
        # twice that separates the float maximum from any true maximum; 4x margin
        tolerance = 8.0 * (used.n_slices + 2) * _EPS
    best_float = float(surface.max())
    candidates = np.flatnonzero(surface.reshape(-1) >= best_float - tolerance)  # lexicographic
    best_index, best_value = int(candidates[0]), None
    if best_float > 0.0:  # a float 0 is an exact 0 everywhere (Jaccards are >= 0)
        for index in candidates:
            li, ui = divmod(int(index), uppers.size)
            value = _exact_values(*_pair_counts(used, int(lowers[li]), int(uppers[ui])), objective)
            if best_value is None or value > best_value:
                best_index, best_value = int(index), value
    li, ui = divmod(best_index, uppers.size)
    return ThresholdSearch(
        lower=int(lowers[li]),
        upper=int(uppers[ui]),
        value=0.0 if best_value is None else float(best_value),
        objective=objective,
        lowers=lowers,
        uppers=uppers,
        surface=surface,
        n_slices=histograms.n_slices,
        n_ich_slices=int((histograms.truth_pixels > 0).sum()),
    )


def fit_thresholds(
    images: np.ndarray,
    masks: np.ndarray,
    lower_range: Sequence[int] = LOWER_RANGE,
    upper_range: Sequence[int] = UPPER_RANGE,
    objective: Objective = "slice_mean",
) -> ThresholdSearch:
    """Histograms of (n, H, W) uint8 brain-window slices and bool masks, then the search."""
    return search_thresholds(
        IntensityHistograms.from_slices(images, masks), lower_range, upper_range, objective
    )


def naive_threshold_search(
    images: np.ndarray,
    masks: np.ndarray,
    lower_range: Sequence[int] = LOWER_RANGE,
    upper_range: Sequence[int] = UPPER_RANGE,
    objective: Objective = "slice_mean",
) -> ThresholdSearch:
    """Reference implementation: for every pair, threshold every pixel and count; exact fractions.

    Slow (pixels x pairs); for tests and the benchmark. Same result as :func:`fit_thresholds`.
    """
    lowers, uppers = (
        _check_range("lower_range", lower_range),
        _check_range("upper_range", upper_range),
    )
    _check_objective(objective)
    images = np.asarray(images)
    masks = np.asarray(masks, dtype=bool)
    truth = masks.reshape(masks.shape[0], -1).sum(axis=1)
    if objective == "slice_mean":
        images, masks = images[truth > 0], masks[truth > 0]
    if not masks.any():
        raise DatasetError("the threshold search needs training slices with ICH; there are none")
    surface = np.zeros((lowers.size, uppers.size), dtype=np.float64)
    best: tuple[Fraction, int, int] | None = None
    for li, lower in enumerate(lowers):
        for ui, upper in enumerate(uppers):
            predicted = (images >= lower) & (images <= upper)
            intersection = (predicted & masks).sum(axis=(1, 2))
            union = (predicted | masks).sum(axis=(1, 2))
            value = _exact_values(intersection, union, objective)
            surface[li, ui] = float(value)
            if best is None or value > best[0]:
                best = (value, int(lower), int(upper))
    assert best is not None
    return ThresholdSearch(
        lower=best[1],
        upper=best[2],
        value=float(best[0]),
        objective=objective,
        lowers=lowers,
        uppers=uppers,
        surface=surface,
        n_slices=int(truth.size),
        n_ich_slices=int((truth > 0).sum()),
    )


# --------------------------------------------------------------------------- outputs

#: Anchor colours of the heat map (viridis at 0, 1/4, 1/2, 3/4, 1), linearly interpolated.
_HEAT_COLOURS = (
    np.array(
        [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
        dtype=np.float64,
    )
    / 255.0
)


def surface_image(search: ThresholdSearch, scale: int = 4) -> np.ndarray:
    """The objective surface as an RGB heat map (3, n_lower * scale, n_upper * scale) in [0, 1].

    Rows are lower thresholds (first at the top), columns upper thresholds; colours run from the
    surface's minimum (dark blue) to its maximum (yellow); the chosen pair is marked in red.
    """
    surface = np.nan_to_num(search.surface.astype(np.float64))
    low, high = float(surface.min()), float(surface.max())
    unit = (surface - low) / (high - low) if high > low else np.zeros_like(surface)
    position = unit * (len(_HEAT_COLOURS) - 1)
    index = np.minimum(position.astype(np.int64), len(_HEAT_COLOURS) - 2)
    weight = (position - index)[..., None]
    rgb = (1 - weight) * _HEAT_COLOURS[index] + weight * _HEAT_COLOURS[index + 1]
    li = int(np.searchsorted(search.lowers, search.lower))
    ui = int(np.searchsorted(search.uppers, search.upper))
    rgb[li, ui] = (1.0, 0.0, 0.0)
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def write_search(
    search: ThresholdSearch, directory: str | Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``threshold_search.json`` (thresholds, objective, surface), ``threshold_surface.npy``
    and ``threshold_surface.png`` into ``directory``, each atomically. Returns the JSON path."""
    from PIL import Image

    directory = Path(directory)
    summary = search.to_dict() | dict(extra or {})
    target = directory / "threshold_search.json"
    atomic_write_text(target, json.dumps(summary, indent=1) + "\n")
    with atomic_path(directory / "threshold_surface.npy") as tmp:
        np.save(tmp, search.surface)
    picture = np.rint(surface_image(search).transpose(1, 2, 0) * 255).astype(np.uint8)
    with atomic_path(directory / "threshold_surface.png") as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return target


# --------------------------------------------------------------------------- as a model


class IntensityBand(nn.Module):
    """The threshold "network": logits +1e4 where ``lower <= round(255 x) <= upper``, else -1e4.

    Input (B, C, H, W) float in [0, 1]; channel ``channel`` (default 0) is the brain window. Output
    (B, 1, H, W) float32 logits: ``sigmoid`` gives exactly 1 inside the band and 0 outside.
    ``lower`` and ``upper`` are buffers (in the state dict, -1 until set). ``in_channels``
    (optional) only checks that ``channel`` exists.
    """

    def __init__(
        self,
        lower: int | None = None,
        upper: int | None = None,
        channel: int = 0,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        if in_channels is not None and not 0 <= channel < int(in_channels):
            raise ConfigError(
                f"brain-window channel {channel} does not exist in {in_channels} input channel(s)"
            )
        self.channel = int(channel)
        self.register_buffer("lower", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("upper", torch.tensor(-1, dtype=torch.int64))
        if lower is not None or upper is not None:
            if lower is None or upper is None:
                raise ConfigError("give both lower and upper thresholds, or neither")
            self.set_band(lower, upper)

    @property
    def fitted(self) -> bool:
        """Whether a band has been set."""
        return bool(self.lower.item() >= 0 and self.upper.item() >= 0)

    def set_band(self, lower: int, upper: int) -> None:
        """Set the (inclusive) band on the 0-255 scale."""
        if not 0 <= int(lower) <= 255 or not 0 <= int(upper) <= 255:
            raise ConfigError(f"thresholds must lie in 0..255, got {lower} and {upper}")
        self.lower.fill_(int(lower))
        self.upper.fill_(int(upper))

    def to_levels(self, images: torch.Tensor) -> torch.Tensor:
        """Channel ``channel`` on the 0-255 scale, (B, 1, H, W): ``round(value * 255)``."""
        return torch.round(images[:, self.channel : self.channel + 1].float() * 255.0)

    def predict_mask(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool: inside the band."""
        if not self.fitted:
            raise ConfigError(
                "the intensity band has no thresholds yet: fit it (ThresholdModule) or give "
                "lower and upper"
            )
        levels = self.to_levels(images)
        return (levels >= self.lower) & (levels <= self.upper)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inside = self.predict_mask(images)
        return torch.where(inside, BAND_LOGIT, -BAND_LOGIT).to(torch.float32)

    def extra_repr(self) -> str:
        return f"lower={int(self.lower)}, upper={int(self.upper)}, channel={self.channel}"


Source = Literal["auto", "store", "batches"]


class ThresholdModule(pl.LightningModule):
    """The threshold baseline as a LightningModule: one gradient-free "training" epoch.

    Fitting (once per training epoch, before that epoch's validation, or at its end when there is
    none) uses exactly the training patients' slices:

    * ``source="store"``: every row of ``trainer.datamodule.rows("train")`` in the DataModule's
      slice store (:class:`~ichseg.data.CTICHDataModule`): whole working-size slices as stored,
      never augmented, each once, whatever the loader does. The training pass only iterates.
    * ``source="batches"``: histograms accumulated in ``training_step`` from the training batches,
      de-duplicated by ``(patient, slice)`` when the batches carry them. Needs whole, unaugmented
      slices each once (``data.mode=full_slice``, ``data.train_slices=all``, no augmentation) and
      one process; checked against the DataModule when it has a store.
    * ``"auto"``: the store when the DataModule has one, else the batches.

    Then :func:`search_thresholds` picks the band; it is kept in ``net.lower`` / ``net.upper``
    (state-dict buffers, so checkpoints carry it), logged as ``threshold/lower``,
    ``threshold/upper``, ``threshold/train_objective``, the surface sent to TensorBoard as an image,
    and ``threshold_search.json`` / ``threshold_surface.{npy,png}`` written to ``output_dir``
    (default: the trainer's ``default_root_dir``, the run directory).

    Validation and test steps log ``val/jaccard``, ``val/dice`` (``test/...``) pooled over the
    batches' pixels with torchmetrics on integer tensors, as
    :class:`~ichseg.module.ICHSegmentationModule` does (no loss). ``configure_optimizers``
    returns None and ``automatic_optimization`` is off; each training batch is one empty step of
    Lightning's stand-in optimiser, so that ``global_step`` advances and checkpoints are saved.

    Args:
        net: the :class:`IntensityBand` (default: a new one on channel 0).
        lower_range, upper_range: the grid, inclusive (the paper: 100..210 and 210..255).
        objective: ``"slice_mean"`` or ``"pooled"`` (module docstring).
        source: where the training slices come from (above).
        chunk_slices: slices per chunk of the search (memory bound).
        threshold: probability threshold of the validation metrics (the band's probabilities are
            0 / 1, so any value in [0, 1) gives the same masks).
        image_log_every_n_epochs, image_log_samples: overlay grid of a fixed validation batch.
        output_dir: where to write the search files (None: the trainer's ``default_root_dir``;
            False: nowhere).
        meta: plain-data description of the run stored in checkpoints under ``"ichseg"``.
    """

    def __init__(
        self,
        net: IntensityBand | None = None,
        lower_range: Sequence[int] = LOWER_RANGE,
        upper_range: Sequence[int] = UPPER_RANGE,
        objective: Objective = "slice_mean",
        source: Source = "auto",
        chunk_slices: int = 128,
        threshold: float = 0.5,
        image_log_every_n_epochs: int = 1,
        image_log_samples: int = 8,
        output_dir: str | Path | bool | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # plain values first: checkpoints must load with weights_only=True (no ListConfig / Path)
        lower_range = [int(v) for v in lower_range]
        upper_range = [int(v) for v in upper_range]
        _check_range("lower_range", lower_range)
        _check_range("upper_range", upper_range)
        if isinstance(output_dir, Path):
            output_dir = str(output_dir)
        self.save_hyperparameters(ignore=["net", "meta"], logger=False)
        self.automatic_optimization = False
        self.net = net if net is not None else IntensityBand()
        self.lower_range = tuple(lower_range)
        self.upper_range = tuple(upper_range)
        self.objective = _check_objective(objective)
        if source not in ("auto", "store", "batches"):
            raise ConfigError(
                f"threshold source must be 'auto', 'store' or 'batches', not {source!r}"
            )
        self.source = source
        self.chunk_slices = int(chunk_slices)
        self.threshold = float(threshold)
        self.image_log_every_n_epochs = image_log_every_n_epochs
        self.image_log_samples = image_log_samples
        self.output_dir = output_dir
        self.meta = dict(meta or {})
        self.register_buffer("train_objective", torch.tensor(float("nan"), dtype=torch.float64))
        self.val_metrics = MetricCollection(
            {"jaccard": BinaryJaccardIndex(), "dice": BinaryF1Score()}, prefix="val/"
        )
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self.search: ThresholdSearch | None = None
        self._batch_histograms: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        self._fitted_epoch: int | None = None
        self._fixed_val_batch: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ prediction

    @property
    def fitted(self) -> bool:
        return self.net.fitted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, H, W): +1e4 inside the band, -1e4 outside."""
        return self.net(images)

    @torch.no_grad()
    def predict_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) float32: exactly 1 inside the band, 0 outside."""
        return self.net.predict_mask(images).to(torch.float32)

    # ------------------------------------------------------------------ fitting

    def configure_optimizers(self) -> None:
        return None

    def _resolved_source(self) -> str:
        if self.source != "auto":
            return self.source
        datamodule = getattr(self.trainer, "datamodule", None)
        return "store" if getattr(datamodule, "store", None) is not None else "batches"

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        channels = getattr(datamodule, "channels", None)
        if channels is not None:
            channels = tuple(channels)
            name = channels[self.net.channel] if self.net.channel < len(channels) else None
            if name != "brain":
                raise ConfigError(
                    f"the threshold baseline reads the brain window from input channel "
                    f"{self.net.channel}, but data.channels={list(channels)}"
                )
        if self._resolved_source() == "batches" and self.trainer.world_size > 1:
            raise ConfigError(
                "the threshold baseline fits from training batches on one process only; use "
                "model.source=store with several processes"
            )

    def on_train_epoch_start(self) -> None:
        self._batch_histograms = {}

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate histograms (source ``batches``); nothing to do for ``store``.

        Each batch also counts as one (empty) optimiser step: ``ModelCheckpoint`` saves nothing
        while the global step is 0.
        """
        self._count_step()
        if self._resolved_source() != "batches":
            return None
        if "window" in batch and bool((batch["window"] >= 0).any()):
            raise ConfigError(
                "the threshold baseline fitted from batches needs whole slices "
                "(data.mode=full_slice), not windows; or use model.source=store"
            )
        images = self.net.to_levels(batch["image"])[:, 0].to(torch.uint8).cpu().numpy()
        masks = (batch["mask"][:, 0] > 0.5).cpu().numpy()
        histograms = IntensityHistograms.from_slices(images, masks)
        has_keys = "patient" in batch and "slice" in batch
        for i in range(histograms.n_slices):
            key = (
                (int(batch["patient"][i]), int(batch["slice"][i]))
                if has_keys
                else (batch_idx, i, len(self._batch_histograms))
            )
            self._batch_histograms[key] = (histograms.inside[i], histograms.outside[i])
        return None

    def _count_step(self) -> None:
        """Step the (mock) optimiser so that ``trainer.global_step`` advances (not under fp16's
        gradient scaler, which refuses an optimiser without gradients)."""
        if str(self.trainer.precision).startswith("16"):
            return
        optimizer = self.optimizers()
        if not isinstance(optimizer, list):
            optimizer.step()

    def _training_histograms(self) -> IntensityHistograms:
        """The training slices' histograms from the configured source."""
        datamodule = getattr(self.trainer, "datamodule", None)
        ich_only = self.objective == "slice_mean"
        if self._resolved_source() == "store":
            store = getattr(datamodule, "store", None)
            if store is None or not hasattr(datamodule, "rows"):
                raise ConfigError(
                    "model.source=store needs a DataModule with a slice store (CTICHDataModule); "
                    "use model.source=batches"
                )
            return store_histograms(
                store, datamodule.rows("train"), self.net.channel, ich_only, chunk=32
            )
        if not self._batch_histograms:
            raise DatasetError("the threshold baseline saw no training batch to fit on")
        if getattr(datamodule, "augmentation_options", None):
            raise ConfigError(
                "the threshold baseline fitted from batches needs unaugmented slices "
                "(data.augmentation=null)"
            )
        if getattr(datamodule, "store", None) is not None and hasattr(datamodule, "rows"):
            expected = len(datamodule.rows("train"))
            if len(self._batch_histograms) != expected:
                raise ConfigError(
                    f"the threshold baseline saw {len(self._batch_histograms)} distinct training "
                    f"slices but the training patients have {expected}: fitting from batches needs "
                    "every slice once (data.mode=full_slice, data.train_slices=all, no batch "
                    "limit); or use model.source=store"
                )
        keys = sorted(self._batch_histograms)
        inside = np.stack([self._batch_histograms[k][0] for k in keys])
        outside = np.stack([self._batch_histograms[k][1] for k in keys])
        return IntensityHistograms(inside, outside)

    def fit_band(self, histograms: IntensityHistograms | None = None) -> ThresholdSearch:
        """Search the band on ``histograms`` (default: the training slices of the attached
        Trainer, from the configured source) and set it; report it when attached to a Trainer."""
        if histograms is None:
            histograms = self._training_histograms()
        search = search_thresholds(
            histograms, self.lower_range, self.upper_range, self.objective, self.chunk_slices
        )
        self.net.set_band(search.lower, search.upper)
        self.train_objective.fill_(search.value)
        self.search = search
        if self._trainer is not None:
            self._fitted_epoch = self.current_epoch
            self._report_search(search)
        return search

    def _fit_if_needed(self) -> None:
        if self._fitted_epoch != self.current_epoch:
            self.fit_band()

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        trainer = self.trainer
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._fit_if_needed()  # validation of a training epoch runs before on_train_epoch_end

    def on_train_epoch_end(self) -> None:
        self._fit_if_needed()
        self._batch_histograms = {}
        self.log("threshold/lower", float(self.net.lower), on_epoch=True, sync_dist=True)
        self.log("threshold/upper", float(self.net.upper), on_epoch=True, sync_dist=True)
        self.log(
            "threshold/train_objective", float(self.train_objective), on_epoch=True, sync_dist=True
        )

    def _report_search(self, search: ThresholdSearch) -> None:
        """Print the band, send the surface to TensorBoard, write the search files (rank 0)."""
        if self.global_rank != 0:
            return
        print(
            f"[ichseg.threshold] band {search.lower}..{search.upper} (inclusive): training "
            f"{search.objective} Jaccard {search.value:.4f} over {search.n_ich_slices} ICH slices "
            f"of {search.n_slices} searched",
            file=sys.stderr,
        )
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(
                    "threshold/surface (rows lower, columns upper)",
                    torch.from_numpy(surface_image(search)),
                    self.global_step,
                )
        directory = self.output_dir
        if directory is None:
            directory = self.trainer.default_root_dir
        if directory is not False and directory is not None:
            write_search(search, directory, self._search_record())

    def _search_record(self) -> dict[str, Any]:
        """Where the fit's slices came from: the source and, with a CV DataModule, the round."""
        record: dict[str, Any] = {"source": self._resolved_source()}
        cv_round = getattr(getattr(self.trainer, "datamodule", None), "cv_round", None)
        if cv_round is not None:
            record["fold"] = int(cv_round.index)
            record["training_patients"] = [int(p) for p in cv_round.train]
        return record

    # ------------------------------------------------------------------ validation and test

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        if not self.fitted:  # sanity check before fitting
            return
        self.val_metrics.update(
            self.predict_probabilities(batch["image"]).int(), batch["mask"].int()
        )
        if batch_idx == 0:
            keep_overlay_batch(self, batch)

    def on_validation_epoch_end(self) -> None:
        if not self.fitted:
            return
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self._log_overlay_grid()

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Window-level test metrics (``test/jaccard``, ``test/dice``)."""
        self.test_metrics.update(
            self.predict_probabilities(batch["image"]).int(), batch["mask"].int()
        )

    def on_test_epoch_start(self) -> None:
        if not self.fitted:
            raise ConfigError(
                "the threshold baseline has no band to test: fit it first (or load a checkpoint)"
            )
        self.test_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def _log_overlay_grid(self) -> None:
        log_overlay_grid(self)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = dict(self.meta)
        if self.fitted:
            meta["threshold_band"] = {
                "lower": int(self.net.lower),
                "upper": int(self.net.upper),
                "objective": self.objective,
                "train_objective": float(self.train_objective),
                "inclusive": True,
            }
        checkpoint["ichseg"] = _plain(meta)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.meta = {k: v for k, v in checkpoint.get("ichseg", {}).items() if k != "threshold_band"}
        #: (epoch, global_step) at which the loaded band was saved (named in reports).
        self.loaded_position = (
            int(checkpoint.get("epoch", 0)),
            int(checkpoint.get("global_step", 0)),
        )
