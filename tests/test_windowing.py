"""HU windowing presets, the int16 look-up path, channel stacking and the working-size
resampling.
"""

import numpy as np
import pytest

from ichseg.data.windowing import (
    WINDOWS,
    Window,
    apply_window,
    from_working_size,
    get_window,
    stack_windows,
    to_working_size,
    uint8_to_unit,
)
from ichseg.errors import ConfigError


def test_presets_match_the_paper_and_dataset():
    assert WINDOWS["brain"] == Window(40, 120)
    assert WINDOWS["bone"] == Window(700, 3200)
    assert WINDOWS["subdural"] == Window(80, 200)
    assert (WINDOWS["brain"].low, WINDOWS["brain"].high) == (-20, 100)


def test_brain_window_hand_computed_values():
    hu = np.array([-1000, -20, 40, 100, 1500], dtype=np.int16)
    np.testing.assert_array_equal(apply_window(hu, "brain", np.uint8), [0, 0, 128, 255, 255])
    np.testing.assert_allclose(apply_window(hu, "brain"), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_lookup_table_equals_direct_formula_for_every_int16():
    hu = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)
    for name, window in WINDOWS.items():
        expected = np.clip((hu.astype(np.float64) - window.low) / window.width, 0, 1)
        np.testing.assert_array_equal(
            apply_window(hu, name, np.uint8), np.rint(expected * 255).astype(np.uint8), err_msg=name
        )
        np.testing.assert_allclose(apply_window(hu, name, np.float32), expected, atol=1e-7)
        # float input goes through the direct path and agrees
        np.testing.assert_allclose(
            apply_window(hu.astype(np.float32), name, np.float32), expected, atol=1e-6
        )


def test_stack_windows_puts_channels_first():
    hu = np.random.default_rng(0).integers(-1000, 2000, size=(8, 9, 3)).astype(np.int16)
    stacked = stack_windows(hu, ("brain", "bone", "subdural"), np.uint8)
    assert stacked.shape == (3, 8, 9, 3)
    np.testing.assert_array_equal(stacked[1], apply_window(hu, "bone", np.uint8))


def test_custom_and_unknown_windows():
    assert get_window((50, 100)) == Window(50.0, 100.0)
    with pytest.raises(ConfigError, match="unknown CT window 'lung'"):
        apply_window(np.zeros(3, np.int16), "lung")
    with pytest.raises(ConfigError, match="width must be positive"):
        get_window((0, 0))


def test_uint8_to_unit():
    np.testing.assert_allclose(uint8_to_unit(np.array([0, 255], np.uint8)), [0.0, 1.0])


def test_crop_650_to_640_is_a_view_and_inverts_with_zero_padding():
    slices = np.random.default_rng(1).integers(0, 255, size=(2, 650, 650)).astype(np.uint8)
    cropped = to_working_size(slices, 640, mode="crop")
    assert cropped.shape == (2, 640, 640) and np.shares_memory(cropped, slices)
    np.testing.assert_array_equal(cropped, slices[:, 5:645, 5:645])
    restored = from_working_size(cropped, (650, 650), mode="crop")
    np.testing.assert_array_equal(restored[:, 5:645, 5:645], cropped)
    assert restored[:, :5].sum() == 0


def test_resize_512_to_640_and_back():
    mask = np.zeros((1, 512, 512), dtype=bool)
    mask[0, 100:200, 300:420] = True
    big = to_working_size(mask, 640, is_mask=True)
    assert big.dtype == bool and big.shape == (1, 640, 640)
    assert abs(int(big.sum()) - int(mask.sum()) * 640**2 / 512**2) < 0.02 * big.sum()
    back = from_working_size(big, (512, 512), is_mask=True)
    np.testing.assert_array_equal(back, mask)  # nearest up by 5/4 then down is exact
    image = np.linspace(0, 255, 512 * 512).reshape(1, 512, 512).astype(np.uint8)
    resized = to_working_size(image, 640)
    assert resized.dtype == np.uint8 and resized.shape == (1, 640, 640)
    assert abs(float(resized.mean()) - float(image.mean())) < 1.0


def test_bad_working_size_requests():
    with pytest.raises(ConfigError, match="cannot crop"):
        to_working_size(np.zeros((1, 600, 600), np.uint8), 640, mode="crop")
    with pytest.raises(ConfigError, match="must be 'resize' or 'crop'"):
        to_working_size(np.zeros((1, 600, 600), np.uint8), 640, mode="pad")
