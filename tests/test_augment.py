"""The paper's affine augmentation built with albumentations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ichseg.data.augment import PAPER_AUGMENTATION, affine_arguments, build_augmentation
from ichseg.errors import ConfigError


def _blobs(size: int = 64, seed: int = 0) -> np.ndarray:
    """A uint8 0/1 mask with a few square blobs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(4):
        row, col = rng.integers(0, size - 12, 2)
        mask[row : row + rng.integers(4, 12), col : col + rng.integers(4, 12)] = 1
    return mask


def test_off_returns_none() -> None:
    assert build_augmentation(None) is None
    assert build_augmentation(False) is None


def test_paper_defaults() -> None:
    augmentation = build_augmentation({})
    transform = augmentation.transform
    assert transform.rotate == (-20.0, 20.0)
    assert transform.scale == {"x": (0.8, 1.2), "y": (0.8, 1.2)}
    assert transform.shear["x"] == (-5.73, 5.73) and transform.shear["y"] == (0.0, 0.0)
    assert transform.border_mode == cv2.BORDER_REPLICATE
    assert transform.mask_interpolation == cv2.INTER_NEAREST
    assert transform.p == 1.0
    assert build_augmentation(True).options == build_augmentation({}).options
    assert PAPER_AUGMENTATION["border_mode"] == "replicate"
    assert augmentation.transform.translate_percent == {"x": (-0.1, 0.1), "y": (-0.1, 0.1)}


def test_keras_like_magnitudes_become_symmetric_ranges() -> None:
    arguments = affine_arguments({"rotate": 10, "translate": 0.2, "shear": 3, "scale": 0.1})
    assert arguments["rotate"] == (-10.0, 10.0)
    assert arguments["translate_percent"] == {"x": (-0.2, 0.2), "y": (-0.2, 0.2)}
    assert arguments["shear"] == {"x": (-3.0, 3.0), "y": (0.0, 0.0)}
    assert arguments["scale"] == (0.9, 1.1)
    # other Affine arguments pass through
    assert build_augmentation({"keep_ratio": True}).transform.keep_ratio is True


def test_unknown_or_invalid_option_raises() -> None:
    with pytest.raises(ConfigError, match="rotat"):
        build_augmentation({"rotat": 10})
    with pytest.raises(ConfigError, match="border_mode"):
        build_augmentation({"border_mode": "mirror"})
    with pytest.raises(ConfigError, match="invalid augmentation options"):
        build_augmentation({"p": 3.0})
    with pytest.raises(ConfigError, match="low > high"):
        build_augmentation({"scale": [1.2, 0.8]})
    with pytest.raises(ConfigError, match="give one"):
        build_augmentation({"translate": 0.1, "translate_percent": 0.1})


def test_options_override_and_accept_list_values() -> None:
    augmentation = build_augmentation({"rotate": [-5, 5], "interpolation": "nearest"})
    assert augmentation.transform.rotate == (-5.0, 5.0)
    assert augmentation.transform.interpolation == cv2.INTER_NEAREST


@pytest.mark.parametrize(
    "shape, dtype", [((64, 64, 1), np.uint8), ((64, 64, 3), np.float32), ((64, 64), np.uint8)]
)
def test_shapes_dtypes_and_binary_masks(shape, dtype) -> None:
    augmentation = build_augmentation({})
    augmentation.reseed(0)
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    if dtype == np.uint8:
        image = (image * 255).astype(np.uint8)
    for seed in range(10):
        mask = _blobs(seed=seed)
        out_image, out_mask = augmentation(image, mask)
        assert out_image.shape == image.shape and out_image.dtype == image.dtype
        assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= {0, 1}


def test_image_and_mask_stay_aligned() -> None:
    augmentation = build_augmentation({"interpolation": "nearest"})
    augmentation.reseed(1)
    changed = 0
    for seed in range(20):
        mask = _blobs(seed=seed)
        image = (mask * 255)[:, :, None].copy()
        out_image, out_mask = augmentation(image, mask)
        np.testing.assert_array_equal(out_image[:, :, 0] // 255, out_mask)
        changed += not np.array_equal(out_mask, mask)
    assert changed >= 18  # the transform does something


def test_linear_image_agrees_with_mask_away_from_edges() -> None:
    augmentation = build_augmentation({})  # bilinear image, nearest mask
    augmentation.reseed(2)
    for seed in range(10):
        mask = _blobs(seed=seed)
        image = (mask * 255).astype(np.uint8)
        out_image, out_mask = augmentation(image, mask)
        # interior pixels of the bilinear image (far from any edge) are exactly 0 or 255
        solid = (out_image == 0) | (out_image == 255)
        np.testing.assert_array_equal((out_image[solid] == 255), out_mask[solid].astype(bool))


def test_matches_albumentations_affine_on_the_same_parameters() -> None:
    augmentation = build_augmentation({})
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (48, 48, 1), dtype=np.uint8)
    mask = _blobs(48, seed=3)
    augmentation.reseed(4)
    matrix = augmentation.sample_matrix((48, 48))
    ours_image, ours_mask = augmentation.warp(image, mask, matrix)
    params = {"matrix": np.vstack([matrix, [0, 0, 1]]), "output_shape": (48, 48)}
    np.testing.assert_array_equal(ours_image, augmentation.transform.apply(image, **params))
    np.testing.assert_array_equal(ours_mask, augmentation.transform.apply_to_mask(mask, **params))


def test_reseed_is_reproducible_and_out_buffers_are_filled() -> None:
    augmentation = build_augmentation({})
    image = np.random.default_rng(5).integers(0, 255, (32, 32, 1), dtype=np.uint8)
    mask = _blobs(32)
    augmentation.reseed(9)
    first = augmentation(image, mask)
    augmentation.reseed(9)
    out_image, out_mask = np.empty_like(image), np.empty_like(mask)
    second = augmentation(image, mask, out_image, out_mask)
    assert second[0] is out_image and second[1] is out_mask
    np.testing.assert_array_equal(first[0], out_image)
    np.testing.assert_array_equal(first[1], out_mask)


def test_empty_masks_stay_empty_unless_the_border_fills_them() -> None:
    image = np.random.default_rng(6).integers(0, 255, (32, 32, 1), dtype=np.uint8)
    empty = np.zeros((32, 32), dtype=np.uint8)
    augmentation = build_augmentation({})
    for _ in range(5):
        assert not augmentation(image, empty)[1].any()
    filled = build_augmentation(
        {"border_mode": "constant", "fill_mask": 1, "translate": [0.2, 0.3]}
    )
    assert filled(image, empty)[1].any()  # the shifted-in border is filled with 1


@pytest.mark.parametrize(
    "options", [{}, {"keep_ratio": True}, {"balanced_scale": True, "rotate": 180}]
)
def test_fast_matrix_equals_albumentations_sampling(options) -> None:
    fast = build_augmentation(options)
    reference = build_augmentation(options)
    fast.reseed(11)
    reference.reseed(11)
    for shape in [(160, 160), (64, 90)] * 10:
        ours = fast.sample_matrix(shape)
        theirs = reference.transform.get_params_dependent_on_data({"shape": shape}, {})["matrix"]
        np.testing.assert_allclose(ours, theirs[:2], rtol=0, atol=1e-9)
