"""Threshold, morphological closing, then opening of predicted masks (the paper's post-processing).

The paper thresholds the stitched probability map at 0.5, then closes the mask with a 10x10 square
("to fill in the gaps") and opens it with a 5x5 square ("to remove outliers"). The authors' code
(Keras + OpenCV) did ``cv2.morphologyEx(mask, MORPH_CLOSE, np.ones((10, 10)))`` then ``MORPH_OPEN``
with ``np.ones((5, 5))``; this module reproduces OpenCV's results exactly.

Conventions
-----------
* Threshold: a pixel is foreground when its probability is strictly greater than the threshold
  (``p > 0.5``), as the authors' ``img > threshold``. (They compared the probability quantised to
  0-255 with ``0.5 * 256``, i.e. ``p >= 129 / 255``: a difference of under 0.6 % in probability,
  not reproduced.)
* Structuring element: a ``k x k`` square. Its anchor is OpenCV's default, pixel ``k // 2`` (for an
  even ``k`` the square covers offsets ``-k/2 .. k/2 - 1``). ``convention="opencv"`` (default) uses
  those offsets for dilation AND erosion, as ``cv2.dilate``/``cv2.erode``/``cv2.morphologyEx`` do:
  with an even square, closing and opening each move the mask by one pixel towards higher indices
  (down and right). ``convention="symmetric"`` is the textbook definition (dilation by the reflected
  square, as scikit-image 0.26 ``closing``/``opening``): closing contains its input, opening is
  contained in it, nothing moves. Odd sizes give the same result under both conventions.
* Border: pixels outside the slice never influence the result (dilation treats them as background,
  erosion as foreground), as in OpenCV and scikit-image. (``scipy.ndimage.binary_closing`` with its
  default ``border_value=0`` would instead erode objects that touch the border; it is not used.)
* Sizes are given at the working resolution (640x640) and scaled with the pixel size of the grid
  they are applied on: ``k' = floor(k * scale + 0.5)`` per axis (round half up), where ``scale`` is
  the number of pixels of that grid per working-resolution pixel (:func:`pixel_scale`: 512/640 for
  the NIfTI release resized from 512, 1 for the JPG release cropped from 650). At 512: 10 -> 8,
  5 -> 4. A configured size of 1 or less switches the operation off; a scaled size of 1 leaves that
  axis unchanged.
* Slices are independent: an ``(N, H, W)`` stack is processed at once with 1-D minimum / maximum
  filters along the two in-plane axes only (a square is separable, so this is exactly binary
  dilation / erosion by the square, and much faster).

:func:`postprocess` accepts numpy arrays or torch tensors and returns the same type. Two backends
give identical masks (``tests/test_postprocess.py``): scipy.ndimage 1-D filters (numpy input and
CPU tensors) and ``max_pool2d`` on the tensor's device (CUDA tensors, or ``backend="torch"``).
Slices that are empty (or entirely foreground) are left as they are without any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ichseg.errors import ConfigError

Convention = Literal["opencv", "symmetric"]
CONVENTIONS: tuple[str, ...] = ("opencv", "symmetric")
ORDERS: tuple[str, ...] = ("close-open", "open-close")
#: The working resolution at which sizes (and the detection area minimum) are given.
WORKING_SIZE = 640

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class PostprocessConfig:
    """Threshold and morphology settings; sizes in working-resolution (640) pixels.

    ``order`` is ``"close-open"`` (the paper) or ``"open-close"``; a size of 1 or less skips that
    operation; ``convention`` is ``"opencv"`` (the authors') or ``"symmetric"`` (module docstring).
    """

    threshold: float = 0.5
    closing_size: int = 10
    opening_size: int = 5
    order: str = "close-open"
    convention: str = "opencv"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"the probability threshold must lie in [0, 1], got {self.threshold}")
        if self.order not in ORDERS:
            raise ConfigError(
                f"morphology order must be one of {', '.join(ORDERS)}, not {self.order!r}"
            )
        if self.convention not in CONVENTIONS:
            raise ConfigError(
                f"morphology convention must be one of {', '.join(CONVENTIONS)}, "
                f"not {self.convention!r}"
            )

    def with_threshold(self, threshold: float) -> PostprocessConfig:
        """A copy with another probability threshold."""
        return replace(self, threshold=float(threshold))

    def steps(self, scale: float | Sequence[float] = 1.0) -> list[tuple[str, tuple[int, int]]]:
        """The operations to apply at ``scale``: ``[("close", (kh, kw)), ("open", (kh, kw))]``."""
        sizes = {"close": self.closing_size, "open": self.opening_size}
        names = ("close", "open") if self.order == "close-open" else ("open", "close")
        steps = []
        for name in names:
            if sizes[name] is None or sizes[name] <= 1:
                continue
            scaled = scaled_size(sizes[name], scale)
            if scaled != (1, 1):
                steps.append((name, scaled))
        return steps


#: The paper's post-processing: threshold 0.5, closing 10x10, opening 5x5 (OpenCV semantics).
PAPER = PostprocessConfig()
#: No morphology: threshold only.
THRESHOLD_ONLY = PostprocessConfig(closing_size=0, opening_size=0)


# --------------------------------------------------------------------------- sizes


def _pair(value: float | Sequence[float]) -> tuple[float, float]:
    if np.isscalar(value):
        return float(value), float(value)  # type: ignore[arg-type]
    first, second = value  # type: ignore[misc]
    return float(first), float(second)


def pixel_scale(
    shape: Sequence[int], working_size: int = WORKING_SIZE, mode: str = "resize"
) -> tuple[float, float]:
    """Pixels of a ``shape`` grid per working-resolution pixel, per axis.

    ``mode`` is how slices of that grid were brought to the working size: ``"resize"`` (NIfTI
    512 -> 640: ``(512 / 640, 512 / 640)``) or ``"crop"`` (JPG 650 -> 640: pixels unchanged,
    ``(1, 1)``).
    """
    if mode == "crop":
        return 1.0, 1.0
    if mode != "resize":
        raise ConfigError(f"working-size mode must be 'resize' or 'crop', not {mode!r}")
    height, width = int(shape[-2]), int(shape[-1])
    return height / working_size, width / working_size


def grid_scale(
    shape: Sequence[int],
    working_size: int,
    working_mode: str,
    reference_size: int = WORKING_SIZE,
) -> tuple[float, float]:
    """Pixels of the scored (original) grid per ``reference_size`` pixel, per axis.

    Morphology sizes and the detection area minimum are given at ``reference_size`` (640: the
    paper's slices). For real data the working size is 640 and this is
    :func:`~ichseg.eval.postprocess.pixel_scale` (NIfTI 512: 0.8; JPG crop: 1); smaller working
    sizes (phantoms, demos) scale them further by ``working_size / reference_size``.
    """
    scale_h, scale_w = pixel_scale(shape, working_size, working_mode)
    factor = float(working_size) / float(reference_size)
    return scale_h * factor, scale_w * factor


def scaled_size(size: int, scale: float | Sequence[float] = 1.0) -> tuple[int, int]:
    """``(kh, kw)``: a working-resolution size at ``scale``, rounded half up, at least 1."""
    scale_h, scale_w = _pair(scale)
    if scale_h <= 0 or scale_w <= 0:
        raise ConfigError(f"the pixel scale must be positive, got {scale}")
    return (
        max(1, int(np.floor(size * scale_h + 0.5))),
        max(1, int(np.floor(size * scale_w + 0.5))),
    )


def _square(size: int | Sequence[int]) -> tuple[int, int]:
    kh, kw = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))  # type: ignore[index]
    if kh < 1 or kw < 1:
        raise ConfigError(f"structuring element sizes must be at least 1, got {size}")
    return kh, kw


def _dilation_origin(k: int, convention: str) -> int:
    """scipy ``origin`` of a ``k``-wide dilation: 0 (OpenCV) or -1 for an even ``k`` (reflected)."""
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"morphology convention must be one of {', '.join(CONVENTIONS)}, not {convention!r}"
        )
    return -1 if convention == "symmetric" and k % 2 == 0 else 0


# --------------------------------------------------------------------------- numpy / scipy


def _as_stack(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ConfigError(f"masks must be (H, W) or (N, H, W), got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def dilate(
    masks: np.ndarray, size: int | Sequence[int], convention: Convention = "opencv"
) -> np.ndarray:
    """Binary dilation of ``(..., H, W)`` masks by a ``size`` square (or ``(kh, kw)`` rectangle)."""
    out = _as_stack(masks)
    for axis, k in zip((-2, -1), _square(size), strict=True):
        if k > 1:
            origin = _dilation_origin(k, convention)
            out = ndimage.maximum_filter1d(
                out, k, axis=axis, mode="constant", cval=0, origin=origin
            )
    return out


def erode(
    masks: np.ndarray, size: int | Sequence[int], convention: Convention = "opencv"
) -> np.ndarray:
    """Binary erosion of ``(..., H, W)`` masks by a ``size`` square (outside = foreground)."""
    _dilation_origin(2, convention)  # validates the name; erosion offsets are the same in both
    out = _as_stack(masks)
    for axis, k in zip((-2, -1), _square(size), strict=True):
        if k > 1:
            out = ndimage.minimum_filter1d(out, k, axis=axis, mode="constant", cval=1, origin=0)
    return out


def closing(
    masks: np.ndarray, size: int | Sequence[int], convention: Convention = "opencv"
) -> np.ndarray:
    """Dilation then erosion by the same square."""
    return erode(dilate(masks, size, convention), size, convention)


def opening(
    masks: np.ndarray, size: int | Sequence[int], convention: Convention = "opencv"
) -> np.ndarray:
    """Erosion then dilation by the same square."""
    return dilate(erode(masks, size, convention), size, convention)


# --------------------------------------------------------------------------- torch


def _pool_max(x: torch.Tensor, k: int, axis: int, before: int) -> torch.Tensor:
    """Max over offsets ``-before .. k - 1 - before`` along ``axis`` (-2 or -1), zero outside."""
    after = k - 1 - before
    if axis == -1:
        padded = F.pad(x, (before, after, 0, 0))
        return F.max_pool2d(padded, (1, k), stride=1)
    padded = F.pad(x, (0, 0, before, after))
    return F.max_pool2d(padded, (k, 1), stride=1)


def _torch_stack(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """``(M, 1, H, W)`` float 0/1 view of ``(..., H, W)`` masks, and the original shape."""
    if masks.ndim < 2:
        raise ConfigError(f"masks must be (H, W) or (N, H, W), got shape {tuple(masks.shape)}")
    dtype = torch.float16 if masks.device.type == "cuda" else torch.float32
    return masks.reshape(-1, 1, *masks.shape[-2:]).to(dtype), masks.shape


def dilate_torch(
    masks: torch.Tensor, size: int | Sequence[int], convention: Convention = "opencv"
) -> torch.Tensor:
    """:func:`dilate` with ``max_pool2d`` on the tensor's device; bool result."""
    x, shape = _torch_stack(masks)
    for axis, k in zip((-2, -1), _square(size), strict=True):
        if k > 1:
            before = k // 2 if _dilation_origin(k, convention) == 0 else k - 1 - k // 2
            x = _pool_max(x, k, axis, before)
    return (x > 0.5).reshape(shape)


def erode_torch(
    masks: torch.Tensor, size: int | Sequence[int], convention: Convention = "opencv"
) -> torch.Tensor:
    """:func:`erode` with ``max_pool2d``: ``1 - max(1 - x)``, outside pixels count as foreground."""
    _dilation_origin(2, convention)
    x, shape = _torch_stack(masks)
    background = 1 - x
    for axis, k in zip((-2, -1), _square(size), strict=True):
        if k > 1:
            background = _pool_max(background, k, axis, k // 2)
    return (background < 0.5).reshape(shape)


def closing_torch(
    masks: torch.Tensor, size: int | Sequence[int], convention: Convention = "opencv"
) -> torch.Tensor:
    """:func:`closing` in torch."""
    return erode_torch(dilate_torch(masks, size, convention), size, convention)


def opening_torch(
    masks: torch.Tensor, size: int | Sequence[int], convention: Convention = "opencv"
) -> torch.Tensor:
    """:func:`opening` in torch."""
    return dilate_torch(erode_torch(masks, size, convention), size, convention)


# --------------------------------------------------------------------------- pipeline


def binarize(probabilities: ArrayOrTensor, threshold: float = 0.5) -> ArrayOrTensor:
    """Foreground where ``probability > threshold`` (strictly); bool, same type and shape."""
    return probabilities > threshold


def _scipy_morphology(
    masks: np.ndarray, steps: list[tuple[str, tuple[int, int]]], convention: str
) -> np.ndarray:
    """Apply ``steps`` with scipy to the slices that have foreground and are not all foreground.

    Closing and opening leave an empty slice empty and a full slice full, so only the others are
    processed (most slices of a scan at a high threshold are empty).
    """
    height, width = masks.shape[-2:]
    flat = masks.reshape(-1, height * width)
    active = np.flatnonzero(flat.any(axis=1) & ~flat.all(axis=1))
    if active.size == 0 or not steps:
        return masks
    stack = masks.reshape(-1, height, width)[active]
    for name, size in steps:
        stack = (closing if name == "close" else opening)(stack, size, convention)  # type: ignore[arg-type]
    out = masks.reshape(-1, height, width).copy()
    out[active] = stack
    return out.reshape(masks.shape)


def morphology(
    masks: ArrayOrTensor,
    config: PostprocessConfig = PAPER,
    scale: float | Sequence[float] = 1.0,
    backend: str = "auto",
) -> ArrayOrTensor:
    """The configured closing / opening of binary ``(..., H, W)`` masks at pixel ``scale``.

    Returns the input's type. ``backend``: ``"scipy"``, ``"torch"`` (``max_pool2d`` on the
    tensor's device), or ``"auto"``: torch for CUDA tensors, scipy otherwise (torch's CPU max
    pooling is several times slower than scipy's 1-D filters). Both give identical masks.
    """
    if backend not in ("auto", "scipy", "torch"):
        raise ConfigError(f"morphology backend must be 'auto', 'scipy' or 'torch', not {backend!r}")
    steps = config.steps(scale)
    if isinstance(masks, torch.Tensor):
        if backend == "torch" or (backend == "auto" and masks.device.type != "cpu"):
            out = masks.bool()
            for name, size in steps:
                op = closing_torch if name == "close" else opening_torch
                out = op(out, size, config.convention)  # type: ignore[arg-type]
            return out
        result = _scipy_morphology(masks.bool().cpu().numpy(), steps, config.convention)
        return torch.from_numpy(result).to(masks.device)
    if backend == "torch":
        tensor = torch.from_numpy(_as_stack(masks))
        return morphology(tensor, config, scale, backend="torch").numpy()
    return _scipy_morphology(_as_stack(masks), steps, config.convention)


def postprocess(
    probabilities: ArrayOrTensor,
    config: PostprocessConfig = PAPER,
    scale: float | Sequence[float] = 1.0,
    backend: str = "auto",
) -> ArrayOrTensor:
    """Threshold then morphology: bool masks ``(..., H, W)`` from probability maps.

    ``scale`` is the pixel scale of the grid (:func:`pixel_scale`), 1 at the working resolution;
    ``backend`` as in :func:`morphology` (the result has the input's type and device).
    """
    return morphology(binarize(probabilities, config.threshold), config, scale, backend)


def postprocess_thresholds(
    probabilities: ArrayOrTensor,
    thresholds: Sequence[float],
    config: PostprocessConfig = PAPER,
    scale: float | Sequence[float] = 1.0,
    backend: str = "auto",
) -> ArrayOrTensor:
    """``(T, ..., H, W)`` bool: :func:`postprocess` at each threshold, all in one pass.

    Thresholds are compared in the probabilities' own float type, as :func:`binarize` does.
    """
    if isinstance(probabilities, torch.Tensor):
        dtype = probabilities.dtype if probabilities.is_floating_point() else torch.float64
        levels = torch.as_tensor(list(thresholds), dtype=dtype, device=probabilities.device)
        binary = probabilities.unsqueeze(0) > levels.reshape(-1, *([1] * probabilities.ndim))
    else:
        array = np.asarray(probabilities)
        dtype = array.dtype if array.dtype.kind == "f" else np.float64
        levels_np = np.asarray(thresholds, dtype=dtype).reshape(-1, *([1] * array.ndim))
        binary = array[None] > levels_np
    return morphology(binary, config, scale, backend)
