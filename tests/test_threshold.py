"""The threshold baseline's band search: exact grid search (= the naive one, ties included), the
histograms, and the band found on the phantom's bleeds (ichseg.baselines.threshold)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ichseg.baselines.threshold import (
    OBJECTIVES,
    IntensityHistograms,
    fit_thresholds,
    level_counts,
    naive_threshold_search,
    objective_surface,
    search_thresholds,
)
from ichseg.data.ctich import open_dataset
from ichseg.data.phantom import generate_phantom
from ichseg.errors import ConfigError, DatasetError


def random_slices(
    seed: int, n: int = 6, size: int = 10, low: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Small random slices whose ICH pixels are brighter on average; some slices without ICH."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < 0.2
    masks[rng.random(n) < 0.3] = False
    masks[0, 0, 0] = True  # at least one ICH slice
    bright = rng.integers(max(low, 120), 256, (n, size, size))
    anything = rng.integers(low, 256, (n, size, size))
    return np.where(masks, bright, anything).astype(np.uint8), masks


def assert_same_search(fast, naive) -> None:
    assert (fast.lower, fast.upper) == (naive.lower, naive.upper)
    assert fast.value == naive.value  # both the exact value rounded once
    np.testing.assert_allclose(fast.surface, naive.surface, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- histograms


def test_level_counts_equals_bincount():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in [(5, 7), (6, 6), (1, 1), (3, 1), (64, 64)]
    ]
    images.append(np.zeros((8, 8), np.uint8))
    framed = rng.integers(0, 256, (9, 9), dtype=np.uint8)
    framed[:3] = 0
    framed[-2:] = 0
    images += [framed, rng.integers(0, 256, (20, 21), dtype=np.uint8)[:, ::2]]  # and not contiguous
    for image in images:
        np.testing.assert_array_equal(
            level_counts(image), np.bincount(image.ravel(), minlength=256)
        )


def test_histograms_count_inside_and_outside():
    images, masks = random_slices(1)
    histograms = IntensityHistograms.from_slices(images, masks)
    for i in range(len(images)):
        np.testing.assert_array_equal(
            histograms.inside[i], np.bincount(images[i][masks[i]], minlength=256)
        )
        np.testing.assert_array_equal(
            histograms.outside[i], np.bincount(images[i][~masks[i]], minlength=256)
        )
    has_ich = masks.any(axis=(1, 2))
    only_ich = IntensityHistograms.from_ich_masks(images, masks[has_ich], has_ich)
    np.testing.assert_array_equal(only_ich.inside, histograms.inside)
    with pytest.raises(ConfigError, match="ICH masks"):
        IntensityHistograms.from_ich_masks(images, masks, has_ich)
    with pytest.raises(ConfigError, match="uint8"):
        IntensityHistograms.from_slices(images.astype(np.float32), masks)


# --------------------------------------------------------------------------- the search


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_search_equals_naive_on_the_paper_grid(objective, seed):
    images, masks = random_slices(seed)
    fast = fit_thresholds(images, masks, objective=objective)
    naive = naive_threshold_search(images, masks, objective=objective)
    assert_same_search(fast, naive)
    assert fast.surface.shape == (111, 46) and fast.lowers[0] == 100 and fast.uppers[-1] == 255
    assert fast.n_slices == len(images) and fast.n_ich_slices == int(masks.any(axis=(1, 2)).sum())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fast_search_equals_naive_with_empty_bands_and_plateaus(objective):
    # few distinct values: many pairs tie exactly; lower > upper pairs predict nothing
    rng = np.random.default_rng(5)
    images = rng.choice(np.array([3, 9, 17, 30, 41], np.uint8), size=(5, 6, 6))
    masks = (images >= 17) & (rng.random((5, 6, 6)) < 0.7)
    fast = fit_thresholds(images, masks, (0, 40), (20, 45), objective)
    naive = naive_threshold_search(images, masks, (0, 40), (20, 45), objective)
    assert_same_search(fast, naive)
    assert (fast.surface[fast.lowers > 45] == 0).all()  # bands with lower > upper are empty


def tie_slices() -> tuple[np.ndarray, np.ndarray]:
    """Three 40-pixel slices where bands (10, 20) and (11, 20) tie EXACTLY (mean Jaccard 1/5) but
    a float sum in slice order favours (11, 20): per-slice Jaccards (3, 2, 1)/10 against
    (1, 2, 3)/10, and (0.1 + 0.2) + 0.3 > (0.3 + 0.2) + 0.1 in floating point."""
    # (value, in mask, count); 255 outside the mask is outside every band: padding
    slices = [
        [(10, True, 2), (15, True, 1), (0, True, 7)],  # J(10,20) = 3/10, J(11,20) = 1/10
        [(15, True, 2), (0, True, 8)],  # 2/10 for both
        [(15, True, 3), (0, True, 7), (10, False, 20)],  # 3/30 = 1/10, then 3/10
    ]
    images = np.full((3, 1, 40), 255, np.uint8)
    masks = np.zeros((3, 1, 40), bool)
    for i, runs in enumerate(slices):
        position = 0
        for value, inside, count in runs:
            images[i, 0, position : position + count] = value
            masks[i, 0, position : position + count] = inside
            position += count
    return images, masks


def test_ties_are_exact_and_go_to_the_first_pair():
    images, masks = tie_slices()
    fast = fit_thresholds(images, masks, (10, 11), (20, 20), "slice_mean")
    naive = naive_threshold_search(images, masks, (10, 11), (20, 20), "slice_mean")
    assert (fast.lower, fast.upper) == (naive.lower, naive.upper) == (10, 20)
    assert fast.value == naive.value == 0.2
    # the trap is real: summed in slice order, the floats differ
    assert (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1
    # plateau: bins 12..19 hold nothing, so (10, 20) ... (10, 25) all tie; the first wins
    wide = fit_thresholds(images, masks, (10, 11), (20, 25), "slice_mean")
    assert (wide.lower, wide.upper) == (10, 20)
    assert np.all(wide.surface[0] == wide.surface[0, 0])


def test_chunking_does_not_change_the_result():
    images, masks = random_slices(7, n=12)
    histograms = IntensityHistograms.from_slices(images, masks)
    one = search_thresholds(histograms, chunk_slices=1)
    many = search_thresholds(histograms, chunk_slices=1000)
    assert (one.lower, one.upper, one.value) == (many.lower, many.upper, many.value)
    np.testing.assert_allclose(one.surface, many.surface, rtol=1e-13)


def test_slice_mean_ignores_slices_without_ich_and_pooled_counts_them():
    images, masks = random_slices(3)
    clean = np.full((1, *images.shape[1:]), 200, np.uint8)  # an ICH-free slice, all 200
    more_images = np.concatenate([images, clean])
    more_masks = np.concatenate([masks, np.zeros_like(clean, bool)])
    base = objective_surface(IntensityHistograms.from_slices(images, masks))
    more = objective_surface(IntensityHistograms.from_slices(more_images, more_masks))
    np.testing.assert_array_equal(base, more)
    pooled = objective_surface(IntensityHistograms.from_slices(images, masks), objective="pooled")
    pooled_more = objective_surface(
        IntensityHistograms.from_slices(more_images, more_masks), objective="pooled"
    )
    holds_200 = np.arange(100, 211) <= 200  # lower thresholds of the bands that contain 200
    assert (pooled_more[holds_200] < pooled[holds_200]).all()  # false positives
    np.testing.assert_array_equal(pooled_more[~holds_200], pooled[~holds_200])


def test_bad_inputs_raise_clear_errors():
    images, masks = random_slices(0)
    with pytest.raises(DatasetError, match="no"):
        fit_thresholds(images, np.zeros_like(masks))
    with pytest.raises(ConfigError, match="objective"):
        fit_thresholds(images, masks, objective="dice")
    with pytest.raises(ConfigError, match="lower_range"):
        fit_thresholds(images, masks, lower_range=(200, 100))
    with pytest.raises(ConfigError, match="upper_range"):
        fit_thresholds(images, masks, upper_range=(210, 256))


# --------------------------------------------------------------------------- the phantom


@pytest.fixture(scope="module")
def phantom_slices(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain-window slices, masks and HU of a small 256x256 phantom (8 patients of 8 slices)."""
    root = tmp_path_factory.mktemp("threshold-phantom") / "ct-ich"
    generate_phantom(root, "nifti", n_patients=8, n_slices=8, size=256, seed=0)
    dataset = open_dataset(root)
    images, masks, hu = [], [], []
    for patient in dataset.patient_ids:
        scan = dataset.load(patient)
        images.append(scan.windowed(("brain",))[:, 0])
        masks.append(scan.mask_slices())
        hu.append(np.moveaxis(scan.image, 2, 0))
    return np.concatenate(images), np.concatenate(masks), np.concatenate(hu)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_band_found_on_the_phantom_holds_its_bleeds(phantom_slices, objective):
    images, masks, hu = phantom_slices
    search = fit_thresholds(images, masks, objective=objective)
    # bleeds are 50-90 HU (brain window 149-234); the skull's partial-volume rim brightens some
    bleed = images[masks & (hu >= 50) & (hu <= 90)]
    assert bleed.size > 1000
    assert 149 - 10 <= search.lower <= np.median(bleed) <= search.upper < 255  # not bone (255)
    assert ((bleed >= search.lower) & (bleed <= search.upper)).mean() > 0.6  # most of them
    brain = images[~masks & (hu >= 20) & (hu <= 45)]  # grey and white matter: outside the band
    assert ((brain >= search.lower) & (brain <= search.upper)).mean() < 0.01


def test_the_search_imports_numpy_only():
    code = (
        "import sys, ichseg.baselines.threshold; "
        "print([m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'pytorch_lightning', 'lightning', 'hydra', 'omegaconf')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
