"""CT intensity windows (HU -> display range) and the resampling of slices to the working size.

A window maps Hounsfield units to [0, 1]: ``clip((hu - (level - width / 2)) / width, 0, 1)``; the
uint8 form is that value times 255, rounded. The CT-ICH JPG release stores brain (40/120) and bone
(700/3200) windows as uint8 images; the NIfTI release stores HU, windowed here.

For int16 input (the NIfTI release) windowing is a table look-up over all 65,536 int16 values:
O(pixels), no float copy of the volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ichseg.errors import ConfigError


@dataclass(frozen=True)
class Window:
    """A CT display window: centre ``level`` and ``width`` in Hounsfield units."""

    level: float
    width: float

    @property
    def low(self) -> float:
        """HU value mapped to 0."""
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        """HU value mapped to 1 (255)."""
        return self.level + self.width / 2


#: Presets: brain (40/120, the paper's input), bone (700/3200), subdural (80/200).
WINDOWS: dict[str, Window] = {
    "brain": Window(40, 120),
    "bone": Window(700, 3200),
    "subdural": Window(80, 200),
}


def get_window(window: str | Window | Sequence[float]) -> Window:
    """Resolve a preset name, a :class:`Window` or a ``(level, width)`` pair."""
    if isinstance(window, Window):
        return window
    if isinstance(window, str):
        try:
            return WINDOWS[window]
        except KeyError:
            raise ConfigError(
                f"unknown CT window {window!r}; choose one of {sorted(WINDOWS)} "
                "or give (level, width)"
            ) from None
    level, width = window
    if width <= 0:
        raise ConfigError(f"CT window width must be positive, got {width}")
    return Window(float(level), float(width))


@lru_cache(maxsize=32)
def _lookup_table(window: Window, dtype_name: str) -> np.ndarray:
    """Table of the window applied to every int16 value, indexed by the value viewed as uint16."""
    hu = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.float64)
    scaled = np.clip((hu - window.low) / window.width, 0.0, 1.0)
    if dtype_name == "uint8":
        table = np.rint(scaled * 255).astype(np.uint8)
    else:
        table = scaled.astype(dtype_name)
    table.setflags(write=False)
    return table


def apply_window(
    hu: np.ndarray,
    window: str | Window | Sequence[float] = "brain",
    dtype: np.dtype | type | str = np.float32,
) -> np.ndarray:
    """Window a HU array: uint8 in [0, 255] or float in [0, 1], same shape as ``hu``.

    int16 input goes through a look-up table (fast, no float copy); other dtypes are computed
    directly. ``dtype`` is ``np.uint8`` or a float dtype.
    """
    window = get_window(window)
    dtype = np.dtype(dtype)
    if dtype != np.uint8 and dtype.kind != "f":
        raise ConfigError(f"windowed images are uint8 or float, not {dtype}")
    if hu.dtype == np.int16:
        return _lookup_table(window, dtype.name)[hu.view(np.uint16)]
    scaled = np.clip((np.asarray(hu, dtype=np.float32) - window.low) / window.width, 0.0, 1.0)
    if dtype == np.uint8:
        return np.rint(scaled * 255).astype(np.uint8)
    return scaled.astype(dtype, copy=False)


def stack_windows(
    hu: np.ndarray,
    windows: Sequence[str | Window | Sequence[float]] = ("brain",),
    dtype: np.dtype | type | str = np.float32,
) -> np.ndarray:
    """Several windows of one HU array stacked as channels on a new first axis:
    ``(C, *hu.shape)``.
    """
    if len(windows) == 0:
        raise ConfigError("at least one CT window is needed")
    out = np.empty((len(windows), *hu.shape), dtype=np.dtype(dtype))
    for channel, window in enumerate(windows):
        out[channel] = apply_window(hu, window, dtype)
    return out


def uint8_to_unit(image: np.ndarray, dtype: np.dtype | type | str = np.float32) -> np.ndarray:
    """Scale a uint8 windowed image to float in [0, 1]."""
    return image.astype(dtype) * np.asarray(1.0 / 255.0, dtype=dtype)


def to_working_size(
    slices: np.ndarray,
    size: int = 640,
    mode: str = "resize",
    is_mask: bool = False,
) -> np.ndarray:
    """Bring a stack of slices ``(..., H, W)`` to ``size x size``.

    ``mode="resize"``: bilinear for images, nearest for masks (the NIfTI release, 512 -> 640), with
    the pixel-area convention (``align_corners=False``), so :func:`from_working_size` is its inverse
    mapping. ``mode="crop"``: remove an equal border (the JPG release, 650 -> 640, 5 pixels a side);
    the result is a view. A slice already at ``size`` is returned as is.
    """
    height, width = slices.shape[-2:]
    if (height, width) == (size, size):
        return slices
    if mode == "crop":
        if height < size or width < size or (height - size) % 2 or (width - size) % 2:
            raise ConfigError(
                f"cannot crop {height}x{width} slices to {size}x{size}: "
                "the border must be even and non-negative"
            )
        top, left = (height - size) // 2, (width - size) // 2
        return slices[..., top : top + size, left : left + size]
    if mode != "resize":
        raise ConfigError(f"working-size mode must be 'resize' or 'crop', not {mode!r}")
    return _resample(slices, (size, size), is_mask)


def from_working_size(
    slices: np.ndarray,
    shape: tuple[int, int],
    mode: str = "resize",
    is_mask: bool = False,
) -> np.ndarray:
    """Inverse of :func:`to_working_size`: back to the original in-plane ``shape``.

    ``mode="crop"`` pads the removed border with zeros; ``mode="resize"`` resamples (bilinear for
    images and probability maps, nearest for masks).
    """
    height, width = shape
    if slices.shape[-2:] == (height, width):
        return slices
    if mode == "crop":
        size_h, size_w = slices.shape[-2:]
        top, left = (height - size_h) // 2, (width - size_w) // 2
        out = np.zeros((*slices.shape[:-2], height, width), dtype=slices.dtype)
        out[..., top : top + size_h, left : left + size_w] = slices
        return out
    if mode != "resize":
        raise ConfigError(f"working-size mode must be 'resize' or 'crop', not {mode!r}")
    return _resample(slices, (height, width), is_mask)


def _resample(slices: np.ndarray, shape: tuple[int, int], is_mask: bool) -> np.ndarray:
    """Resample the last two axes with torch (bilinear or nearest, align_corners=False)."""
    import torch
    import torch.nn.functional as F

    lead = slices.shape[:-2]
    flat = torch.from_numpy(np.ascontiguousarray(slices).reshape(-1, 1, *slices.shape[-2:]))
    if is_mask:
        resized = F.interpolate(flat.to(torch.uint8), size=shape, mode="nearest-exact")
        return resized.numpy().reshape(*lead, *shape).astype(slices.dtype, copy=False)
    source_dtype = slices.dtype
    resized = F.interpolate(
        flat.to(torch.float32), size=shape, mode="bilinear", align_corners=False
    )
    out = resized.numpy().reshape(*lead, *shape)
    if source_dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if np.issubdtype(source_dtype, np.integer):
        info = np.iinfo(source_dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(source_dtype)
    return out.astype(source_dtype, copy=False)
