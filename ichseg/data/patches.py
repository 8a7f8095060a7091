"""The window grid over a slice, ICH counts per window, and training-window undersampling.

The paper cuts each 640x640 slice into 160x160 windows with stride 80: a 7x7 grid of 49 windows
that tiles the slice exactly. :func:`make_grid` builds such a grid for any slice size, window and
stride; when the stride does not divide the slice, the last window of each row and column is
aligned to the far edge so that every pixel is covered.

A window is an index pair ``(slice index, grid position)`` into one contiguous slice array
``(S, C, H, W)`` or ``(S, H, W)``: an ``(n, 2)`` int array describes any set of windows, no Python
object per window exists, and windows are cropped on demand (:func:`crop_window` returns a view,
:func:`crop_windows` copies a whole batch in one fancy-indexing operation).

Training windows are every window with an ICH pixel plus undersampled negatives, re-drawn each
epoch from a generator seeded by ``(seed, epoch)``:

* ``paper``: all windows of one random ICH-free slice per training patient (the authors' code);
* ``ratio``: ``ratio`` x the number of positive windows, drawn without replacement from all
  ICH-free windows of the training slices;
* ``all``: every window (no undersampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ichseg.errors import ConfigError

UndersamplingRule = Literal["paper", "ratio", "all"]
UNDERSAMPLING_RULES: tuple[str, ...] = ("paper", "ratio", "all")
#: Slices per chunk when building integral images (bounds the int32 scratch memory).
_COUNT_CHUNK = 32


@dataclass(frozen=True, eq=False)
class WindowGrid:
    """Top-left corners ``(row, col)`` of the square windows covering a slice, row-major."""

    corners: np.ndarray  # (G, 2) int64, read-only
    window: int
    stride: int
    size: tuple[int, int]  # slice (height, width)
    shape: tuple[int, int]  # number of window rows and window columns

    def __len__(self) -> int:
        return int(self.corners.shape[0])

    @property
    def n_windows(self) -> int:
        """Windows per slice (G)."""
        return len(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WindowGrid):
            return NotImplemented
        return (self.window, self.stride, self.size) == (other.window, other.stride, other.size)

    def __hash__(self) -> int:
        return hash((self.window, self.stride, self.size))

    def coverage(self) -> np.ndarray:
        """(H, W) int: how many windows cover each pixel (the stitching denominator)."""
        height, width = self.size
        diff = np.zeros((height + 1, width + 1), dtype=np.int64)
        rows, cols, w = self.corners[:, 0], self.corners[:, 1], self.window
        np.add.at(diff, (rows, cols), 1)
        np.add.at(diff, (rows + w, cols), -1)
        np.add.at(diff, (rows, cols + w), -1)
        np.add.at(diff, (rows + w, cols + w), 1)
        return diff.cumsum(axis=0).cumsum(axis=1)[:height, :width]


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """Window starts along one axis: every ``stride``, the last one flush with the far edge."""
    if window <= 0 or stride <= 0:
        raise ConfigError(f"window ({window}) and stride ({stride}) must be positive")
    if window > length:
        raise ConfigError(f"a {window}-pixel window does not fit a {length}-pixel slice")
    if stride > window:
        raise ConfigError(
            f"stride {stride} is larger than window {window}: the grid would leave gaps"
        )
    starts = np.arange(0, length - window + 1, stride, dtype=np.int64)
    if starts[-1] + window < length:
        starts = np.append(starts, length - window)
    return starts


def make_grid(size: int | Sequence[int], window: int = 160, stride: int = 80) -> WindowGrid:
    """The window grid covering a ``size`` (int or ``(height, width)``) slice."""
    height, width = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    rows = window_starts(height, window, stride)
    cols = window_starts(width, window, stride)
    corners = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    corners.setflags(write=False)
    return WindowGrid(corners, int(window), int(stride), (height, width), (rows.size, cols.size))


# --------------------------------------------------------------------------- cropping


def crop_window(
    slices: np.ndarray, slice_index: int, position: int, grid: WindowGrid
) -> np.ndarray:
    """One window of ``slices`` ``(S, [C,] H, W)`` as a view: ``slices[s, ..., r:r+w, c:c+w]``."""
    row, col = grid.corners[position]
    w = grid.window
    return slices[slice_index, ..., row : row + w, col : col + w]


def crop_windows(slices: np.ndarray, windows: np.ndarray, grid: WindowGrid) -> np.ndarray:
    """A batch of windows, ``(n, [C,] w, w)``, copied once from ``slices`` ``(S, [C,] H, W)``.

    ``windows`` is ``(n, 2)``: slice index, grid position.
    """
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 2)
    w = grid.window
    view = np.lib.stride_tricks.sliding_window_view(slices, (w, w), axis=(-2, -1))
    corners = grid.corners[windows[:, 1]]
    if slices.ndim == 4:
        return view[windows[:, 0], :, corners[:, 0], corners[:, 1]]
    if slices.ndim == 3:
        return view[windows[:, 0], corners[:, 0], corners[:, 1]]
    raise ConfigError(f"slices must be (S, H, W) or (S, C, H, W), got shape {slices.shape}")


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Bool masks ``(..., H, W)`` as bits along the last axis: ``(..., H, ceil(W / 8))`` uint8."""
    return np.packbits(masks, axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`: ``(..., H, width)`` bool."""
    return np.unpackbits(packed, axis=-1, count=width).view(np.bool_)


def crop_packed_windows(packed: np.ndarray, windows: np.ndarray, grid: WindowGrid) -> np.ndarray:
    """A batch of mask windows ``(n, w, w)`` uint8 0/1 from packed masks ``(S, H, ceil(W / 8))``.

    Copies only the bytes that hold each window (one fancy-indexing copy for the batch), unpacks
    them and shifts each window by its bit offset.
    """
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 2)
    w = grid.window
    width = grid.size[1]
    n_bytes = packed.shape[-1]
    corners = grid.corners[windows[:, 1]]
    span = min((w + 7) // 8 + 1, n_bytes)  # bytes that hold a window at any bit offset
    first = np.minimum(corners[:, 1] // 8, n_bytes - span)
    offset = corners[:, 1] - 8 * first
    view = np.lib.stride_tricks.sliding_window_view(packed, (w, span), axis=(-2, -1))
    bits = np.unpackbits(view[windows[:, 0], corners[:, 0], first], axis=-1)  # (n, w, 8 * span)
    if span * 8 > width:
        bits = bits[..., :width]
    shifted = np.lib.stride_tricks.sliding_window_view(bits, w, axis=-1)  # (n, w, positions, w)
    return shifted[np.arange(windows.shape[0]), :, offset]


def all_windows(n_slices: int, n_positions: int) -> np.ndarray:
    """``(n_slices * G, 2)``: every window of every slice (``G = n_positions``), slice-major."""
    slice_index = np.repeat(np.arange(n_slices, dtype=np.int64), n_positions)
    position = np.tile(np.arange(n_positions, dtype=np.int64), n_slices)
    return np.stack([slice_index, position], axis=1)


# --------------------------------------------------------------------------- ICH per window


def window_positive_counts(
    masks: np.ndarray, grid: WindowGrid, chunk: int = _COUNT_CHUNK
) -> np.ndarray:
    """``(S, G)`` int32: ICH pixels of each window of each ``(S, H, W)`` mask slice.

    Integral images (cumulative sums, O(pixels)) over the slices that have any ICH, ``chunk`` slices
    at a time; empty slices are all zero without any work.
    """
    if masks.ndim != 3 or tuple(masks.shape[1:]) != grid.size:
        raise ConfigError(f"masks of shape {masks.shape} do not match the {grid.size} window grid")
    n_slices = masks.shape[0]
    counts = np.zeros((n_slices, len(grid)), dtype=np.int32)
    nonempty = np.flatnonzero(masks.reshape(n_slices, -1).any(axis=1))
    rows, cols, w = grid.corners[:, 0], grid.corners[:, 1], grid.window
    height, width = grid.size
    for start in range(0, nonempty.size, chunk):
        block = nonempty[start : start + chunk]
        integral = np.zeros((block.size, height + 1, width + 1), dtype=np.int32)
        np.cumsum(masks[block], axis=1, dtype=np.int32, out=integral[:, 1:, 1:])
        np.cumsum(integral[:, 1:, 1:], axis=2, out=integral[:, 1:, 1:])
        counts[block] = (
            integral[:, rows + w, cols + w]
            - integral[:, rows, cols + w]
            - integral[:, rows + w, cols]
            + integral[:, rows, cols]
        )
    return counts


# --------------------------------------------------------------------------- undersampling


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator for ``(seed, epoch)``: same pair, same draws."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x1C5E6])


def positive_windows(counts: np.ndarray) -> np.ndarray:
    """``(n, 2)`` windows with at least one ICH pixel, slice-major."""
    return np.argwhere(counts > 0).astype(np.int64)


def negative_windows(
    counts: np.ndarray,
    slice_patients: np.ndarray,
    rule: UndersamplingRule,
    rng: np.random.Generator,
    ratio: float = 1.0,
) -> np.ndarray:
    """``(n, 2)`` undersampled ICH-free windows under ``rule`` (see the module docstring)."""
    n_slices, n_positions = counts.shape
    if rule == "paper":
        empty_slices = np.flatnonzero(counts.max(axis=1) == 0)
        if empty_slices.size == 0:
            return np.empty((0, 2), dtype=np.int64)
        patients = np.asarray(slice_patients)[empty_slices]
        # one random empty slice per patient: sort by (patient, random key), keep each group's first
        order = np.lexsort((rng.random(empty_slices.size), patients))
        _, first = np.unique(patients[order], return_index=True)
        chosen = np.sort(empty_slices[order[first]])
        return np.stack(
            [np.repeat(chosen, n_positions), np.tile(np.arange(n_positions), chosen.size)], axis=1
        ).astype(np.int64)
    if rule == "ratio":
        if ratio < 0:
            raise ConfigError(f"the negative-window ratio must be non-negative, got {ratio}")
        zero = np.flatnonzero(counts.reshape(-1) == 0)
        wanted = min(int(round(ratio * np.count_nonzero(counts))), zero.size)
        picked = np.sort(rng.choice(zero, size=wanted, replace=False))
        return np.stack(np.divmod(picked, n_positions), axis=1).astype(np.int64)
    if rule == "all":
        return np.argwhere(counts == 0).astype(np.int64)
    raise ConfigError(
        f"undersampling rule must be one of {', '.join(UNDERSAMPLING_RULES)}, not {rule!r}"
    )


def training_windows(
    counts: np.ndarray,
    slice_patients: np.ndarray,
    rule: UndersamplingRule = "paper",
    ratio: float = 1.0,
    seed: int = 0,
    epoch: int = 0,
) -> np.ndarray:
    """``(n, 2)`` training windows of an epoch: all positive windows plus that epoch's negatives."""
    negatives = negative_windows(counts, slice_patients, rule, epoch_generator(seed, epoch), ratio)
    return np.concatenate([positive_windows(counts), negatives], axis=0)


def validation_windows(
    counts: np.ndarray, which: Literal["positive", "all"] = "positive"
) -> np.ndarray:
    """``(n, 2)`` validation windows: the positive ones (the paper) or all of them."""
    if which == "positive":
        return positive_windows(counts)
    if which == "all":
        return all_windows(counts.shape[0], counts.shape[1])
    raise ConfigError(f"validation windows must be 'positive' or 'all', not {which!r}")


def flat_window_ids(windows: np.ndarray, n_positions: int) -> np.ndarray:
    """``(n,)`` int64 ids ``slice * G + position`` of ``(n, 2)`` windows (what a sampler yields)."""
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 2)
    return windows[:, 0] * n_positions + windows[:, 1]


def windows_from_ids(ids: np.ndarray | Sequence[int], n_positions: int) -> np.ndarray:
    """Inverse of :func:`flat_window_ids`."""
    return np.stack(np.divmod(np.asarray(ids, dtype=np.int64), n_positions), axis=1)
