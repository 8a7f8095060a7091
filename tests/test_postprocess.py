"""Threshold + closing + opening: OpenCV's semantics, scaling, numpy/torch identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichseg.errors import ConfigError
from ichseg.eval import postprocess as pp

# --------------------------------------------------------------------------- brute-force reference


def _shifted(masks: np.ndarray, dy: int, dx: int, outside: bool) -> np.ndarray:
    """``out[..., y, x] = masks[..., y + dy, x + dx]``, ``outside`` beyond the slice."""
    pad = max(abs(dy), abs(dx))
    padded = np.pad(
        masks, [(0, 0)] * (masks.ndim - 2) + [(pad, pad), (pad, pad)], constant_values=outside
    )
    height, width = masks.shape[-2:]
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def _offsets(k: int, reflected: bool) -> range:
    """OpenCV's anchor k // 2: offsets -k//2 .. k - 1 - k//2 (reflected: the negatives)."""
    a = k // 2
    return range(-(k - 1 - a), a + 1) if reflected else range(-a, k - a)


def ref_dilate(masks: np.ndarray, kh: int, kw: int, convention: str) -> np.ndarray:
    reflected = convention == "symmetric"
    shifts = [
        _shifted(masks, dy, dx, False)
        for dy in _offsets(kh, reflected)
        for dx in _offsets(kw, reflected)
    ]
    return np.any(shifts, axis=0)


def ref_erode(masks: np.ndarray, kh: int, kw: int, convention: str) -> np.ndarray:
    shifts = [
        _shifted(masks, dy, dx, True) for dy in _offsets(kh, False) for dx in _offsets(kw, False)
    ]
    return np.all(shifts, axis=0)


def random_masks(shape: tuple[int, ...], density: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


# --------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("convention", ["opencv", "symmetric"])
@pytest.mark.parametrize(
    "size", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (8, 8), (10, 10), (4, 7), (1, 6)]
)
def test_dilation_and_erosion_match_the_definition_in_numpy_and_torch(convention, size) -> None:
    masks = random_masks((3, 37, 41), 0.15, seed=sum(size))
    kh, kw = size
    expected_dilation = ref_dilate(masks, kh, kw, convention)
    expected_erosion = ref_erode(
        ~masks, kh, kw, convention
    )  # dense input, so erosion keeps something
    assert np.array_equal(pp.dilate(masks, size, convention), expected_dilation)
    assert np.array_equal(pp.erode(~masks, size, convention), expected_erosion)
    tensor = torch.from_numpy(masks)
    assert np.array_equal(pp.dilate_torch(tensor, size, convention).numpy(), expected_dilation)
    assert np.array_equal(pp.erode_torch(~tensor, size, convention).numpy(), expected_erosion)


def test_opencv_values_for_even_squares() -> None:
    """Results of OpenCV 5.0 ``cv2.morphologyEx`` with ``np.ones((k, k))`` (the authors' calls)."""
    single = np.zeros((20, 20), bool)
    single[10, 10] = True
    # closing by an even square moves a lone pixel one step down-right
    assert np.argwhere(pp.closing(single, 10)).tolist() == [[11, 11]]
    block = np.zeros((30, 30), bool)
    block[8:16, 8:16] = True
    closed = pp.closing(block, 10)
    assert closed.sum() == 64 and np.argwhere(closed).min(0).tolist() == [9, 9]
    assert np.argwhere(closed).max(0).tolist() == [16, 16]
    opened = pp.opening(block, 4)
    assert np.argwhere(opened).min(0).tolist() == [9, 9] and np.argwhere(opened).max(
        0
    ).tolist() == [16, 16]
    # an odd square moves nothing
    assert np.array_equal(pp.opening(block, 5), block)


def test_symmetric_convention_is_extensive_and_anti_extensive() -> None:
    masks = random_masks((4, 50, 50), 0.3, seed=1)
    for k in (2, 4, 5, 10):
        closed = pp.closing(masks, k, "symmetric")
        opened = pp.opening(masks, k, "symmetric")
        assert np.all(closed >= masks) and np.all(opened <= masks)
        assert np.array_equal(pp.closing(closed, k, "symmetric"), closed)  # idempotent
        assert np.array_equal(pp.opening(opened, k, "symmetric"), opened)


def test_objects_touching_the_border_are_not_eroded_by_closing() -> None:
    masks = np.zeros((1, 40, 40), bool)
    masks[0, :6, :6] = True  # corner block
    masks[0, 20:26, 34:] = True  # touches the right edge
    for convention in ("opencv", "symmetric"):
        closed = pp.closing(masks, 5, convention)
        assert np.array_equal(closed, masks)
        assert np.array_equal(
            pp.closing_torch(torch.from_numpy(masks), 5, convention).numpy(), masks
        )


def test_threshold_is_strict_and_in_the_probabilities_float_type() -> None:
    p = np.array([[0.49, 0.5, 0.500001, 1.0]], dtype=np.float32)
    assert pp.binarize(p, 0.5).tolist() == [[False, False, True, True]]
    assert pp.binarize(torch.from_numpy(p), 0.5).tolist() == [[False, False, True, True]]
    # float32(0.6) is slightly above 0.6: compared in float32 it is not above the threshold
    at = np.full((1, 4, 4), 0.6, dtype=np.float32)
    for probabilities in (at, torch.from_numpy(at)):
        assert not pp.binarize(probabilities, 0.6).any()
        assert not pp.postprocess_thresholds(probabilities, [0.6], pp.THRESHOLD_ONLY).any()


def test_stack_is_processed_slice_by_slice() -> None:
    masks = random_masks((5, 48, 48), 0.2, seed=2)
    masks[1] = False  # empty and full slices are skipped: they stay as they are
    masks[3] = True
    config = pp.PostprocessConfig()
    stacked = pp.morphology(masks, config)
    assert np.array_equal(stacked, np.stack([pp.opening(pp.closing(m, 10), 5) for m in masks]))
    assert not stacked[1].any() and stacked[3].all()
    assert np.array_equal(pp.morphology(masks, config, backend="torch"), stacked)
    with pytest.raises(ConfigError):
        pp.morphology(masks, config, backend="cupy")


# --------------------------------------------------------------------------- sizes and config


def test_sizes_scale_with_the_pixel_size() -> None:
    scale = pp.pixel_scale((512, 512), 640, "resize")
    assert scale == (0.8, 0.8)
    assert pp.scaled_size(10, scale) == (8, 8) and pp.scaled_size(5, scale) == (4, 4)
    assert pp.pixel_scale((650, 650), 640, "crop") == (1.0, 1.0)
    assert pp.scaled_size(5, 0.5) == (3, 3)  # 2.5 rounds half up
    assert pp.scaled_size(5, 0.3) == (2, 2)  # 1.5 -> 2
    assert pp.scaled_size(10, (0.8, 0.5)) == (8, 5)
    assert pp.scaled_size(3, 0.1) == (1, 1)
    assert pp.PostprocessConfig().steps(1.0) == [("close", (10, 10)), ("open", (5, 5))]
    assert pp.PostprocessConfig().steps(0.8) == [("close", (8, 8)), ("open", (4, 4))]
    assert pp.PostprocessConfig().steps(0.1) == []  # both scale to 1: skipped
    assert pp.PostprocessConfig(order="open-close").steps() == [
        ("open", (5, 5)),
        ("close", (10, 10)),
    ]
    assert pp.PostprocessConfig(closing_size=1, opening_size=0).steps() == []
    with pytest.raises(ConfigError):
        pp.PostprocessConfig(order="close-close")
    with pytest.raises(ConfigError):
        pp.PostprocessConfig(convention="skimage")
    with pytest.raises(ConfigError):
        pp.pixel_scale((512, 512), mode="pad")


def test_postprocess_applies_threshold_then_closing_then_opening() -> None:
    probabilities = np.random.default_rng(3).random((2, 64, 64)).astype(np.float32)
    config = pp.PostprocessConfig(threshold=0.8, closing_size=10, opening_size=5)
    expected = pp.opening(pp.closing(probabilities > 0.8, 10), 5)
    assert np.array_equal(pp.postprocess(probabilities, config), expected)
    # at 512 the squares are 8 and 4
    assert np.array_equal(
        pp.postprocess(probabilities, config, scale=0.8),
        pp.opening(pp.closing(probabilities > 0.8, 8), 4),
    )
    reverse = pp.PostprocessConfig(threshold=0.8, order="open-close")
    assert np.array_equal(
        pp.postprocess(probabilities, reverse), pp.closing(pp.opening(probabilities > 0.8, 5), 10)
    )
    assert np.array_equal(pp.postprocess(probabilities, pp.THRESHOLD_ONLY), probabilities > 0.5)


@pytest.mark.parametrize(
    "config",
    [
        pp.PostprocessConfig(),
        pp.PostprocessConfig(threshold=0.3, convention="symmetric"),
        pp.PostprocessConfig(threshold=0.6, closing_size=7, opening_size=4, order="open-close"),
    ],
)
@pytest.mark.parametrize("scale", [1.0, 0.8, (0.8, 1.3)])
def test_numpy_and_torch_give_identical_masks(config, scale) -> None:
    rng = np.random.default_rng(4)
    # blobby probability maps: smoothed noise, so the morphology has work to do
    noise = rng.random((3, 80, 96)).astype(np.float32)
    probabilities = (
        noise + np.roll(noise, 1, 1) + np.roll(noise, 1, 2) + np.roll(noise, (2, 2), (1, 2))
    ) / 4
    expected = pp.postprocess(probabilities, config, scale)
    result = pp.postprocess(torch.from_numpy(probabilities), config, scale, backend="torch")
    assert isinstance(result, torch.Tensor) and result.dtype == torch.bool
    assert np.array_equal(result.numpy(), expected)
    # a CPU tensor goes through scipy under "auto", numpy through torch when asked: same masks
    auto = pp.postprocess(torch.from_numpy(probabilities), config, scale)
    assert isinstance(auto, torch.Tensor) and np.array_equal(auto.numpy(), expected)
    assert np.array_equal(pp.postprocess(probabilities, config, scale, backend="torch"), expected)
    thresholds = [0.4, 0.5, 0.6]
    stacked = pp.postprocess_thresholds(probabilities, thresholds, config, scale)
    assert stacked.shape == (3, *probabilities.shape)
    for t, level in enumerate(thresholds):
        assert np.array_equal(
            stacked[t], pp.postprocess(probabilities, config.with_threshold(level), scale)
        )
    stacked_torch = pp.postprocess_thresholds(
        torch.from_numpy(probabilities), thresholds, config, scale, backend="torch"
    )
    assert np.array_equal(stacked_torch.numpy(), stacked)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_on_cuda_matches_scipy() -> None:
    probabilities = np.random.default_rng(5).random((4, 128, 128)).astype(np.float32)
    expected = pp.postprocess(probabilities, pp.PAPER, 0.8)
    result = pp.postprocess(torch.from_numpy(probabilities).cuda(), pp.PAPER, 0.8)
    assert np.array_equal(result.cpu().numpy(), expected)


#: ``np.packbits`` of OpenCV 5.0's ``morphologyEx(CLOSE, ones((kc, kc)))`` then
#: ``morphologyEx(OPEN, ones((ko, ko)))``, slice by slice, on
#: ``np.random.default_rng(7).random((2, 32, 32)) < 0.04``.
OPENCV_RESULTS = {
    (10, 5): (
        "ff001fffff001fffff001fffff001fffff001fffff001fffff001fffffffff00ffffff00ffffff00ffffff00ffffff00"
        "ffffff0001ffff0001ffff0001ffff0001ffff0001ffff0001ffff0001ffff0001ffff0001ffff0001ffff0001ffff00"
        "01ffffff01ffffff01ffffff01ffffffffffffffffffffffffffffffffffffff007fffe0007fffe0007fffe0007fff80"
        "000fff80000fff80000fff80000fff80000fff80000fff80000fff80000fff80000fff80000fff80000fffff000ffffff"
        "ffffffffffffffffffffffffffffffffffffffffffffffffff800fffff800fffff80000fff80000fff80000fff80000f"
        "ff80000fff80000fff80000fff80000"
    ),
    (8, 4): (
        "ff800ff8ff800ff8ff800ff8ff800ff8ff800ff8ff800ff8ff800ff8ff800ff8ffe00000ffe00000ffe00000ffe00000"
        "ffe00000ffe00000000000000000000000000000000000000000000000fc000000fc000000fc000000fc000000fc0000"
        "00fc000000fc01ff00fc01ff00fc01ff00fc01ffffffffffffffffffffffffff003fc000003fc000003fc000003fc000"
        "003fc000000000000000000000007fc000007fc000007fc000007fc000007fc000007fc00007ffc00007ffc00007ffff"
        "0007ffff0007ffff0007ffff00001fff00001fff00001fffff801fffff80007fff80007fff800000ff800000ff800000"
        "ff800000ff800000ff800000ff800000"
    ),
}


@pytest.mark.parametrize("sizes", sorted(OPENCV_RESULTS))
def test_matches_recorded_opencv_results(sizes) -> None:
    masks = np.random.default_rng(7).random((2, 32, 32)) < 0.04
    expected = np.unpackbits(np.frombuffer(bytes.fromhex(OPENCV_RESULTS[sizes]), np.uint8)).astype(
        bool
    )
    expected = expected.reshape(masks.shape)
    config = pp.PostprocessConfig(closing_size=sizes[0], opening_size=sizes[1])
    assert np.array_equal(pp.morphology(masks, config), expected)
    assert np.array_equal(pp.morphology(torch.from_numpy(masks), config, backend="torch"), expected)
