"""Segment ICH in CT scans without masks with a trained checkpoint: ``python -m ichseg.predict``.

::

    python -m ichseg.predict ckpt=best.ckpt input=scan.nii.gz output=predictions/
    ichseg-predict ckpt=best.ckpt input=/data/ct-ich output=predictions/ save_probabilities=true

``input`` is a ``.nii`` / ``.nii.gz`` file, a folder of them, or a CT-ICH NIfTI release root (its
``ct_scans/``). For every scan the preprocessing stored in the checkpoint (``checkpoint["ichseg"]``,
written by :mod:`ichseg.train`) is applied: HU -> CT windows stacked as channels (uint8, as in
training) -> working size -> (2.5D checkpoints: the neighbouring slices as more channels) -> the
network over every window (:func:`ichseg.eval.stitch.stitch`, or
:func:`~ichseg.eval.stitch.full_slice` for full-slice checkpoints) -> stitched probabilities ->
back to the scan's grid (:func:`~ichseg.eval.stitch.to_original_grid`) -> threshold, closing and
opening (:func:`ichseg.eval.postprocess.postprocess`, sizes given at the paper's 640 and scaled
to the scan's grid as the evaluation does, :func:`morphology_scale`). Outputs, written
atomically into ``output``:

* ``<name>_ich.nii.gz``: the uint8 mask with the input's affine and header (orientation, qform and
  sform codes, zooms); ``<name>_prob.nii.gz`` (float32 probabilities) on request;
* ``volumes.csv``: one row per scan (ICH volume in mL = voxel count x voxel volume from the header
  zooms, slices with ICH, the largest 3D connected component in mL, seconds taken).

Checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain data only, never
arbitrary pickled objects) and the network is built only from an allow-list of ichseg classes
(:data:`ALLOWED_NETS`), so a checkpoint file cannot run code. The library functions
(:func:`load_predictor`, :func:`predict_volume`, :func:`predict_files`, ...) carry the logic; the
command line (:func:`main`) only parses ``key=value`` options and prints. Every user-facing problem
is an :class:`~ichseg.errors.IchsegError`: one sentence, exit status 2.
"""

from __future__ import annotations

import csv
import inspect
import io
import math
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ichseg.data.ctich import find_release
from ichseg.data.patches import check_context_slices, input_channels, make_grid
from ichseg.data.windowing import get_window, stack_windows, to_working_size
from ichseg.errors import ConfigError, DatasetError, IchsegError
from ichseg.eval.postprocess import PostprocessConfig, grid_scale, postprocess
from ichseg.eval.stitch import BLEND_MODES, full_slice, stitch, to_original_grid
from ichseg.models.threshold import IntensityBand
from ichseg.models.unet import UNet
from ichseg.utils.atomic import atomic_path, atomic_write_text
from ichseg.utils.cli import run_cli

PROG = "python -m ichseg.predict"
CHECKPOINT_FORMAT = "ichseg-checkpoint"
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
#: Network classes a checkpoint may name as ``net._target_``: nothing else is ever built.
ALLOWED_NETS: dict[str, type[nn.Module]] = {
    "ichseg.models.UNet": UNet,
    "ichseg.models.unet.UNet": UNet,
    "ichseg.models.threshold.IntensityBand": IntensityBand,
}
MODES: tuple[str, ...] = ("windowed", "full_slice")
#: Side of the window that ``window_batch_size`` counts; full-slice batches hold as many pixels.
REFERENCE_WINDOW = 160
#: Model batches per progress-bar step (slices are fed to the stitcher in chunks of this size).
BATCHES_PER_CHUNK = 4
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
MASK_SUFFIX = "_ich"
PROBABILITY_SUFFIX = "_prob"
VOLUMES_FILE = "volumes.csv"
VOLUME_COLUMNS: tuple[str, ...] = (
    "file",
    "mask",
    "slices",
    "ich_slices",
    "ich_voxels",
    "voxel_volume_ml",
    "ich_volume_ml",
    "largest_component_ml",
    "seconds",
)
#: Spatial units of a NIfTI header (``xyzt_units``) in millimetres; unknown units count as mm.
UNIT_MM: dict[str, float] = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}


class CheckpointError(ConfigError):
    """A file is not a usable ichseg checkpoint (unreadable, unsafe, or without ichseg metadata)."""


class PredictionFailures(IchsegError):
    """Some scans failed; ``results`` holds the ones that succeeded, ``failures`` the errors."""

    def __init__(self, results: list[ScanResult], failures: list[IchsegError]) -> None:
        self.results = list(results)
        self.failures = list(failures)
        total = len(self.results) + len(self.failures)
        lines = "\n".join(str(failure) for failure in self.failures)
        super().__init__(f"{len(self.failures)} of {total} scan(s) failed:\n{lines}")


# --------------------------------------------------------------------------- the predictor


@dataclass(frozen=True)
class Preprocessing:
    """How slices were prepared in training, from the checkpoint's ``data`` metadata."""

    mode: str  # "windowed" or "full_slice"
    window: int
    stride: int
    working_size: int
    channels: tuple[Any, ...]  # CT window names (or (level, width) pairs), stacked as channels
    working_mode: str = "resize"  # how scans reach the working size: "resize" (NIfTI) or "crop"
    context_slices: int = 0  # 2.5D: neighbouring slices on each side stacked as channels

    @property
    def in_channels(self) -> int:
        """Network input channels: ``len(channels) * (2 * context_slices + 1)``."""
        return input_channels(len(self.channels), self.context_slices)

    @property
    def windows_per_slice(self) -> int:
        """Model inputs per slice: the window grid's size, or 1 for whole slices."""
        if self.mode == "full_slice":
            return 1
        return len(make_grid(self.working_size, self.window, self.stride))


@dataclass
class Predictor:
    """A network with its preprocessing, ready to turn HU volumes into probability maps.

    Build one with :func:`load_predictor`. ``window_batch_size`` counts windows per forward pass
    (full-slice checkpoints run as many whole slices as hold the same number of pixels, at least
    one). ``amp`` autocasts to ``amp_dtype`` on CUDA (bf16 where supported); it does nothing on CPU.
    ``blend_mode`` weighs overlapping windows: ``"constant"`` (the paper's mean) or ``"gaussian"``.
    """

    net: nn.Module
    preprocessing: Preprocessing
    threshold: float = 0.5
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = True
    amp_dtype: torch.dtype = torch.bfloat16
    window_batch_size: int = 64
    blend_mode: str = "constant"
    checkpoint: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def slice_batch_size(self) -> int:
        """Whole slices per forward pass in full-slice mode (same pixels as the window batches)."""
        pixels = self.window_batch_size * REFERENCE_WINDOW**2
        return max(1, pixels // self.preprocessing.working_size**2)

    def working_slices(self, hu: np.ndarray) -> np.ndarray:
        """``(N, C, S, S)`` uint8: the windows of an ``(H, W, N)`` HU volume at the working size.

        The same steps as the training data: uint8 windows, then the working size.
        """
        prep = self.preprocessing
        windows = stack_windows(np.moveaxis(hu, 2, 0), prep.channels, np.uint8)  # (C, N, H, W)
        slices = np.moveaxis(windows, 0, 1)  # (N, C, H, W)
        return np.ascontiguousarray(to_working_size(slices, prep.working_size, prep.working_mode))

    def slice_probabilities(self, slices: np.ndarray, progress: Any = None) -> torch.Tensor:
        """``(N, S, S)`` float32 CPU probabilities of uint8 working-size slices ``(N, C, S, S)``.

        Slices go to the device in chunks (uint8, scaled there as in training); ``progress`` (a
        tqdm bar) advances by the windows (or whole slices) of each chunk. A 2.5D checkpoint
        (``context_slices`` k) gets each chunk with k more slices on either side, so that its
        slices see the same neighbours as in one pass over the whole volume.
        """
        prep = self.preprocessing
        n_slices, size = slices.shape[0], prep.working_size
        per_slice = prep.windows_per_slice
        batch = self.window_batch_size if prep.mode == "windowed" else self.slice_batch_size
        chunk = max(1, -(-batch * BATCHES_PER_CHUNK // per_slice))
        k = prep.context_slices
        out = torch.empty((n_slices, size, size), dtype=torch.float32)
        for start in range(0, n_slices, chunk):
            stop = min(start + chunk, n_slices)
            low, high = max(0, start - k), min(n_slices, stop + k)  # the chunk and its neighbours
            part = torch.from_numpy(slices[low:high])
            images = part.to(self.device, non_blocking=True).to(torch.float32).mul_(1.0 / 255.0)
            context = {"context_slices": k, "rows": slice(start - low, stop - low)}
            if prep.mode == "windowed":
                probabilities = stitch(
                    self.net,
                    images,
                    window=prep.window,
                    stride=prep.stride,
                    window_batch_size=batch,
                    mode=self.blend_mode,  # type: ignore[arg-type]
                    amp=self.amp,
                    amp_dtype=self.amp_dtype,
                    device=self.device,
                    output_device="cpu",
                    **context,
                )
            else:
                probabilities = full_slice(
                    self.net,
                    images,
                    batch_size=batch,
                    amp=self.amp,
                    amp_dtype=self.amp_dtype,
                    device=self.device,
                    output_device="cpu",
                    **context,
                )
            out[start:stop] = probabilities
            if progress is not None:
                progress.update((stop - start) * per_slice)
        return out

    def probabilities(self, hu: np.ndarray, progress: Any = None) -> np.ndarray:
        """``(H, W, N)`` float32 ICH probabilities of an ``(H, W, N)`` int16 HU volume."""
        prep = self.preprocessing
        working = self.slice_probabilities(self.working_slices(hu), progress)
        native = to_original_grid(working, hu.shape[:2], mode=prep.working_mode)  # (N, H, W)
        return np.moveaxis(native, 0, 2)


def predict_volume(
    predictor: Predictor,
    hu: np.ndarray,
    config: PostprocessConfig | None = None,
    progress: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(H, W, N)`` float32 and the binary mask ``(H, W, N)`` bool of a HU volume.

    ``hu`` has slices on its third axis, as the dataset (int16; floats are rounded, see
    :func:`as_hu`). ``config`` defaults to the paper's post-processing at the predictor's threshold;
    its sizes are pixels of the paper's 640 slices, scaled to the scan's grid
    (:func:`morphology_scale`).
    """
    hu = as_hu(hu)
    if config is None:
        config = PostprocessConfig(threshold=predictor.threshold)
    probabilities = predictor.probabilities(hu, progress)
    scale = morphology_scale(hu.shape[:2], predictor.preprocessing)
    mask = postprocess(np.moveaxis(probabilities, 2, 0), config, scale)  # (N, H, W)
    return probabilities, np.moveaxis(mask, 0, 2)


def morphology_scale(shape: Sequence[int], preprocessing: Preprocessing) -> tuple[float, float]:
    """Pixels of a scan's ``(H, W)`` grid per pixel of the paper's 640 slices, per axis, exactly as
    the stitched evaluation scales its morphology (:func:`~ichseg.eval.postprocess.grid_scale`)."""
    return grid_scale(shape, preprocessing.working_size, preprocessing.working_mode)


def as_hu(volume: np.ndarray, name: str = "the volume") -> np.ndarray:
    """An ``(H, W, N)`` HU volume as int16: floats rounded, values clipped to the int16 range.

    Raises :class:`~ichseg.errors.DatasetError` for a volume that is not 3D, has no slices, holds
    NaN or infinite values, or is not numeric.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DatasetError(
            f"{name}: expected a 3D volume with slices on the third axis, got shape {volume.shape}"
        )
    if min(volume.shape) == 0:
        raise DatasetError(f"{name}: the volume is empty (shape {volume.shape})")
    if volume.dtype == np.int16:
        return volume
    if volume.dtype.kind == "f":
        if not np.isfinite(volume).all():
            raise DatasetError(f"{name}: the scan contains NaN or infinite values")
        volume = np.rint(volume)
    elif volume.dtype.kind not in "iu":
        raise DatasetError(f"{name}: unsupported voxel type {volume.dtype} for a CT scan")
    return np.clip(volume, -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``ichseg`` metadata and the ``state_dict`` of a checkpoint, loaded safely.

    ``torch.load(weights_only=True)`` refuses every pickled object other than tensors and plain
    containers, so a file cannot run code while it is read. Raises :class:`CheckpointError` for a
    missing or unreadable file, a file that is not a PyTorch checkpoint, and one without ichseg
    metadata of a supported format and version or without a state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: the checkpoint is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{path}: not an ichseg checkpoint: it holds a Python object ({found.group(1)}) "
                "that a safe (weights-only) load refuses to create"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = detail.group(1).strip() if detail else _first_line(err)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({reason})") from None
    except OSError as err:
        raise CheckpointError(
            f"{path}: cannot be read ({err.strerror or _first_line(err)})"
        ) from None
    except (
        Exception
    ) as err:  # torch raises RuntimeError, EOFError, ValueError... for non-checkpoints
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint file ({_first_line(err)})"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path}: not an ichseg checkpoint (it holds a {type(checkpoint).__name__})"
        )
    meta = checkpoint.get("ichseg")
    if meta is None:
        raise CheckpointError(
            f"{path}: not an ichseg checkpoint: it has no 'ichseg' metadata "
            "(checkpoints written by ichseg.train have it)"
        )
    if not isinstance(meta, Mapping) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not an ichseg checkpoint: its metadata is not of format {CHECKPOINT_FORMAT!r}"
        )
    version = meta.get("version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported by this ichseg "
            f"(supported: {supported}); use the ichseg version that wrote it"
        )
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(
            f"{path}: the checkpoint has no state_dict with the network's weights"
        )
    return dict(meta), dict(state_dict)


def build_net(net_config: Any, source: str = "the checkpoint") -> nn.Module:
    """Instantiate ``net_config`` (``{"_target_": ..., **kwargs}``) from :data:`ALLOWED_NETS` only.

    The target is looked up in the allow-list, never imported; the keyword arguments must be
    plain values accepted by the class.
    """
    if not isinstance(net_config, Mapping) or "_target_" not in net_config:
        raise CheckpointError(f"{source}: the metadata has no network description (net._target_)")
    target = net_config["_target_"]
    net_class = ALLOWED_NETS.get(target) if isinstance(target, str) else None
    if net_class is None:
        allowed = ", ".join(sorted(ALLOWED_NETS))
        raise CheckpointError(
            f"{source}: the network class {target!r} may not be built from a checkpoint "
            f"(allowed: {allowed})"
        )
    kwargs = {key: value for key, value in net_config.items() if key != "_target_"}
    for key, value in kwargs.items():
        if not isinstance(key, str) or key.startswith("_") or not _is_plain(value):
            raise CheckpointError(
                f"{source}: unsupported network option {key!r}={value!r} for {target}"
            )
    try:
        inspect.signature(net_class).bind(**kwargs)
    except TypeError as err:
        raise CheckpointError(f"{source}: the options of {target} do not fit it ({err})") from None
    try:
        return net_class(**kwargs)
    except (TypeError, ValueError, ConfigError) as err:
        raise CheckpointError(f"{source}: cannot build {target} ({_first_line(err)})") from None


def network_weights(
    state_dict: Mapping[str, Any], source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """The network's weights: ``net.``-prefixed entries of a LightningModule state dict, unprefixed.

    A ``torch.compile`` wrapper's ``_orig_mod.`` prefix is removed too.
    """
    weights = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key.startswith("net."):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: state_dict entry {key!r} is not a tensor")
        name = key[len("net.") :]
        weights[name.removeprefix("_orig_mod.")] = value
    if not weights:
        raise CheckpointError(
            f"{source}: the state_dict has no network weights (keys starting with 'net.')"
        )
    return weights


def preprocessing_from_meta(
    meta: Mapping[str, Any], source: str = "the checkpoint"
) -> Preprocessing:
    """The :class:`Preprocessing` recorded in the checkpoint's ``data`` metadata, validated."""
    data = meta.get("data")
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{source}: the metadata has no 'data' section (preprocessing)")
    mode = data.get("mode", "windowed")
    if mode not in MODES:
        raise CheckpointError(f"{source}: data mode {mode!r} is not one of {', '.join(MODES)}")
    sizes = {}
    for key, default in (("window", 160), ("stride", 80), ("working_size", 640)):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{source}: data.{key} must be a positive integer, got {value!r}")
        sizes[key] = value
    channels = data.get("channels", ["brain"])
    if isinstance(channels, str) or not isinstance(channels, Sequence) or not channels:
        raise CheckpointError(
            f"{source}: data.channels must be a non-empty list of CT windows, got {channels!r}"
        )
    channels = tuple(tuple(c) if isinstance(c, list) else c for c in channels)
    for channel in channels:
        try:
            get_window(channel)
        except (ConfigError, TypeError, ValueError):
            raise CheckpointError(
                f"{source}: data.channels holds an unknown CT window {channel!r}"
            ) from None
    working_mode = data.get("working_mode") or "auto"
    if working_mode == "auto":
        working_mode = "resize"  # the NIfTI release's way to the working size
    if working_mode not in ("resize", "crop"):
        raise CheckpointError(
            f"{source}: data.working_mode {working_mode!r} is not auto, resize or crop"
        )
    if mode == "windowed" and sizes["window"] > sizes["working_size"]:
        raise CheckpointError(
            f"{source}: the window ({sizes['window']}) is larger than the working size "
            f"({sizes['working_size']})"
        )
    try:  # absent in checkpoints before 2.5D input
        context_slices = check_context_slices(data.get("context_slices") or 0)
    except ConfigError as error:
        raise CheckpointError(f"{source}: data.{error}") from None
    return Preprocessing(
        mode, sizes["window"], sizes["stride"], sizes["working_size"], channels, working_mode,
        context_slices,
    )  # fmt: skip


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the named device, which must exist."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device=cuda was asked for but no CUDA GPU is available; use device=auto or cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))"
            )
    elif resolved.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu or cuda")
    return resolved


def load_predictor(
    ckpt: str | os.PathLike[str],
    device: str | torch.device = "auto",
    amp: bool = True,
    window_batch_size: int = 64,
    threshold: float | None = None,
    blend_mode: str = "constant",
) -> Predictor:
    """Rebuild the network and its preprocessing from an ichseg checkpoint, safely.

    ``threshold`` overrides the checkpoint's threshold (``meta["threshold"]``, else 0.5).
    Raises :class:`CheckpointError` for anything that is not a usable ichseg checkpoint.
    """
    path = Path(ckpt)
    meta, state_dict = read_checkpoint(path)
    preprocessing = preprocessing_from_meta(meta, str(path))
    net = build_net(meta.get("net"), str(path))
    expected = meta["net"].get("in_channels")
    if isinstance(expected, int) and expected != preprocessing.in_channels:
        context = preprocessing.context_slices
        slices = f" x {2 * context + 1} slices (context_slices={context})" if context else ""
        raise CheckpointError(
            f"{path}: the network takes {expected} input channel(s) but data.channels lists "
            f"{len(preprocessing.channels)}{slices}"
        )
    depth = getattr(net, "depth", None)
    side = preprocessing.window if preprocessing.mode == "windowed" else preprocessing.working_size
    if isinstance(depth, int) and side % 2**depth:
        raise CheckpointError(
            f"{path}: the input size {side} is not divisible by 2**depth = {2**depth}"
        )
    weights = network_weights(state_dict, str(path))
    mismatch = _weights_mismatch(net, weights)
    if mismatch:
        raise CheckpointError(
            f"{path}: the weights do not fit the network described in the metadata ({mismatch})"
        )
    net.load_state_dict(weights, strict=True)
    if threshold is None:
        threshold = meta.get("threshold", 0.5)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0 <= threshold <= 1
    ):
        raise ConfigError(f"the probability threshold must lie in [0, 1], got {threshold!r}")
    if (
        isinstance(window_batch_size, bool)
        or not isinstance(window_batch_size, int)
        or window_batch_size < 1
    ):
        raise ConfigError(
            f"window_batch_size must be a positive integer, got {window_batch_size!r}"
        )
    if blend_mode not in BLEND_MODES:
        raise ConfigError(f"blend_mode must be one of {', '.join(BLEND_MODES)}, not {blend_mode!r}")
    run_device = resolve_device(device)
    net.eval().requires_grad_(False).to(run_device)
    amp_dtype = torch.bfloat16
    if run_device.type == "cuda" and not torch.cuda.is_bf16_supported():
        amp_dtype = torch.float16
    return Predictor(
        net=net,
        preprocessing=preprocessing,
        threshold=float(threshold),
        device=run_device,
        amp=bool(amp),
        amp_dtype=amp_dtype,
        window_batch_size=window_batch_size,
        blend_mode=blend_mode,
        checkpoint=path,
        meta=meta,
    )


# --------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class VolumeStats:
    """ICH volume of one binary mask: counts, and volumes in mL from the voxel volume."""

    slices: int
    ich_slices: int
    ich_voxels: int
    largest_component_voxels: int
    voxel_volume_ml: float

    @property
    def ich_volume_ml(self) -> float:
        """Voxel count x voxel volume."""
        return self.ich_voxels * self.voxel_volume_ml

    @property
    def largest_component_ml(self) -> float:
        """Volume of the largest face-connected 3D component."""
        return self.largest_component_voxels * self.voxel_volume_ml


def volume_stats(mask: np.ndarray, voxel_volume_ml: float) -> VolumeStats:
    """Volume figures of an ``(H, W, N)`` mask (slices on the third axis).

    Components are face-connected in 3D (6 neighbours; ``scipy.ndimage.label``'s default).
    """
    mask = np.asarray(mask, dtype=bool)
    components, count = ndimage.label(mask)
    largest = int(np.bincount(components.ravel())[1:].max()) if count else 0
    return VolumeStats(
        slices=int(mask.shape[2]),
        ich_slices=int(mask.any(axis=(0, 1)).sum()),
        ich_voxels=int(np.count_nonzero(mask)),
        largest_component_voxels=largest,
        voxel_volume_ml=float(voxel_volume_ml),
    )


def voxel_volume_ml(header: Any) -> float:
    """Voxel volume in mL from a NIfTI header's zooms and spatial units (NaN if unusable)."""
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    unit = header.get_xyzt_units()[0]
    zooms = zooms * UNIT_MM.get(unit, 1.0)
    if zooms.size != 3 or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        return math.nan
    return float(np.prod(zooms)) / 1000.0


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ScanInput:
    """One input scan: its file and the name its outputs are given (``<name>_ich.nii.gz``)."""

    path: Path
    name: str


@dataclass(frozen=True)
class ScanResult:
    """What prediction wrote for one scan and the volume figures of its mask."""

    input: Path
    mask_path: Path
    probability_path: Path | None
    stats: VolumeStats
    seconds: float

    def row(self) -> dict[str, str]:
        """The scan's ``volumes.csv`` row."""
        stats = self.stats
        return {
            "file": str(self.input),
            "mask": self.mask_path.name,
            "slices": str(stats.slices),
            "ich_slices": str(stats.ich_slices),
            "ich_voxels": str(stats.ich_voxels),
            "voxel_volume_ml": f"{stats.voxel_volume_ml:.6g}",
            "ich_volume_ml": f"{stats.ich_volume_ml:.4f}",
            "largest_component_ml": f"{stats.largest_component_ml:.4f}",
            "seconds": f"{self.seconds:.2f}",
        }


def nifti_stem(path: Path) -> str | None:
    """The name without ``.nii`` / ``.nii.gz`` (case-insensitive), or None for another file."""
    lower = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def find_inputs(source: str | os.PathLike[str]) -> list[ScanInput]:
    """The scans of ``source``: a NIfTI file, a folder of them, or a CT-ICH NIfTI release root.

    A folder's own ``.nii`` / ``.nii.gz`` files are taken (not its subfolders), except earlier
    outputs (``*_ich`` / ``*_prob``); a release root contributes ``ct_scans/``. The JPG release is
    refused: its 8-bit images carry neither Hounsfield units nor voxel sizes.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: input not found", source)
    if source.is_file():
        name = nifti_stem(source)
        if name is None:
            raise DatasetError(f"{source}: not a NIfTI file (expected .nii or .nii.gz)", source)
        return [ScanInput(source, name)]
    folder = source
    try:
        root, release = find_release(source)
    except DatasetError:
        root, release = None, None
    if release == "jpg":
        raise DatasetError(
            f"{root}: the CT-ICH JPG release (1.0-1.2) cannot be used for prediction: its 8-bit "
            "window images have no Hounsfield units and no voxel size; use the NIfTI release 1.3.x",
            root,
        )
    if release == "nifti" and root is not None:
        folder = root / "ct_scans"
        if not folder.is_dir():
            raise DatasetError(f"{folder}: the NIfTI release has no ct_scans/ folder", folder)
    scans = []
    for path in sorted(folder.iterdir()):
        name = nifti_stem(path)
        if name is None or not path.is_file():
            continue
        if folder == source and name.endswith((MASK_SUFFIX, PROBABILITY_SUFFIX)):
            continue  # an earlier prediction written into the input folder
        scans.append(ScanInput(path, name))
    if not scans:
        raise DatasetError(f"{folder}: no NIfTI scans (.nii or .nii.gz) in this folder", folder)
    names: dict[str, Path] = {}
    for scan in scans:
        if scan.name in names:
            raise DatasetError(
                f"{scan.path}: two scans named {scan.name!r} ({names[scan.name].name} and "
                f"{scan.path.name}) would write the same outputs",
                scan.path,
            )
        names[scan.name] = scan.path
    return scans


def load_nifti(
    path: str | os.PathLike[str], header_only: bool = False
) -> tuple[np.ndarray | None, Any]:
    """An ``(H, W, N)`` int16 HU volume (None with ``header_only``) and its nibabel image.

    Raises :class:`~ichseg.errors.DatasetError` naming the file for a missing or unreadable file,
    a volume that is not 3D, or NaN / infinite values.
    """
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(path, mmap=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found", path) from None
    except Exception as err:  # nibabel raises many types for a bad header
        raise DatasetError(f"{path}: unreadable NIfTI ({_first_line(err)})", path) from None
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise DatasetError(f"{path}: not a NIfTI image ({type(image).__name__})", path)
    if len(image.shape) != 3:
        raise DatasetError(
            f"{path}: expected a 3D volume with slices on the third axis, "
            f"got shape {tuple(image.shape)}",
            path,
        )
    if header_only:
        return None, image
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # truncated or corrupt data block
        raise DatasetError(
            f"{path}: unreadable NIfTI data, the file may be truncated ({_first_line(err)})", path
        ) from None
    return as_hu(data, str(path)), image


def save_like(reference: Any, data: np.ndarray, target: Path, description: str) -> None:
    """Write ``data`` atomically as a NIfTI with ``reference``'s affine and header.

    The header keeps the orientation (qform / sform and their codes), zooms and units; its data
    type is set to ``data``'s, the intensity scaling is reset, ``cal_min`` / ``cal_max`` are 0 / 1.
    """
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0.0, 1.0
    header["descrip"] = description.encode("ascii")[:79]
    # the affine is the header's own best affine, so nibabel leaves qform / sform as they are
    image = type(reference)(data, reference.affine, header)
    with atomic_path(target) as tmp:
        image.to_filename(str(tmp))


def prepare_output(output: str | os.PathLike[str]) -> Path:
    """Create the output folder if needed and check that files can be written into it."""
    output = Path(output)
    if nifti_stem(output) is not None:
        raise ConfigError(
            f"{output}: output is the folder for the masks and volumes.csv, not a NIfTI file name"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{output}: the output exists and is not a folder") from None
    except OSError as err:
        raise ConfigError(
            f"{output}: cannot create the output folder ({err.strerror or err})"
        ) from None
    if not output.is_dir():
        raise ConfigError(f"{output}: the output exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise ConfigError(
            f"{output}: the output folder is not writable ({err.strerror or err})"
        ) from None
    return output


def write_volumes(results: Sequence[ScanResult], target: Path) -> None:
    """Write ``volumes.csv`` (one row per scan, :data:`VOLUME_COLUMNS`) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=VOLUME_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.row() for result in results)
    atomic_write_text(target, buffer.getvalue())


def predict_file(
    predictor: Predictor,
    scan: ScanInput,
    output: Path,
    config: PostprocessConfig | None = None,
    save_probabilities: bool = False,
    progress: Any = None,
) -> ScanResult:
    """Predict one NIfTI scan and write ``<name>_ich.nii.gz`` (and ``<name>_prob.nii.gz``)."""
    start = time.perf_counter()
    hu, image = load_nifti(scan.path)
    assert hu is not None
    probabilities, mask = predict_volume(predictor, hu, config, progress)
    mask_path = output / f"{scan.name}{MASK_SUFFIX}.nii.gz"
    probability_path = (
        output / f"{scan.name}{PROBABILITY_SUFFIX}.nii.gz" if save_probabilities else None
    )
    try:
        save_like(image, mask.astype(np.uint8), mask_path, "ichseg ICH mask")
        if probability_path is not None:
            save_like(
                image,
                probabilities.astype(np.float32, copy=False),
                probability_path,
                "ichseg ICH probability",
            )
    except OSError as err:
        raise DatasetError(
            f"{output}: cannot write the prediction of {scan.path.name} ({err.strerror or err})",
            output,
        ) from None
    stats = volume_stats(mask, voxel_volume_ml(image.header))
    return ScanResult(scan.path, mask_path, probability_path, stats, time.perf_counter() - start)


def predict_files(
    predictor: Predictor,
    scans: Sequence[ScanInput],
    output: str | os.PathLike[str],
    config: PostprocessConfig | None = None,
    save_probabilities: bool = False,
    progress: bool = True,
    on_result: Callable[[ScanResult], None] | None = None,
) -> list[ScanResult]:
    """Predict every scan into ``output`` and keep ``output/volumes.csv`` up to date.

    Each scan's files, and ``volumes.csv`` after each scan, are written atomically, so an
    interrupted run leaves only complete files. A scan that fails (unreadable, NaN, not 3D, ...)
    is skipped and the others go on; then :class:`PredictionFailures` is raised, listing them.
    ``progress`` shows tqdm bars over scans and over the windows of the current scan (on a
    terminal only).
    """
    from tqdm.auto import tqdm

    output = prepare_output(output)
    results: list[ScanResult] = []
    failures: list[IchsegError] = []
    per_slice = predictor.preprocessing.windows_per_slice
    unit = "window" if predictor.preprocessing.mode == "windowed" else "slice"
    disable = None if progress else True  # None: only on a terminal
    with tqdm(scans, desc="scans", unit="scan", disable=disable, position=0) as bar:
        for scan in bar:
            bar.set_postfix_str(scan.name)
            try:
                _, header_image = load_nifti(scan.path, header_only=True)
                total = int(header_image.shape[2]) * per_slice
                with tqdm(
                    total=total, desc=scan.name, unit=unit, leave=False, disable=disable, position=1
                ) as inner:
                    result = predict_file(
                        predictor, scan, output, config, save_probabilities, inner
                    )
            except IchsegError as err:
                failures.append(err)
                continue
            except torch.cuda.OutOfMemoryError:
                failures.append(
                    ConfigError(
                        f"{scan.path}: out of {predictor.device.type.upper()} memory; "
                        "lower window_batch_size"
                    )
                )
                continue
            results.append(result)
            write_volumes(results, output / VOLUMES_FILE)
            if on_result is not None:
                on_result(result)
    if failures:
        if len(failures) == 1 and not results:
            raise failures[0]
        raise PredictionFailures(results, failures)
    return results


# --------------------------------------------------------------------------- command line


@dataclass
class PredictOptions:
    """The command's ``key=value`` options (see :data:`OPTION_HELP`)."""

    ckpt: Path | None = None
    input: Path | None = None
    output: Path | None = None
    threshold: float | None = None
    postprocess: bool = True
    closing: int = 10
    opening: int = 5
    save_probabilities: bool = False
    device: str = "auto"
    window_batch_size: int = 64
    amp: bool = True
    blend_mode: str = "constant"
    progress: bool = True

    def postprocess_config(self, threshold: float) -> PostprocessConfig:
        """Threshold and morphology as asked (``postprocess=false``: threshold only)."""
        if self.postprocess:
            return PostprocessConfig(
                threshold=threshold, closing_size=self.closing, opening_size=self.opening
            )
        return PostprocessConfig(threshold=threshold, closing_size=0, opening_size=0)


REQUIRED_OPTIONS: tuple[str, ...] = ("ckpt", "input", "output")
OPTION_HELP: dict[str, str] = {
    "ckpt": "checkpoint written by ichseg.train (required)",
    "input": "a .nii/.nii.gz scan, a folder of them, or a CT-ICH NIfTI release root (required)",
    "output": "folder for <name>_ich.nii.gz, <name>_prob.nii.gz and volumes.csv (required)",
    "threshold": "probability threshold (default: the checkpoint's, else 0.5)",
    "postprocess": "closing then opening after the threshold, as the paper (default true)",
    "closing": "closing square in pixels of 640x640 slices (default 10; <=1: off)",
    "opening": "opening square in pixels of 640x640 slices (default 5; <=1: off)",
    "save_probabilities": "also write <name>_prob.nii.gz, float32 (default false)",
    "device": "auto (CUDA when available), cpu or cuda (default auto)",
    "window_batch_size": "windows per forward pass (default 64)",
    "amp": "bf16 autocast on CUDA (default true; no effect on CPU)",
    "blend_mode": "overlapping windows: constant (the paper's average) or gaussian",
    "progress": "progress bars on a terminal (default true)",
}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def usage() -> str:
    """The command's help text."""
    width = max(len(name) for name in OPTION_HELP)
    lines = [
        f"usage: {_prog()} ckpt=PATH input=PATH output=DIR [key=value ...]",
        "",
        "Segment ICH in head CT scans with a trained ichseg checkpoint.",
        "",
        "options:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in OPTION_HELP.items()]
    return "\n".join(lines)


def _convert(name: str, text: str, kind: str) -> Any:
    lowered = text.strip().lower()
    if kind == "bool":
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"option {name} takes true or false, not {text!r}")
    if kind == "optional_float" and lowered in ("null", "none", ""):
        return None
    if kind in ("float", "optional_float"):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"option {name} takes a number, not {text!r}") from None
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"option {name} takes an integer, not {text!r}") from None
    if kind == "path":
        if not text:
            raise ConfigError(f"option {name} needs a path")
        return Path(text).expanduser()
    return text


_KINDS: dict[str, str] = {
    "ckpt": "path",
    "input": "path",
    "output": "path",
    "threshold": "optional_float",
    "postprocess": "bool",
    "closing": "int",
    "opening": "int",
    "save_probabilities": "bool",
    "device": "str",
    "window_batch_size": "int",
    "amp": "bool",
    "blend_mode": "str",
    "progress": "bool",
}


def parse_options(arguments: Sequence[str]) -> PredictOptions:
    """Parse Hydra-style ``key=value`` arguments (a leading ``+`` or ``++`` is accepted)."""
    known = [f.name for f in fields(PredictOptions)]
    values: dict[str, Any] = {}
    for argument in arguments:
        if "=" not in argument:
            raise ConfigError(
                f"expected key=value arguments such as input=scan.nii.gz, got {argument!r}"
            )
        key, text = argument.split("=", 1)
        key = key.strip().lstrip("+")
        if key not in known:
            raise ConfigError(f"unknown option {key!r}; options are {', '.join(known)}")
        if key in values:
            raise ConfigError(f"option {key} is given twice")
        values[key] = _convert(key, text, _KINDS[key])
    missing = [name for name in REQUIRED_OPTIONS if name not in values]
    if missing:
        needed = " ".join(f"{name}=..." for name in missing)
        raise ConfigError(
            f"missing {needed}; usage: {_prog()} ckpt=PATH input=PATH output=DIR [key=value ...]"
        )
    return replace(PredictOptions(), **values)


def run(options: PredictOptions) -> list[ScanResult]:
    """Predict as the options say; print a line per scan; return the results."""
    from tqdm.auto import tqdm

    assert options.ckpt is not None and options.input is not None and options.output is not None
    scans = find_inputs(options.input)
    for scan in scans:  # fail before the model loads on a scan that is not a readable 3D volume
        load_nifti(scan.path, header_only=True)
    output = prepare_output(options.output)
    predictor = load_predictor(
        options.ckpt,
        options.device,
        options.amp,
        options.window_batch_size,
        options.threshold,
        options.blend_mode,
    )
    config = options.postprocess_config(predictor.threshold)

    def report(result: ScanResult) -> None:
        stats = result.stats
        line = (
            f"{result.input.name}: {stats.ich_volume_ml:.2f} mL ICH in {stats.ich_slices} of "
            f"{stats.slices} slices (largest component {stats.largest_component_ml:.2f} mL), "
            f"{result.seconds:.1f} s -> {result.mask_path}"
        )
        tqdm.write(line, file=sys.stdout)  # above the progress bars, which stay intact
        sys.stdout.flush()

    results = predict_files(
        predictor,
        scans,
        output,
        config,
        options.save_probabilities,
        options.progress,
        on_result=report,
    )
    print(f"volumes: {output / VOLUMES_FILE}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``ichseg-predict``)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in arguments):
        print(usage())
        return 0

    def execute() -> int:
        run(parse_options(arguments))
        return 0

    return run_cli(execute, _prog())


def _prog() -> str:
    return "ichseg-predict" if Path(sys.argv[0]).name == "ichseg-predict" else PROG


def _weights_mismatch(net: nn.Module, weights: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``weights`` from loading strictly into ``net``, or None when they fit."""
    expected = net.state_dict()
    problems = []
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    resized = [
        f"{name} {tuple(weights[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in weights and weights[name].shape != tensor.shape
    ]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", resized)):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            problems.append(f"{label}: {names[0]}{more}")
    return "; ".join(problems) or None


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    return False


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


if __name__ == "__main__":
    raise SystemExit(main())
