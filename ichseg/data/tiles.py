"""The tile grid over a slice, ICH counts per tile, and training-tile sampling.

A tile is a square spatial crop of a slice ("window" means a CT intensity window only; the
earlier names of this module, :mod:`ichseg.data.patches`, stay as aliases). docs/data-pipeline.md
has the long form.

The paper cuts each 640x640 slice into 160x160 tiles with stride 80: a 7x7 grid of 49 tiles
that covers the slice exactly. :func:`make_grid` builds such a grid for any slice size, tile size
and stride; when the stride does not divide the slice, the last tile of each row and column is
aligned to the far edge so that every pixel is covered.

A tile is an index pair ``(slice index, grid position)`` into one contiguous slice array
``(S, C, H, W)`` or ``(S, H, W)``: an ``(n, 2)`` int array describes any set of tiles, no Python
object per tile exists, and tiles are cropped on demand (:func:`crop_tile` returns a view,
:func:`crop_tiles` copies a whole batch in one fancy-indexing operation).

Training tiles are every tile with an ICH pixel plus undersampled negatives, re-drawn each
epoch from a generator seeded by ``(seed, epoch)``:

* ``paper``: all tiles of one random ICH-free slice per training patient (the authors' code);
* ``ratio``: ``ratio`` x the number of positive tiles, drawn without replacement from all
  ICH-free tiles of the training slices;
* ``all``: every tile (no undersampling).

Or, instead of undersampling, foreground OVERSAMPLING (nnU-Net): :func:`oversampled_tiles` lays
out each batch with a fixed share of ICH tiles (a third) and ICH-free tiles drawn from every
slice (rule ``oversample`` of the DataModule).

2.5D input: :func:`context_rows` gives the rows of the neighbouring slices ``s - k .. s + k`` of
each slice (clamped at the volume's ends) and :func:`crop_context_tiles` stacks their tiles as
channels, all by index arithmetic on the one slice array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ichseg.errors import ConfigError

UndersamplingRule = Literal["paper", "ratio", "all"]
UNDERSAMPLING_RULES: tuple[str, ...] = ("paper", "ratio", "all")
#: Training-tile rules of the DataModule: the undersampling rules, or foreground oversampling.
SAMPLING_RULES: tuple[str, ...] = (*UNDERSAMPLING_RULES, "oversample")
#: Slices per chunk when building integral images (bounds the int32 scratch memory).
_COUNT_CHUNK = 32


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Top-left corners ``(row, col)`` of the square tiles covering a slice, row-major."""

    corners: np.ndarray  # (G, 2) int64, read-only
    tile_size: int
    tile_stride: int
    size: tuple[int, int]  # slice (height, width)
    shape: tuple[int, int]  # number of tile rows and tile columns

    def __len__(self) -> int:
        return int(self.corners.shape[0])

    @property
    def n_tiles(self) -> int:
        """Tiles per slice (G)."""
        return len(self)

    # earlier names of the fields, kept for one release
    window = property(lambda self: self.tile_size, doc="Earlier name of :attr:`tile_size`.")
    stride = property(lambda self: self.tile_stride, doc="Earlier name of :attr:`tile_stride`.")
    n_windows = property(lambda self: len(self), doc="Earlier name of :attr:`n_tiles`.")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TileGrid):
            return NotImplemented
        mine = (self.tile_size, self.tile_stride, self.size)
        return mine == (other.tile_size, other.tile_stride, other.size)

    def __hash__(self) -> int:
        return hash((self.tile_size, self.tile_stride, self.size))

    def coverage(self) -> np.ndarray:
        """(H, W) int: how many tiles cover each pixel (the stitching denominator)."""
        height, width = self.size
        diff = np.zeros((height + 1, width + 1), dtype=np.int64)
        rows, cols, w = self.corners[:, 0], self.corners[:, 1], self.tile_size
        np.add.at(diff, (rows, cols), 1)
        np.add.at(diff, (rows + w, cols), -1)
        np.add.at(diff, (rows, cols + w), -1)
        np.add.at(diff, (rows + w, cols + w), 1)
        return diff.cumsum(axis=0).cumsum(axis=1)[:height, :width]


def tile_starts(length: int, tile_size: int, tile_stride: int) -> np.ndarray:
    """Tile starts along one axis: every ``tile_stride``, the last one flush with the far edge."""
    size, stride = tile_size, tile_stride
    if size <= 0 or stride <= 0:
        raise ConfigError(f"tile size ({size}) and stride ({stride}) must be positive")
    if size > length:
        raise ConfigError(f"a {size}-pixel tile does not fit a {length}-pixel slice")
    if stride > size:
        raise ConfigError(f"stride {stride} is larger than tile {size}: the grid would leave gaps")
    starts = np.arange(0, length - size + 1, stride, dtype=np.int64)
    if starts[-1] + size < length:
        starts = np.append(starts, length - size)
    return starts


def make_grid(size: int | Sequence[int], tile_size: int = 160, tile_stride: int = 80) -> TileGrid:
    """The tile grid covering a ``size`` (int or ``(height, width)``) slice."""
    height, width = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    rows = tile_starts(height, tile_size, tile_stride)
    cols = tile_starts(width, tile_size, tile_stride)
    corners = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    corners.setflags(write=False)
    grid_shape = (rows.size, cols.size)
    return TileGrid(corners, int(tile_size), int(tile_stride), (height, width), grid_shape)


# --------------------------------------------------------------------------- cropping


def crop_tile(slices: np.ndarray, slice_index: int, position: int, grid: TileGrid) -> np.ndarray:
    """One tile of ``slices`` ``(S, [C,] H, W)`` as a view: ``slices[s, ..., r:r+w, c:c+w]``."""
    row, col = grid.corners[position]
    w = grid.tile_size
    return slices[slice_index, ..., row : row + w, col : col + w]


def crop_tiles(slices: np.ndarray, tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """A batch of tiles, ``(n, [C,] w, w)``, copied once from ``slices`` ``(S, [C,] H, W)``.

    ``tiles`` is ``(n, 2)``: slice index, grid position.
    """
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    w = grid.tile_size
    view = np.lib.stride_tricks.sliding_window_view(slices, (w, w), axis=(-2, -1))
    corners = grid.corners[tiles[:, 1]]
    if slices.ndim == 4:
        return view[tiles[:, 0], :, corners[:, 0], corners[:, 1]]
    if slices.ndim == 3:
        return view[tiles[:, 0], corners[:, 0], corners[:, 1]]
    raise ConfigError(f"slices must be (S, H, W) or (S, C, H, W), got shape {slices.shape}")


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Bool masks ``(..., H, W)`` as bits along the last axis: ``(..., H, ceil(W / 8))`` uint8."""
    return np.packbits(masks, axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`: ``(..., H, width)`` bool."""
    return np.unpackbits(packed, axis=-1, count=width).view(np.bool_)


def crop_packed_tiles(packed: np.ndarray, tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """A batch of mask tiles ``(n, w, w)`` uint8 0/1 from packed masks ``(S, H, ceil(W / 8))``.

    Copies only the bytes that hold each tile (one fancy-indexing copy for the batch), unpacks
    them and shifts each tile by its bit offset.
    """
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    w = grid.tile_size
    width = grid.size[1]
    n_bytes = packed.shape[-1]
    corners = grid.corners[tiles[:, 1]]
    span = min((w + 7) // 8 + 1, n_bytes)  # bytes that hold a tile at any bit offset
    first = np.minimum(corners[:, 1] // 8, n_bytes - span)
    offset = corners[:, 1] - 8 * first
    view = np.lib.stride_tricks.sliding_window_view(packed, (w, span), axis=(-2, -1))
    bits = np.unpackbits(view[tiles[:, 0], corners[:, 0], first], axis=-1)  # (n, w, 8 * span)
    if span * 8 > width:
        bits = bits[..., :width]
    shifted = np.lib.stride_tricks.sliding_window_view(bits, w, axis=-1)  # (n, w, positions, w)
    return shifted[np.arange(tiles.shape[0]), :, offset]


def all_tiles(n_slices: int, n_positions: int) -> np.ndarray:
    """``(n_slices * G, 2)``: every tile of every slice (``G = n_positions``), slice-major."""
    slice_index = np.repeat(np.arange(n_slices, dtype=np.int64), n_positions)
    position = np.tile(np.arange(n_positions, dtype=np.int64), n_slices)
    return np.stack([slice_index, position], axis=1)


# --------------------------------------------------------------------------- 2.5D context


def check_context_slices(value: object) -> int:
    """``value`` as a number of neighbouring slices on each side: a non-negative integer."""
    valid = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0
    if not valid:
        raise ConfigError(f"context_slices must be a non-negative integer, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def input_channels(n_channels: int, context_slices: int = 0) -> int:
    """Network input channels of 2.5D input: ``n_channels`` CT windows for each of the
    ``2 * context_slices + 1`` slices ``s - k .. s + k``."""
    return int(n_channels) * (2 * check_context_slices(context_slices) + 1)


def context_rows(
    rows: np.ndarray,
    context_slices: int,
    first_row: np.ndarray | int,
    last_row: np.ndarray | int,
) -> np.ndarray:
    """``(n, 2k + 1)`` rows ``s - k .. s + k`` around each of ``rows`` (``k = context_slices``),
    clamped to ``[first_row, last_row]`` (per row, or one range for all): the neighbouring slices
    of the same volume, the first and last slices repeated at the volume's ends."""
    k = check_context_slices(context_slices)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    offsets = np.arange(-k, k + 1, dtype=np.int64)
    low = np.asarray(first_row, dtype=np.int64).reshape(-1, 1)
    high = np.asarray(last_row, dtype=np.int64).reshape(-1, 1)
    return np.clip(rows[:, None] + offsets[None, :], low, high)


def crop_context_tiles(
    slices: np.ndarray, tiles: np.ndarray, neighbours: np.ndarray, grid: TileGrid
) -> np.ndarray:
    """A batch of 2.5D tiles ``(n, (2k + 1) * C, w, w)`` from ``slices`` ``(S, C, H, W)``.

    ``tiles`` ``(n, 2)`` gives each tile's grid position; ``neighbours`` ``(n, 2k + 1)`` the
    rows whose tile at that position is stacked as channels (:func:`context_rows`). One
    fancy-indexing copy for the batch; channels are slice-major (all of slice ``s - k`` first).
    """
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    width = neighbours.shape[1]
    expanded = np.stack(
        [neighbours.reshape(-1), np.repeat(tiles[:, 1], width)], axis=1
    )  # (n * (2k + 1), 2)
    crops = crop_tiles(slices, expanded, grid)  # (n * (2k + 1), C, w, w)
    return crops.reshape(tiles.shape[0], -1, grid.tile_size, grid.tile_size)


# --------------------------------------------------------------------------- ICH per tile


def tile_positive_counts(
    masks: np.ndarray, grid: TileGrid, chunk: int = _COUNT_CHUNK
) -> np.ndarray:
    """``(S, G)`` int32: ICH pixels of each tile of each ``(S, H, W)`` mask slice.

    Integral images (cumulative sums, O(pixels)) over the slices that have any ICH, ``chunk`` slices
    at a time; empty slices are all zero without any work.
    """
    if masks.ndim != 3 or tuple(masks.shape[1:]) != grid.size:
        raise ConfigError(f"masks of shape {masks.shape} do not match the {grid.size} tile grid")
    n_slices = masks.shape[0]
    counts = np.zeros((n_slices, len(grid)), dtype=np.int32)
    nonempty = np.flatnonzero(masks.reshape(n_slices, -1).any(axis=1))
    rows, cols, w = grid.corners[:, 0], grid.corners[:, 1], grid.tile_size
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


def positive_tiles(counts: np.ndarray) -> np.ndarray:
    """``(n, 2)`` tiles with at least one ICH pixel, slice-major."""
    return np.argwhere(counts > 0).astype(np.int64)


def negative_tiles(
    counts: np.ndarray,
    slice_patients: np.ndarray,
    rule: UndersamplingRule,
    rng: np.random.Generator,
    ratio: float = 1.0,
) -> np.ndarray:
    """``(n, 2)`` undersampled ICH-free tiles under ``rule`` (see the module docstring)."""
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
            raise ConfigError(f"the negative-tile ratio must be non-negative, got {ratio}")
        zero = np.flatnonzero(counts.reshape(-1) == 0)
        wanted = min(int(round(ratio * np.count_nonzero(counts))), zero.size)
        picked = np.sort(rng.choice(zero, size=wanted, replace=False))
        return np.stack(np.divmod(picked, n_positions), axis=1).astype(np.int64)
    if rule == "all":
        return np.argwhere(counts == 0).astype(np.int64)
    raise ConfigError(
        f"undersampling rule must be one of {', '.join(UNDERSAMPLING_RULES)}, not {rule!r}"
    )


def training_tiles(
    counts: np.ndarray,
    slice_patients: np.ndarray,
    rule: UndersamplingRule = "paper",
    ratio: float = 1.0,
    seed: int = 0,
    epoch: int = 0,
) -> np.ndarray:
    """``(n, 2)`` training tiles of an epoch: all positive tiles plus that epoch's negatives."""
    negatives = negative_tiles(counts, slice_patients, rule, epoch_generator(seed, epoch), ratio)
    return np.concatenate([positive_tiles(counts), negatives], axis=0)


def foreground_per_batch(batch_size: int, foreground_fraction: float) -> int:
    """ICH tiles in each oversampled batch: ``round(fraction x batch)``, at least 1 (when the
    fraction is positive) and at most the batch."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: the batch size must be positive")
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ConfigError(f"foreground_fraction must lie in [0, 1], got {foreground_fraction}")
    if foreground_fraction == 0:
        return 0
    return int(min(batch_size, max(1, round(foreground_fraction * batch_size))))


def oversampled_tiles(
    counts: np.ndarray,
    batch_size: int,
    foreground_fraction: float = 0.33,
    rng: np.random.Generator | None = None,
    n_batches: int | None = None,
) -> np.ndarray:
    """``(n_batches * batch_size, 2)`` tiles in batch order, each batch holding a fixed share of
    ICH tiles (nnU-Net's foreground oversampling, a third of each batch).

    Every batch has ``p =`` :func:`foreground_per_batch` tiles with an ICH pixel and
    ``batch_size - p`` ICH-free tiles, in random order within the batch. ``n_batches`` defaults to
    ``ceil(positives / p)``: every positive tile once per epoch (the last batch topped up with
    randomly repeated positives). The ICH-free tiles are drawn from ALL ICH-free tiles of
    ``counts`` (every slice, also those next to bone), without replacement while there are enough.
    When there are no positive (or no ICH-free) tiles the batches take what exists.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    flat = np.asarray(counts).reshape(-1)
    n_positions = counts.shape[1]
    positive = np.flatnonzero(flat > 0)
    negative = np.flatnonzero(flat == 0)
    per_batch = foreground_per_batch(batch_size, foreground_fraction)
    if positive.size == 0:
        per_batch = 0
    if negative.size == 0:
        per_batch = batch_size if positive.size else 0
    if positive.size == 0 and negative.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if n_batches is None:
        n_batches = -(-positive.size // per_batch) if per_batch else -(-negative.size // batch_size)
    if n_batches < 0:
        raise ConfigError(f"the number of batches must be non-negative, got {n_batches}")

    def draw(pool: np.ndarray, size: int) -> np.ndarray:
        """``size`` ids of ``pool``: a permutation repeated, the remainder drawn at random."""
        if size == 0:
            return np.empty(0, dtype=np.int64)
        whole, rest = divmod(size, pool.size)
        parts = [rng.permutation(pool) for _ in range(whole)]
        parts.append(rng.choice(pool, size=rest, replace=False))
        return np.concatenate(parts)

    n_negative = batch_size - per_batch
    batches = np.concatenate(
        [
            draw(positive, n_batches * per_batch).reshape(n_batches, per_batch),
            draw(negative, n_batches * n_negative).reshape(n_batches, n_negative),
        ],
        axis=1,
    )
    batches = rng.permuted(batches, axis=1).reshape(-1)  # shuffle within each batch
    return np.stack(np.divmod(batches, n_positions), axis=1).astype(np.int64)


def validation_tiles(
    counts: np.ndarray,
    which: Literal["positive", "all"] = "positive",
    limit: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``(n, 2)`` validation tiles: the positive ones (the paper) or all of them, slice-major.

    ``limit``: at most that many, the same ones every epoch (:func:`limit_tiles`).
    """
    if which == "positive":
        tiles = positive_tiles(counts)
    elif which == "all":
        tiles = all_tiles(counts.shape[0], counts.shape[1])
    else:
        raise ConfigError(f"validation tiles must be 'positive' or 'all', not {which!r}")
    return tiles if limit is None else limit_tiles(tiles, counts, limit, seed)


def limit_tiles(tiles: np.ndarray, counts: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """A fixed subsample of ``(n, 2)`` ``tiles``, at most ``limit``, slice-major.

    Every ICH tile is kept (a seeded sample of ``limit`` of them if there are more) and the rest
    of the budget is a seeded uniform sample of the ICH-free tiles, so that a validation pass on
    it still scores the segmentation of every lesion and still pays for false positives, at a
    fraction of the cost of all tiles. ``limit >= len(tiles)`` returns ``tiles`` unchanged.
    """
    limit = int(limit)
    if limit < 1:
        raise ConfigError(f"the validation tile limit must be positive, got {limit}")
    if len(tiles) <= limit:
        return tiles
    rng = np.random.default_rng([int(seed), 0x7A11])
    positive = counts[tiles[:, 0], tiles[:, 1]] > 0
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    if len(pos) >= limit:
        chosen = rng.choice(pos, size=limit, replace=False)
    else:
        chosen = np.concatenate([pos, rng.choice(neg, size=limit - len(pos), replace=False)])
    return tiles[np.sort(chosen)]


def flat_tile_ids(tiles: np.ndarray, n_positions: int) -> np.ndarray:
    """``(n,)`` int64 ids ``slice * G + position`` of ``(n, 2)`` tiles (what a sampler yields)."""
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    return tiles[:, 0] * n_positions + tiles[:, 1]


def tiles_from_ids(ids: np.ndarray | Sequence[int], n_positions: int) -> np.ndarray:
    """Inverse of :func:`flat_tile_ids`."""
    return np.stack(np.divmod(np.asarray(ids, dtype=np.int64), n_positions), axis=1)


# --------------------------------------------------------------------------- earlier names

#: Earlier names, kept for one release.
WindowGrid = TileGrid
window_starts = tile_starts
crop_window = crop_tile
crop_windows = crop_tiles
crop_packed_windows = crop_packed_tiles
all_windows = all_tiles
crop_context_windows = crop_context_tiles
window_positive_counts = tile_positive_counts
positive_windows = positive_tiles
negative_windows = negative_tiles
training_windows = training_tiles
oversampled_windows = oversampled_tiles
validation_windows = validation_tiles
flat_window_ids = flat_tile_ids
windows_from_ids = tiles_from_ids
