"""Whole-slice probability maps from a tile model: sliding tiles, averaged where they overlap.

The paper cuts every 640x640 slice into 160x160 tiles ("windows" in the paper) with stride 80 (a
7x7 grid), runs the U-Net on each tile and AVERAGES the overlapping probabilities into the full
slice: for every pixel, the sum of the probabilities of the tiles covering it divided by their
number. :func:`stitch` does that for one volume's slices ``(B, C, H, W)`` without a Python loop
over tiles: each batch of ``tile_batch_size`` tiles is gathered from the flattened slices with
one ``index_select`` and accumulated with one ``index_add_`` (the grid:
:func:`ichseg.data.tiles.make_grid`; the last tile of a row or column flush with the far edge).

Weight maps (``blend``): ``"constant"`` (the paper's sum / count, MONAI's ``constant``) or
``"gaussian"``, MONAI's ``compute_importance_map``: ``w(i, j) = max(g(i) g(j), 1e-3)`` with
``g(t) = exp(-(t - (n - 1) / 2)^2 / (2 sigma^2))``, ``sigma = sigma_scale * n``. 2.5D models
(``context_slices=k``) read the same tile of slices ``s - k .. s + k`` by index arithmetic, with
no stacked copy of the volume. :func:`full_slice` runs a model on whole slices;
:func:`to_original_grid` resamples a map back to the scan's own grid. Outputs are float32
``(B, H, W)``. The full description, and the equality with MONAI's ``sliding_window_inference``:
docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ichseg.data.tiles import check_context_slices, make_grid
from ichseg.data.windowing import from_working_size
from ichseg.errors import ConfigError
from ichseg.utils.renamed import renamed_keywords

BlendMode = Literal["constant", "gaussian"]
BLEND_MODES: tuple[str, ...] = ("constant", "gaussian")
#: MONAI's floor for Gaussian window weights (``compute_importance_map``).
GAUSSIAN_MIN_WEIGHT = 1e-3

Model = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- weights


@renamed_keywords({"window": "tile_size", "mode": "blend"})
def tile_weights(
    tile_size: int | tuple[int, int],
    blend: BlendMode = "constant",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(h, w)`` float32 weight map of one tile (see the module docstring for ``gaussian``)."""
    height, width = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    if blend == "constant":
        return torch.ones((height, width), dtype=torch.float32, device=device)
    if blend != "gaussian":
        raise ConfigError(f"stitching blend must be one of {', '.join(BLEND_MODES)}, not {blend!r}")
    if sigma_scale <= 0:
        raise ConfigError(f"the Gaussian sigma_scale must be positive, got {sigma_scale}")

    def profile(n: int) -> torch.Tensor:
        t = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        return torch.exp(t**2 / (-2 * (sigma_scale * n) ** 2))

    weights = profile(height)[:, None] * profile(width)[None, :]
    return weights.clamp_(min=GAUSSIAN_MIN_WEIGHT)


#: Earlier name of :func:`tile_weights`.
window_weights = tile_weights


def _tile_offsets(tile_size: int, width: int, device: torch.device | str | None) -> torch.Tensor:
    """``(tile_size**2,)`` offsets ``i * width + j`` of a tile's pixels from its corner."""
    steps = torch.arange(tile_size, device=device)
    return (steps[:, None] * width + steps[None, :]).reshape(-1)


@renamed_keywords({"window": "tile_size", "stride": "tile_stride", "mode": "blend"})
def coverage_map(
    size: int | tuple[int, int],
    tile_size: int = 160,
    tile_stride: int = 80,
    blend: BlendMode = "constant",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(H, W)`` float32 sum of the tile weights at each pixel: the stitching denominator.

    For ``blend="constant"`` this is the number of tiles covering each pixel (1 / 2 / 4 on the
    paper's 640 / 160 / 80 grid).
    """
    grid = make_grid(size, tile_size, tile_stride)
    height, width = grid.size
    corners = torch.from_numpy(grid.corners.copy()).to(device)
    starts = corners[:, 0] * width + corners[:, 1]  # (G,) flat index of each tile's top-left
    index = starts[:, None] + _tile_offsets(tile_size, width, device)
    weights = tile_weights(tile_size, blend, sigma_scale, device).reshape(1, -1)
    weights = weights.expand(len(grid), -1)
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


@dataclass(frozen=True)
class _TileIndex:
    """Index arithmetic of one stitching call: tile id -> flat indices of its pixels."""

    starts: torch.Tensor  # (G,) flat index of each grid position's top-left pixel
    offsets: torch.Tensor  # (t * t,) offsets of a tile's pixels from its corner, shared
    channel_offsets: torch.Tensor  # (C, t * t) the same in each channel plane of a slice
    plane: int  # H * W
    n_positions: int  # tiles per slice

    @classmethod
    def build(
        cls, shape: tuple[int, ...], tile_size: int, tile_stride: int, device: torch.device
    ) -> _TileIndex:
        n_slices, n_channels, height, width = shape
        plane = height * width
        # int32 index arithmetic (half the memory traffic) whenever every flat index fits
        dtype = torch.int32 if n_slices * n_channels * plane < 2**31 else torch.int64
        grid = make_grid((height, width), tile_size, tile_stride)
        corners = torch.from_numpy(grid.corners.copy()).to(device, dtype)
        offsets = _tile_offsets(tile_size, width, device).to(dtype)
        channels = torch.arange(n_channels, device=device, dtype=dtype)
        return cls(
            starts=corners[:, 0] * width + corners[:, 1],
            offsets=offsets,
            channel_offsets=channels[:, None] * plane + offsets,
            plane=plane,
            n_positions=len(grid),
        )

    def tile_ids(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, device=self.starts.device, dtype=self.starts.dtype)


@renamed_keywords(
    {"window": "tile_size", "stride": "tile_stride", "window_batch_size": "tile_batch_size",
     "mode": "blend"}
)  # fmt: skip
def stitch(
    model: Model,
    slices: torch.Tensor | np.ndarray,
    tile_size: int = 160,
    tile_stride: int = 80,
    tile_batch_size: int = 32,
    blend: BlendMode = "constant",
    sigma_scale: float = 0.125,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    context_slices: int = 0,
    rows: slice | None = None,
) -> torch.Tensor:
    """Probability maps ``(B, H, W)`` float32 of full slices ``(B, C, H, W)`` from a tile model.

    ``model`` maps ``(N, C', tile_size, tile_size)`` to logits ``(N, 1, tile_size, tile_size)``;
    it runs on ``device`` (default: the device of its parameters, else that of ``slices``),
    ``tile_batch_size`` tiles at a time, under ``torch.inference_mode``, in eval mode (restored
    afterwards), with autocast to ``amp_dtype`` when ``amp`` is set and the device is CUDA.
    Overlapping tile probabilities are averaged with ``blend`` weights (module docstring). The
    result is on ``output_device`` (default: the device of ``slices``).

    ``slices`` is one volume's slices in order. With ``context_slices`` ``k > 0`` (2.5D models)
    each tile's input also holds the same tile of slices ``s - k .. s + k`` (clamped to the
    volume's ends), stacked slice-major: ``C' = (2k + 1) C``, gathered by index arithmetic from
    the one copy of ``slices``. ``rows`` (a step-1 ``slice``) predicts only those slices (their
    neighbours are still read from all of ``slices``): the output is then ``(len(rows), H, W)``.
    """
    source = _as_slices(slices)
    if tile_batch_size < 1:
        raise ConfigError(f"tile_batch_size must be at least 1, got {tile_batch_size}")
    n_slices, n_channels, height, width = source.shape
    first, stop = _row_range(rows, n_slices)
    run_device = _model_device(model, device, source.device)
    out_device = torch.device(output_device) if output_device is not None else source.device
    index = _TileIndex.build(tuple(source.shape), tile_size, tile_stride, run_device)
    weights = None
    if blend != "constant":
        weights = tile_weights(tile_size, blend, sigma_scale, run_device).reshape(-1)
    n_tiles, plane = (stop - first) * index.n_positions, index.plane
    in_channels = (2 * context_slices + 1) * n_channels
    # the input layout is the output layout: reuse the input indices as output indices
    same_layout = n_channels == 1 and context_slices == 0 and first == 0
    flat_inputs = source.to(run_device, non_blocking=True).contiguous().reshape(-1)
    total = torch.zeros((stop - first) * plane, dtype=torch.float32, device=run_device)

    with _evaluation_mode(model), torch.inference_mode():
        for batch_start in range(0, n_tiles, tile_batch_size):
            ids = index.tile_ids(batch_start, min(batch_start + tile_batch_size, n_tiles))
            # tile id -> (slice, grid position) -> flat index of every pixel of the tile
            out_slice, top_left = ids // index.n_positions, index.starts[ids % index.n_positions]
            sources = context_index(out_slice + first, context_slices, n_slices)  # (n, 2k + 1)
            corner_index = sources * (n_channels * plane) + top_left[:, None]
            input_index = (corner_index[:, :, None, None] + index.channel_offsets).reshape(-1)
            batch = flat_inputs.index_select(0, input_index)
            batch = batch.reshape(len(ids), in_channels, tile_size, tile_size)
            probabilities = _probabilities(model, batch, amp, amp_dtype).reshape(len(ids), -1)
            if weights is not None:
                probabilities = probabilities * weights
            if same_layout:
                output_index = input_index
            else:
                output_index = ((out_slice * plane + top_left)[:, None] + index.offsets).reshape(-1)
            total.index_add_(0, output_index, probabilities.reshape(-1))
    # outside inference mode, so that the result is an ordinary tensor
    denominator = coverage_map(
        (height, width), tile_size, tile_stride, blend, sigma_scale, run_device
    )
    stitched = total.reshape(stop - first, height, width) / denominator
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
