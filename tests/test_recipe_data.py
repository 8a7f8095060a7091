"""Data switches of the improved recipes: 2.5D context slices and foreground oversampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichseg.data.phantom import generate_phantom
from ichseg.data.sampling import OversampledTileSampler
from ichseg.data.tiles import (
    context_rows,
    crop_context_tiles,
    foreground_per_batch,
    make_grid,
    oversampled_tiles,
)
from ichseg.errors import ConfigError
from ichseg.lit.datamodule import CTICHDataModule

SMALL = {
    "working_size": 64,
    "tile_size": 16,
    "tile_stride": 8,
    "exclude": (),
    "batch_size": 12,
    "k": 3,
}
CHANNELS = ("brain", "subdural", "bone")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("phantom")
    return generate_phantom(
        base / "ct-ich", "nifti", n_patients=9, n_slices=6, size=64, seed=0
    ).root


def make(root, **kwargs) -> CTICHDataModule:
    module = CTICHDataModule(root, **{**SMALL, **kwargs})
    module.setup("fit")
    return module


# --------------------------------------------------------------------------- context rows


def test_context_rows_clamp_at_each_volume_end():
    # two patients: rows 0-3 and 4-6
    first = np.array([0, 0, 0, 0, 4, 4, 4])
    last = np.array([3, 3, 3, 3, 6, 6, 6])
    rows = np.arange(7)
    expected = [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3], [4, 4, 5], [4, 5, 6], [5, 6, 6]]
    assert context_rows(rows, 1, first, last).tolist() == expected
    assert context_rows(np.array([1]), 2, 0, 3).tolist() == [[0, 0, 1, 2, 3]]
    assert context_rows(rows, 0, first, last).tolist() == rows[:, None].tolist()
    with pytest.raises(ConfigError, match="context_slices"):
        context_rows(rows, -1, first, last)


def test_context_windows_stack_the_neighbours_slice_major():
    rng = np.random.default_rng(0)
    slices = rng.integers(0, 255, size=(5, 2, 12, 12), dtype=np.uint8)
    grid = make_grid(12, 6, 3)
    windows = np.array([[0, 0], [2, 8], [4, 5]])
    neighbours = context_rows(windows[:, 0], 1, 0, 4)
    crops = crop_context_tiles(slices, windows, neighbours, grid)
    assert crops.shape == (3, 6, 6, 6)
    for i, position in enumerate(windows[:, 1]):
        r, c = grid.corners[position]
        for j, source in enumerate(neighbours[i]):
            np.testing.assert_array_equal(
                crops[i, 2 * j : 2 * j + 2], slices[source, :, r : r + 6, c : c + 6]
            )


def test_store_context_stays_within_each_patient(root):
    module = make(root, channels=CHANNELS, context_slices=2)
    store = module.store
    rows = np.arange(len(store))
    neighbours = store.context_rows(rows, 2)
    assert neighbours.shape == (len(store), 5)
    assert (store.patients[neighbours] == store.patients[rows, None]).all()
    # inside a volume: s - 2 .. s + 2; slice numbers are clamped to 1 .. n at the ends
    numbers = store.slice_numbers[neighbours]
    expected = np.clip(store.slice_numbers[:, None] + np.arange(-2, 3), 1, 6)
    np.testing.assert_array_equal(numbers, expected)


# --------------------------------------------------------------------------- 2.5D batches


def test_context_batches_are_the_store_windows_of_the_neighbours(root):
    module = make(root, channels=CHANNELS, context_slices=1)
    assert module.in_channels == 9
    store, grid = module.store, module.grid
    assert (
        store.images.shape[1] == 3
    )  # the store holds each slice once; context is index arithmetic
    batch = next(iter(module.val_dataloader()))
    assert batch["image"].shape[1:] == (9, 16, 16)
    for i in range(len(batch["window"])):
        patient, number = int(batch["patient"][i]), int(batch["slice"][i])
        patient_rows = store.rows_of(patient)
        row = patient_rows.start + number - 1
        r, c = grid.corners[int(batch["window"][i])]
        for j, offset in enumerate((-1, 0, 1)):
            source = min(max(row + offset, patient_rows.start), patient_rows.stop - 1)
            expected = store.images[source, :, r : r + 16, c : c + 16] / 255.0
            np.testing.assert_allclose(
                batch["image"][i, 3 * j : 3 * j + 3].numpy(), expected, atol=1e-6
            )
        mask = store.mask_slices(row)[r : r + 16, c : c + 16]
        np.testing.assert_array_equal(batch["mask"][i, 0].numpy(), mask)


def test_context_with_augmentation_and_full_slices(root):
    module = make(root, channels=("brain", "bone"), context_slices=1, augmentation={})
    batch = next(iter(module.train_dataloader()))
    assert (
        batch["image"].shape == (12, 6, 16, 16)
        and 0 <= batch["image"].min() <= batch["image"].max() <= 1
    )
    full = make(root, mode="full_slice", context_slices=1, batch_size=2)
    batch = next(iter(full.val_dataloader()))
    rows = [
        full.store.rows_of(int(p)).start + int(s) - 1
        for p, s in zip(batch["patient"], batch["slice"], strict=True)
    ]
    expected = full.store.context_images(np.array(rows), 1) / 255.0
    assert batch["image"].shape == (2, 3, 64, 64)
    np.testing.assert_allclose(batch["image"].numpy(), expected, atol=1e-6)


# --------------------------------------------------------------------------- oversampling


def test_foreground_per_batch():
    assert foreground_per_batch(32, 0.33) == 11
    assert foreground_per_batch(16, 0.33) == 5
    assert foreground_per_batch(2, 0.33) == 1  # at least one
    assert foreground_per_batch(8, 0.0) == 0 and foreground_per_batch(8, 1.0) == 8
    with pytest.raises(ConfigError, match="foreground_fraction"):
        foreground_per_batch(8, 1.5)


def test_every_batch_holds_the_fixed_share_and_every_positive_once():
    rng = np.random.default_rng(1)
    counts = np.where(rng.random((40, 9)) < 0.1, rng.integers(1, 50, size=(40, 9)), 0)
    positives = np.flatnonzero(counts.reshape(-1) > 0)
    windows = oversampled_tiles(counts, 12, 0.33, np.random.default_rng(5))
    n_batches = -(-positives.size // 4)
    assert windows.shape == (n_batches * 12, 2)
    is_positive = counts[windows[:, 0], windows[:, 1]] > 0
    assert (is_positive.reshape(n_batches, 12).sum(axis=1) == 4).all()
    ids = windows[:, 0] * 9 + windows[:, 1]
    assert set(positives.tolist()) == set(ids[is_positive].tolist())
    negatives = ids[~is_positive]
    assert len(set(negatives.tolist())) == negatives.size  # without replacement while enough exist
    # the positives are not always in the same batch slots
    assert is_positive.reshape(n_batches, 12).argmax(axis=1).std() > 0
    fixed = oversampled_tiles(counts, 12, 0.33, np.random.default_rng(5), n_batches=3)
    assert fixed.shape == (36, 2)


def test_oversampling_sampler_is_seeded_per_epoch(root):
    module = make(root, sampling="oversample", foreground_fraction=0.33, augmentation=None)
    dataset, sampler = module.train_dataset()
    assert isinstance(sampler, OversampledTileSampler)
    assert sampler.per_batch == 4 and len(sampler) % 12 == 0
    epoch0, epoch1 = sampler.epoch_indices(0), sampler.epoch_indices(1)
    assert len(epoch0) == len(epoch1) == len(sampler)
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(epoch0, module.train_dataset()[1].epoch_indices(0))
    sampler.set_epoch(1)
    assert list(sampler) == epoch1.tolist()
    # through the loader, every batch holds exactly 4 windows with ICH
    for batch in module.train_dataloader():
        assert int((batch["mask"].flatten(1).sum(1) > 0).sum()) == 4
    counts = module.tile_counts("train")
    assert len(sampler) == 12 * -(-int((counts > 0).sum()) // 4)


def test_oversampling_full_slices_draws_from_every_slice(root):
    module = make(root, mode="full_slice", sampling="oversample", batch_size=4,
                  foreground_fraction=0.5, augmentation=None)  # fmt: skip
    _, sampler = module.train_dataset()
    indices = sampler.epoch_indices(0).reshape(-1, 4)
    counts = module.tile_counts("train")[:, 0]
    assert ((counts[indices] > 0).sum(axis=1) == 2).all()
    assert (counts[indices] == 0).any()  # ICH-free slices are trained too
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64)


def test_bad_recipe_options(root):
    with pytest.raises(ConfigError, match="context_slices"):
        CTICHDataModule(root, context_slices=-1)
    with pytest.raises(ConfigError, match="foreground_fraction"):
        CTICHDataModule(root, sampling="oversample", foreground_fraction=2.0)
    with pytest.raises(ConfigError, match="oversample"):
        CTICHDataModule(root, sampling="upsample")
    with pytest.raises(ConfigError, match="batches_per_epoch"):
        CTICHDataModule(root, batches_per_epoch=0)


def test_batches_are_float_tensors(root):
    module = make(root, channels=CHANNELS, context_slices=1, sampling="oversample")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].is_contiguous()
