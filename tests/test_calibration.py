"""Temperature scaling, the expected calibration error and the reliability diagram, by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest

from ichseg.eval.calibration import (
    PixelSample,
    apply_temperature,
    calibrated_threshold,
    calibration_summary,
    check_temperature,
    expected_calibration_error,
    fit_temperature,
    image_tensor,
    pixel_sample,
    reliability_bins,
    reliability_diagram,
    save_png,
)


def test_a_perfectly_calibrated_set_has_zero_ece():
    # 0.25: one of four pixels is ICH; 0.75: three of four
    p = np.array([0.25] * 4 + [0.75] * 4)
    t = np.array([1, 0, 0, 0, 1, 1, 1, 0], dtype=bool)
    assert expected_calibration_error(p, t, bins=15) == pytest.approx(0.0, abs=1e-7)


def test_ece_of_a_two_bin_case_is_the_hand_value():
    # bin [0, 0.5): confidence 0.2, accuracy 1/2 -> |0.3| x 1/2; bin [0.5, 1]: 0.8 vs 1 -> 0.2 x 1/2
    p = np.array([0.2, 0.2, 0.8, 0.8])
    t = np.array([0, 1, 1, 1], dtype=bool)
    assert expected_calibration_error(p, t, bins=2) == pytest.approx(0.25, abs=1e-6)
    confidence, accuracy, counts = reliability_bins(p, t, bins=2)
    np.testing.assert_allclose(confidence, [0.2, 0.8])
    np.testing.assert_allclose(accuracy, [0.5, 1.0])
    assert counts.tolist() == [2, 2]
    # the diagram's bins give torchmetrics' number
    rng = np.random.default_rng(0)
    p, t = rng.random(5000) * 0.999, rng.random(5000) < 0.3
    confidence, accuracy, counts = reliability_bins(p, t, 15)
    filled = counts > 0
    by_hand = np.sum(counts[filled] / counts.sum() * np.abs(accuracy - confidence)[filled])
    assert expected_calibration_error(p, t, 15) == pytest.approx(by_hand, abs=1e-5)


def test_the_temperature_of_an_over_confident_model_is_recovered():
    """targets ~ Bernoulli(sigmoid(z)) but the model reports sigmoid(2 z): T = 2."""
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 2.0, 200_000)
    targets = rng.random(z.size) < 1.0 / (1.0 + np.exp(-z))
    reported = 1.0 / (1.0 + np.exp(-2.0 * z))
    temperature = fit_temperature(reported, targets)
    assert temperature == pytest.approx(2.0, abs=0.05)
    calibrated = apply_temperature(reported, temperature)
    before = expected_calibration_error(reported, targets)
    after = expected_calibration_error(calibrated, targets)
    assert before > 0.05 and after < 0.01
    # an under-confident model (sigmoid(z / 2)) gets T = 1/2
    assert fit_temperature(1.0 / (1.0 + np.exp(-z / 2)), targets) == pytest.approx(0.5, abs=0.02)
    # one class only: nothing to fit
    assert fit_temperature(reported, np.zeros(z.size, bool)) == 1.0


def test_apply_temperature_is_the_identity_at_one_and_monotonic():
    p = np.array([[0.0, 0.1], [0.5, 0.97]], dtype=np.float32)
    assert apply_temperature(p, 1.0) is p  # unchanged
    scaled = apply_temperature(p, 2.0)
    assert scaled.dtype == np.float32 and scaled.shape == p.shape
    assert scaled[1, 0] == pytest.approx(0.5)
    # sigmoid(logit(0.97) / 2) by hand
    assert scaled[1, 1] == pytest.approx(1 / (1 + np.sqrt(0.03 / 0.97)), rel=1e-6)
    grid = np.linspace(0.0, 1.0, 10_001, dtype=np.float32)
    for temperature in (0.3, 2.0, 7.5):
        assert np.all(np.diff(apply_temperature(grid, temperature)) >= 0)
        # a threshold on raw probabilities selects what its image selects on calibrated ones
        for t in (0.3, 0.45, 0.5, 0.7):
            level = np.float32(calibrated_threshold(t, temperature))
            np.testing.assert_array_equal(
                grid > np.float32(t), apply_temperature(grid, temperature) > level
            )
    back = apply_temperature(apply_temperature(grid[1:-1], 2.5), 1 / 2.5)
    np.testing.assert_allclose(back, np.clip(grid[1:-1], 1e-6, 1 - 1e-6), atol=2e-6)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="temperature"):
            check_temperature(bad)


def test_pixel_samples_are_seeded_and_bounded():
    rng = np.random.default_rng(2)
    p, t = rng.random((4, 50, 50)).astype(np.float32), rng.random((4, 50, 50)) < 0.1
    small_p, small_t = pixel_sample(p, t, max_pixels=1000, seed=5)
    assert small_p.shape == (1000,) and small_t.dtype == bool
    again_p, _ = pixel_sample(p, t, max_pixels=1000, seed=5)
    np.testing.assert_array_equal(small_p, again_p)
    # the pairs stay together: each sampled probability sits at a pixel with that target
    flat_p, flat_t = p.reshape(-1), t.reshape(-1)
    where = np.searchsorted(np.sort(flat_p), small_p)
    order = np.argsort(flat_p)
    np.testing.assert_array_equal(flat_t[order[where]], small_t)
    all_p, _ = pixel_sample(p, t, max_pixels=10**6)
    np.testing.assert_array_equal(all_p, p.reshape(-1))
    # a PixelSample draws each scan by its key, whatever the order or the process
    first, second = PixelSample(per_scan=300), PixelSample(per_scan=300)
    first.add(49, p[0], t[0])
    first.add(50, p[1], t[1])
    other = PixelSample(per_scan=300)
    other.add(50, p[1], t[1])
    second.add(49, p[0], t[0])
    second.merge([other])
    assert len(first) == len(second) == 600
    for a, b in zip(first.arrays(), second.arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.arrays(max_pixels=100)[0].shape == (100,)


def test_the_summary_and_the_diagram():
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 2.0, 50_000)
    targets = rng.random(z.size) < 1.0 / (1.0 + np.exp(-z))
    calibrated = apply_temperature(1.0 / (1.0 + np.exp(-2.0 * z)), 2.0)  # what the predictor gives
    summary = calibration_summary(calibrated, targets, 2.0)
    assert summary["pixels"] == z.size and summary["bins"] == 15
    assert summary["ece_before"] > 0.05 > 0.01 > summary["ece_after"]
    raw = apply_temperature(calibrated, 0.5)
    image = reliability_diagram(raw, calibrated, targets, temperature=2.0)
    assert image.mode == "RGB" and image.size == (480, 480)
    colours = {c for _, c in image.getcolors(480 * 480)}
    assert (230, 120, 30) in colours and (40, 100, 200) in colours  # both curves are drawn
    tensor = image_tensor(image)
    assert tuple(tensor.shape) == (3, 480, 480) and str(tensor.dtype) == "torch.uint8"


def test_save_png_writes_a_png(tmp_path):
    from PIL import Image

    image = reliability_diagram([0.1, 0.9], None, [False, True])
    path = save_png(image, tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(path.read_bytes())).size == (480, 480)


def test_the_inference_spec_carries_a_positive_temperature():
    from ichseg.errors import ConfigError
    from ichseg.specs import InferenceSpec

    assert InferenceSpec().temperature == 1.0
    old = InferenceSpec().to_dict()
    del old["temperature"]  # a checkpoint written before the field existed
    assert InferenceSpec.from_dict(old).temperature == 1.0
    assert InferenceSpec(temperature=2).temperature == 2.0
    for bad in (0, -1.5, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ConfigError, match="temperature"):
            InferenceSpec(temperature=bad)
