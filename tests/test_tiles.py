"""Tile grid, cropping, ICH counts per tile and undersampling."""

from __future__ import annotations

import numpy as np
import pytest

from ichseg.data.tiles import (
    all_tiles,
    crop_packed_tiles,
    crop_tile,
    crop_tiles,
    epoch_generator,
    flat_tile_ids,
    make_grid,
    negative_tiles,
    pack_masks,
    positive_tiles,
    tile_positive_counts,
    tiles_from_ids,
    training_tiles,
    unpack_masks,
    validation_tiles,
)
from ichseg.errors import ConfigError


def test_paper_grid_is_7x7_tiling_640() -> None:
    grid = make_grid(640, 160, 80)
    assert len(grid) == 49 and grid.shape == (7, 7)
    assert list(np.unique(grid.corners[:, 0])) == list(range(0, 481, 80))
    assert tuple(grid.corners[0]) == (0, 0) and tuple(grid.corners[-1]) == (480, 480)
    assert tuple(grid.corners[1]) == (0, 80)  # row-major
    coverage = grid.coverage()
    assert coverage.min() == 1 and coverage.max() == 4
    # the authors' NIfTI code: 128/64 on 512 is also 7x7
    assert len(make_grid(512, 128, 64)) == 49


@pytest.mark.parametrize("size", [512, 650, (600, 650), 161])
def test_grid_covers_every_pixel(size) -> None:
    grid = make_grid(size, 160, 80)
    coverage = grid.coverage()
    assert coverage.min() >= 1
    assert (grid.corners + grid.tile_size <= np.asarray(grid.size)).all()
    naive = np.zeros(grid.size, dtype=int)
    for row, col in grid.corners:
        naive[row : row + 160, col : col + 160] += 1
    np.testing.assert_array_equal(naive, coverage)


def test_far_edge_alignment_at_650() -> None:
    grid = make_grid(650, 160, 80)
    starts = np.unique(grid.corners[:, 0])
    assert list(starts) == [0, 80, 160, 240, 320, 400, 480, 490]


def test_bad_grid_settings() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        make_grid(100, 160, 80)
    with pytest.raises(ConfigError, match="gaps"):
        make_grid(640, 160, 200)


def test_cropped_window_is_a_view_of_its_region() -> None:
    rng = np.random.default_rng(0)
    slices = rng.integers(0, 255, size=(3, 2, 64, 64), dtype=np.uint8)
    grid = make_grid(64, 16, 8)
    window = crop_tile(slices, 2, 10, grid)
    row, col = grid.corners[10]
    np.testing.assert_array_equal(window, slices[2, :, row : row + 16, col : col + 16])
    assert np.shares_memory(window, slices)
    assert window.shape == (2, 16, 16)


@pytest.mark.parametrize("channels", [None, 3])
def test_crop_windows_batch_matches_single_crops(channels) -> None:
    rng = np.random.default_rng(1)
    shape = (5, 64, 64) if channels is None else (5, channels, 64, 64)
    slices = rng.integers(0, 255, size=shape, dtype=np.uint8)
    grid = make_grid(64, 16, 8)
    windows = np.stack([rng.integers(0, 5, 20), rng.integers(0, len(grid), 20)], axis=1)
    batch = crop_tiles(slices, windows, grid)
    assert batch.shape == (20, *shape[1:-2], 16, 16)
    assert not np.shares_memory(batch, slices)
    for out, (s, g) in zip(batch, windows, strict=True):
        np.testing.assert_array_equal(out, crop_tile(slices, s, g, grid))


def test_positive_counts_equal_a_naive_loop() -> None:
    rng = np.random.default_rng(2)
    masks = rng.random((40, 90, 90)) < 0.02
    masks[::3] = False  # empty slices take the fast path
    grid = make_grid(90, 32, 16)
    counts = tile_positive_counts(masks, grid, chunk=7)
    naive = np.zeros_like(counts)
    for s in range(masks.shape[0]):
        for g, (row, col) in enumerate(grid.corners):
            naive[s, g] = masks[s, row : row + 32, col : col + 32].sum()
    np.testing.assert_array_equal(counts, naive)


def _counts_and_patients(seed: int = 3):
    """10 patients x 8 slices, 49 windows, ICH on some slices."""
    rng = np.random.default_rng(seed)
    n_patients, n_slices, n_positions = 10, 8, 49
    counts = np.zeros((n_patients * n_slices, n_positions), dtype=np.int32)
    ich_slices = rng.choice(counts.shape[0], size=15, replace=False)
    for s in ich_slices:
        counts[s, rng.choice(n_positions, size=rng.integers(1, 6), replace=False)] = rng.integers(
            1, 500
        )
    # patient 0 has ICH on every slice: it has no ICH-free slice
    counts[:n_slices, 0] = 5
    patients = np.repeat(np.arange(100, 100 + n_patients), n_slices)
    return counts, patients


def test_paper_rule_takes_all_windows_of_one_empty_slice_per_patient() -> None:
    counts, patients = _counts_and_patients()
    negatives = negative_tiles(counts, patients, "paper", epoch_generator(0, 0))
    slices = np.unique(negatives[:, 0])
    assert len(negatives) == 49 * len(slices)
    assert (counts[slices].max(axis=1) == 0).all()  # empty slices only
    chosen_patients = patients[slices]
    assert sorted(chosen_patients) == list(range(101, 110))  # one per patient, none for patient 100


def test_ratio_rule_draws_ratio_times_positives_without_replacement() -> None:
    counts, patients = _counts_and_patients()
    n_positive = int((counts > 0).sum())
    for ratio in (0.5, 1.0, 3.0):
        negatives = negative_tiles(counts, patients, "ratio", epoch_generator(0, 1), ratio=ratio)
        assert len(negatives) == round(ratio * n_positive)
        assert len(np.unique(flat_tile_ids(negatives, 49))) == len(negatives)
        assert (counts[negatives[:, 0], negatives[:, 1]] == 0).all()
    # more than available: all ICH-free windows
    everything = negative_tiles(counts, patients, "ratio", epoch_generator(0, 1), ratio=1e6)
    assert len(everything) == int((counts == 0).sum())


def test_training_windows_include_every_positive_and_are_deterministic() -> None:
    counts, patients = _counts_and_patients()
    for rule in ("paper", "ratio"):
        epoch0 = training_tiles(counts, patients, rule, ratio=2.0, seed=5, epoch=0)
        again = training_tiles(counts, patients, rule, ratio=2.0, seed=5, epoch=0)
        epoch1 = training_tiles(counts, patients, rule, ratio=2.0, seed=5, epoch=1)
        np.testing.assert_array_equal(epoch0, again)
        assert len(epoch0) == len(epoch1)
        assert not np.array_equal(epoch0, epoch1)
        ids = set(flat_tile_ids(epoch0, 49).tolist())
        assert set(flat_tile_ids(positive_tiles(counts), 49).tolist()) <= ids
    assert len(training_tiles(counts, patients, "all")) == counts.size
    with pytest.raises(ConfigError, match="undersampling rule"):
        training_tiles(counts, patients, "most")


def test_validation_windows() -> None:
    counts, _ = _counts_and_patients()
    assert len(validation_tiles(counts, "positive")) == int((counts > 0).sum())
    assert len(validation_tiles(counts, "all")) == counts.size


def test_a_validation_tile_limit_keeps_every_ich_tile_and_a_fixed_sample_of_the_rest() -> None:
    counts, _ = _counts_and_patients()
    n_positive = int((counts > 0).sum())
    limit = n_positive + 20
    assert counts.size > limit
    chosen = validation_tiles(counts, "all", limit=limit, seed=3)
    assert len(chosen) == limit
    ids = flat_tile_ids(chosen, counts.shape[1])
    assert np.all(np.diff(ids) > 0)  # slice-major, no tile twice
    assert set(flat_tile_ids(positive_tiles(counts), counts.shape[1]).tolist()) <= set(ids.tolist())
    assert int((counts[chosen[:, 0], chosen[:, 1]] == 0).sum()) == 20
    # the same tiles for the same seed (every epoch), others for another seed
    np.testing.assert_array_equal(chosen, validation_tiles(counts, "all", limit=limit, seed=3))
    assert not np.array_equal(chosen, validation_tiles(counts, "all", limit=limit, seed=4))
    # fewer ICH tiles than that: a sample of them; more room than tiles: all of them
    few = validation_tiles(counts, "positive", limit=5, seed=0)
    assert len(few) == 5 and np.all(counts[few[:, 0], few[:, 1]] > 0)
    assert len(validation_tiles(counts, "all", limit=counts.size + 1)) == counts.size
    with pytest.raises(ConfigError, match="validation tile limit must be positive"):
        validation_tiles(counts, "all", limit=0)


def test_flat_ids_round_trip() -> None:
    windows = all_tiles(4, 49)
    np.testing.assert_array_equal(tiles_from_ids(flat_tile_ids(windows, 49), 49), windows)


@pytest.mark.parametrize(
    ("size", "window", "stride"),
    [(640, 160, 80), (650, 160, 80), (90, 32, 16), (37, 13, 5), (64, 64, 64)],
)
def test_packed_masks_crop_like_bool_masks(size, window, stride) -> None:
    rng = np.random.default_rng(size)
    masks = rng.random((3, size, size)) < 0.3
    grid = make_grid(size, window, stride)
    packed = pack_masks(masks)
    assert packed.shape == (3, size, (size + 7) // 8)
    np.testing.assert_array_equal(unpack_masks(packed, size), masks)
    windows = all_tiles(3, len(grid))
    np.testing.assert_array_equal(
        crop_packed_tiles(packed, windows, grid),
        crop_tiles(masks, windows, grid).astype(np.uint8),
    )


def test_the_earlier_module_and_names_are_aliases() -> None:
    from ichseg.data import patches, tiles

    assert patches is tiles
    assert patches.WindowGrid is tiles.TileGrid and patches.crop_windows is tiles.crop_tiles
    grid = tiles.make_grid(64, 32, 16)
    assert (grid.window, grid.stride, grid.n_windows) == (32, 16, 9)
