"""Whole-slice probability maps from a window model: sliding windows, averaged where they overlap.

The paper cuts every 640x640 slice into 160x160 windows with stride 80 (a 7x7 grid), runs the U-Net
on each window and AVERAGES the overlapping window probabilities into the full slice: for every
pixel, the sum of the probabilities of the windows covering it divided by their number.

:func:`stitch` does exactly that for one or more slices ``(B, C, H, W)``:

* the grid is :func:`ichseg.data.tiles.make_grid` (any slice size; when the stride does not divide
  the slice the last window of each row and column is flush with the far edge, e.g. 512 with
  160/80 -> starts 0, 80, ..., 320, 352);
* every window is addressed by index arithmetic: window id -> (slice, grid position) -> the flat
  indices of its pixels (top-left index plus one shared offset table); a batch of
  ``window_batch_size`` windows is gathered from the flattened slices with one ``index_select``
  and run through the model on its device (no Python loop over windows, only over batches);
* the window probabilities ``sigmoid(logits)`` (computed in float32, also under AMP) are multiplied
  by a window weight map and accumulated into the slices with one ``index_add_`` per batch; the
  result is divided by the accumulated weights.

Weight maps (``mode``): ``"constant"`` (all ones: the paper's sum / count, MONAI's ``constant``)
or ``"gaussian"``, MONAI's definition (``monai.data.utils.compute_importance_map``):
``w(i, j) = max(g(i) g(j), 1e-3)`` with ``g(t) = exp(-(t - (n - 1) / 2)^2 / (2 sigma^2))`` and
``sigma = sigma_scale * n`` (``sigma_scale`` 0.125 as in MONAI and nnU-Net). The Gaussian is
centred between the two middle pixels of an even window, so the map is symmetric.

With ``roi_size=(160, 160)``, ``overlap=0.5`` MONAI's ``sliding_window_inference`` builds the same
grid (scan interval ``int(160 * 0.5) = 80``, last window flush with the edge) and the same weighted
average: given a predictor that returns probabilities, both agree to float32 rounding
(``tests/test_stitch.py``).

2.5D models (``context_slices=k``) take the same window of the slices ``s - k .. s + k`` as channels
(slice-major, the volume's first and last slices repeated at its ends, as in training): the input
indices of a window then come from ``2k + 1`` slice planes of the same flattened volume, so no
context-stacked copy of the volume is made. ``rows`` restricts the output to some slices (their
neighbours are still read), so a caller can predict a long volume in chunks.

:func:`full_slice` runs the model on whole slices (the paper's full-slice experiment) and returns
the same format. :func:`to_original_grid` resamples a stitched map back to the scan's own grid with
:func:`ichseg.data.windowing.from_working_size`.

Outputs are float32 probability maps ``(B, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Literal

import numpy as np
import torch

from ichseg.data.tiles import check_context_slices, make_grid
from ichseg.data.windowing import from_working_size
from ichseg.errors import ConfigError

BlendMode = Literal["constant", "gaussian"]
BLEND_MODES: tuple[str, ...] = ("constant", "gaussian")
#: MONAI's floor for Gaussian window weights (``compute_importance_map``).
GAUSSIAN_MIN_WEIGHT = 1e-3

Model = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- weights


def window_weights(
    window: int | tuple[int, int],
    mode: BlendMode = "constant",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(h, w)`` float32 weight map of one window (see the module docstring for ``gaussian``)."""
    height, width = (window, window) if isinstance(window, int) else window
    if mode == "constant":
        return torch.ones((height, width), dtype=torch.float32, device=device)
    if mode != "gaussian":
        raise ConfigError(f"stitching mode must be one of {', '.join(BLEND_MODES)}, not {mode!r}")
    if sigma_scale <= 0:
        raise ConfigError(f"the Gaussian sigma_scale must be positive, got {sigma_scale}")

    def profile(n: int) -> torch.Tensor:
        t = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        return torch.exp(t**2 / (-2 * (sigma_scale * n) ** 2))

    weights = profile(height)[:, None] * profile(width)[None, :]
    return weights.clamp_(min=GAUSSIAN_MIN_WEIGHT)


def _window_offsets(window: int, width: int, device: torch.device | str | None) -> torch.Tensor:
    """``(window * window,)`` offsets ``i * width + j`` of a window's pixels from its corner."""
    steps = torch.arange(window, device=device)
    return (steps[:, None] * width + steps[None, :]).reshape(-1)


def coverage_map(
    size: int | tuple[int, int],
    window: int = 160,
    stride: int = 80,
    mode: BlendMode = "constant",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(H, W)`` float32 sum of the window weights at each pixel: the stitching denominator.

    For ``mode="constant"`` this is the number of windows covering each pixel (1 / 2 / 4 on the
    paper's 640 / 160 / 80 grid).
    """
    grid = make_grid(size, window, stride)
    height, width = grid.size
    corners = torch.from_numpy(grid.corners.copy()).to(device)
    starts = corners[:, 0] * width + corners[:, 1]  # (G,) flat index of each window's top-left
    index = starts[:, None] + _window_offsets(window, width, device)
    weights = window_weights(window, mode, sigma_scale, device).reshape(1, -1).expand(len(grid), -1)
    total = torch.zeros(height * width, dtype=torch.float32, device=device)
    total.index_add_(0, index.reshape(-1), weights.reshape(-1))
    return total.reshape(height, width)


# --------------------------------------------------------------------------- helpers


def _as_slices(slices: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A float ``(B, C, H, W)`` tensor from a tensor or array (no copy when already one)."""
    tensor = torch.as_tensor(slices)
    if tensor.ndim != 4:
        raise ConfigError(f"slices must be a (B, C, H, W) stack, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ConfigError(
            f"slices must be a float tensor (images scaled to [0, 1]), not {tensor.dtype}"
        )
    return tensor


def _model_device(
    model: Model, device: torch.device | str | None, fallback: torch.device
) -> torch.device:
    """``device`` if given, else the device of the model's first parameter, else ``fallback``."""
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return fallback


@contextmanager
def _evaluation_mode(model: Model):
    """Put an ``nn.Module`` in eval mode (no dropout) for the duration, then restore its mode."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _autocast(device: torch.device, amp: bool, amp_dtype: torch.dtype):
    """Autocast on CUDA when ``amp`` is set; a no-op context elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=amp_dtype)
    return nullcontext()


def _probabilities(
    model: Model, batch: torch.Tensor, amp: bool, amp_dtype: torch.dtype
) -> torch.Tensor:
    """``sigmoid(model(batch))`` in float32, ``(N, h, w)``; logits must be ``(N, 1, h, w)``."""
    with _autocast(batch.device, amp, amp_dtype):
        logits = model(batch)
    expected = (batch.shape[0], 1, *batch.shape[-2:])
    if tuple(logits.shape) != expected:
        raise ConfigError(
            f"the model returned logits of shape {tuple(logits.shape)} "
            f"for input {tuple(batch.shape)}; "
            f"expected {expected}"
        )
    return torch.sigmoid(logits.float())[:, 0]


# --------------------------------------------------------------------------- stitching


def _row_range(rows: slice | None, n_slices: int) -> tuple[int, int]:
    """``(first, stop)`` of the slices to predict: ``rows`` (step 1) within ``0 .. n_slices``."""
    if rows is None:
        return 0, n_slices
    first, stop, step = rows.indices(n_slices)
    if step != 1:
        raise ConfigError(f"rows must be a contiguous slice (step 1), got {rows}")
    return first, max(first, stop)


def context_index(slice_ids: torch.Tensor, context_slices: int, n_slices: int) -> torch.Tensor:
    """``(n, 2k + 1)``: slices ``s - k .. s + k`` around each of ``slice_ids`` (``k`` =
    ``context_slices``), clamped to ``0 .. n_slices - 1`` (one volume: its ends repeated).

    The same rule as the training data's :func:`ichseg.data.tiles.context_rows`.
    """
    k = check_context_slices(context_slices)
    offsets = torch.arange(-k, k + 1, device=slice_ids.device, dtype=slice_ids.dtype)
    return (slice_ids[:, None] + offsets[None, :]).clamp_(0, n_slices - 1)


def stitch(
    model: Model,
    slices: torch.Tensor | np.ndarray,
    window: int = 160,
    stride: int = 80,
    window_batch_size: int = 32,
    mode: BlendMode = "constant",
    sigma_scale: float = 0.125,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    context_slices: int = 0,
    rows: slice | None = None,
) -> torch.Tensor:
    """Probability maps ``(B, H, W)`` float32 of full slices ``(B, C, H, W)`` from a window model.

    ``model`` maps ``(N, C', window, window)`` to logits ``(N, 1, window, window)``; it runs on
    ``device`` (default: the device of its parameters, else that of ``slices``),
    ``window_batch_size`` windows at a time, under ``torch.inference_mode``, in eval mode
    (restored afterwards), with autocast to ``amp_dtype`` when ``amp`` is set and the device is
    CUDA. Overlapping window probabilities are averaged with ``mode`` weights (module docstring).
    The result is on ``output_device`` (default: the device of ``slices``).

    ``slices`` is one volume's slices in order. With ``context_slices`` ``k > 0`` (2.5D models)
    each window's input also holds the same window of slices ``s - k .. s + k`` (clamped to the
    volume's ends), stacked slice-major: ``C' = (2k + 1) C``, gathered by index arithmetic from
    the one copy of ``slices``. ``rows`` (a step-1 ``slice``) predicts only those slices (their
    neighbours are still read from all of ``slices``): the output is then ``(len(rows), H, W)``.
    """
    source = _as_slices(slices)
    if window_batch_size < 1:
        raise ConfigError(f"window_batch_size must be at least 1, got {window_batch_size}")
    n_slices, n_channels, height, width = source.shape
    first, stop = _row_range(rows, n_slices)
    n_out = stop - first
    grid = make_grid((height, width), window, stride)
    run_device = _model_device(model, device, source.device)
    out_device = torch.device(output_device) if output_device is not None else source.device

    plane = height * width
    # int32 index arithmetic (half the memory traffic) whenever every flat index fits
    index_dtype = torch.int32 if n_slices * n_channels * plane < 2**31 else torch.int64
    flat_inputs = source.to(run_device, non_blocking=True).contiguous().reshape(-1)
    corners = torch.from_numpy(grid.corners.copy()).to(run_device, index_dtype)
    starts = corners[:, 0] * width + corners[:, 1]  # (G,) flat index of each window's top-left
    offsets = _window_offsets(window, width, run_device).to(index_dtype)  # (w * w,), shared
    # (C, w * w): the offsets of a window's pixels in each channel plane of its slice
    channels = torch.arange(n_channels, device=run_device, dtype=index_dtype)
    channel_offsets = channels[:, None] * plane + offsets
    weights = None
    if mode != "constant":
        weights = window_weights(window, mode, sigma_scale, run_device).reshape(-1)
    n_positions, n_windows = len(grid), n_out * len(grid)
    in_channels = (2 * context_slices + 1) * n_channels
    # the input layout is the output layout: reuse the input indices as output indices
    same_layout = n_channels == 1 and context_slices == 0 and first == 0
    total = torch.zeros(n_out * plane, dtype=torch.float32, device=run_device)

    with _evaluation_mode(model), torch.inference_mode():
        for batch_start in range(0, n_windows, window_batch_size):
            batch_stop = min(batch_start + window_batch_size, n_windows)
            ids = torch.arange(batch_start, batch_stop, device=run_device, dtype=index_dtype)
            # window id -> (slice, grid position) -> flat index of every pixel of the window
            out_slice, top_left = ids // n_positions, starts[ids % n_positions]
            sources = context_index(out_slice + first, context_slices, n_slices)  # (n, 2k + 1)
            corner_index = sources * (n_channels * plane) + top_left[:, None]
            input_index = (corner_index[:, :, None, None] + channel_offsets).reshape(-1)
            batch = flat_inputs.index_select(0, input_index)
            batch = batch.reshape(len(ids), in_channels, window, window)
            probabilities = _probabilities(model, batch, amp, amp_dtype).reshape(len(ids), -1)
            if weights is not None:
                probabilities = probabilities * weights
            if same_layout:
                output_index = input_index
            else:
                output_index = ((out_slice * plane + top_left)[:, None] + offsets).reshape(-1)
            total.index_add_(0, output_index, probabilities.reshape(-1))
    # outside inference mode, so that the result is an ordinary tensor
    denominator = coverage_map((height, width), window, stride, mode, sigma_scale, run_device)
    stitched = total.reshape(n_out, height, width) / denominator
    return stitched.to(out_device)


def full_slice(
    model: Model,
    slices: torch.Tensor | np.ndarray,
    batch_size: int = 2,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    context_slices: int = 0,
    rows: slice | None = None,
) -> torch.Tensor:
    """Probability maps ``(B, H, W)`` float32 of the model run on whole slices (no stitching).

    Same conventions as :func:`stitch`: ``batch_size`` slices at a time (the paper used 2),
    ``context_slices`` neighbours on each side stacked as channels, ``rows`` to predict a part.
    """
    source = _as_slices(slices)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    n_slices = source.shape[0]
    first, stop = _row_range(rows, n_slices)
    run_device = _model_device(model, device, source.device)
    out_device = torch.device(output_device) if output_device is not None else source.device
    outputs = []
    with _evaluation_mode(model), torch.inference_mode():
        for start in range(first, stop, batch_size):
            ids = torch.arange(start, min(start + batch_size, stop), device=source.device)
            sources = context_index(ids, context_slices, n_slices).reshape(-1)
            batch = source.index_select(0, sources).to(run_device, non_blocking=True)
            batch = batch.reshape(len(ids), -1, *source.shape[-2:])
            outputs.append(_probabilities(model, batch, amp, amp_dtype))
    if not outputs:
        return torch.zeros((0, *source.shape[-2:]), dtype=torch.float32, device=out_device)
    return torch.cat(outputs).to(out_device)


def to_original_grid(
    probabilities: torch.Tensor | np.ndarray,
    shape: tuple[int, int],
    mode: str = "resize",
) -> np.ndarray:
    """Resample working-size probability maps ``(..., H, W)`` to the scan's in-plane ``shape``.

    ``mode`` is how the slices were brought to the working size (:func:`to_working_size`):
    ``"resize"`` resamples bilinearly (``align_corners=False``), ``"crop"`` pads the removed border
    with probability 0. Returns float32 numpy.
    """
    if isinstance(probabilities, torch.Tensor):
        probabilities = probabilities.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(probabilities, dtype=np.float32)
    return from_working_size(array, (int(shape[0]), int(shape[1])), mode=mode, is_mask=False)
