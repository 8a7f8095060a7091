"""The paper's threshold baseline as a search: the brain-window band ``lower <= v <= upper`` (both
inclusive, 0-255) with the best training Jaccard over the grid lower 100..210 x upper 210..255.

Exact and vectorised: per-slice histograms inside / outside the mask, every pair's counts from
cumulative sums, ties settled in exact rational arithmetic (the first maximum in (lower, upper)
order). Objectives: ``"slice_mean"`` (the mean per-slice Jaccard over the ICH slices, the paper's
reading) and ``"pooled"`` (one Jaccard over all pixels). numpy only; the Lightning fit is
:mod:`ichseg.lit.threshold`. Long form: docs/threshold.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, Protocol

import numpy as np

from ichseg.errors import ConfigError, DatasetError

__all__ = [
    "LEVELS",
    "LOWER_RANGE",
    "OBJECTIVES",
    "UPPER_RANGE",
    "IntensityHistograms",
    "Objective",
    "SliceSource",
    "ThresholdSearch",
    "fit_thresholds",
    "level_counts",
    "naive_threshold_search",
    "objective_surface",
    "search_thresholds",
    "store_histograms",
]

#: The paper's grid, inclusive: lower 100..210, upper 210..255 (step 1).
LOWER_RANGE: tuple[int, int] = (100, 210)
UPPER_RANGE: tuple[int, int] = (210, 255)
Objective = Literal["slice_mean", "pooled"]
OBJECTIVES: tuple[str, ...] = ("slice_mean", "pooled")
#: Intensity levels of a uint8 brain-window image.
LEVELS = 256
_EPS = float(np.finfo(np.float64).eps)


class SliceSource(Protocol):
    """What :func:`store_histograms` reads from a slice store (the DataModule's ``SliceStore``).

    ``images``: (S, C, H, W) uint8 windowed slices; ``positive_pixels``: (S,) ICH pixels per slice;
    ``mask_slices(rows)``: the (n, H, W) bool masks of those rows.
    """

    images: Any
    positive_pixels: Any

    def mask_slices(self, rows: np.ndarray) -> np.ndarray: ...


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
    store: SliceSource,
    rows: np.ndarray,
    channel: int = 0,
    ich_only: bool = False,
    chunk: int = 32,
) -> IntensityHistograms:
    """Histograms of store rows (a :class:`SliceSource`, e.g. the DataModule's slice store), in row
    order.

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
    """The (n_lower, n_upper) float64 objective of every pair (module docstring).

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
