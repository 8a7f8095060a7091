"""The ichseg checkpoint: what a trained model carries so that prediction and re-evaluation rebuild
exactly what the report scored (docs/predict.md, "Checkpoint format").

A Lightning checkpoint written by ``ichseg.train`` holds, besides the weights, plain data under
``checkpoint["ichseg"]`` (format ``"ichseg-checkpoint"``, version :data:`FORMAT_VERSION`)::

    net               {"_target_": "ichseg.models.UNet", **constructor arguments}
    input             InputSpec.to_dict()       how slices become network inputs
    inference         InferenceSpec.to_dict()   blending, batch, autocast, threshold, morphology
    operating_point   where threshold and post-processing came from: "configured", or
                      "tuned on val" with the validation Dice that chose them
    train_overrides   the command-line overrides of the training run (``ichseg.evaluate``)
    ichseg_version

Version 1 (``data`` and ``threshold`` instead of ``input`` / ``inference``) still loads: its
inference spec is the defaults at its threshold. Files are read with
``torch.load(weights_only=True)`` (tensors and plain containers only) and the network is built
only from :data:`ALLOWED_NETS`, so a checkpoint cannot run code.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ichseg.errors import ConfigError, first_line
from ichseg.models.intensity_band import IntensityBand
from ichseg.models.unet import UNet
from ichseg.specs import InferenceSpec, InputSpec
from ichseg.utils.atomic import atomic_path

CHECKPOINT_FORMAT = "ichseg-checkpoint"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2)
#: Network classes a checkpoint may name as ``net._target_``: nothing else is ever built.
ALLOWED_NETS: dict[str, type[nn.Module]] = {
    "ichseg.models.UNet": UNet,
    "ichseg.models.unet.UNet": UNet,
    "ichseg.models.intensity_band.IntensityBand": IntensityBand,
    "ichseg.models.threshold.IntensityBand": IntensityBand,
}


class CheckpointError(ConfigError):
    """A file is not a usable ichseg checkpoint (unreadable, unsafe, or without ichseg metadata)."""


#: The attribute of a network built by :func:`load_model` that names its checkpoint file (the
#: predictor names it when the network's outputs are not finite).
CHECKPOINT_ATTRIBUTE = "ichseg_checkpoint"


def make_meta(
    net: Mapping[str, Any],
    input_spec: InputSpec,
    inference_spec: InferenceSpec,
    train_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The ``checkpoint["ichseg"]`` metadata of a model trained with these specs (plain data)."""
    from ichseg import __version__

    return {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "ichseg_version": __version__,
        "net": dict(net),
        "input": input_spec.to_dict(),
        "inference": inference_spec.to_dict(),
        "operating_point": {
            "source": "configured",
            "threshold": inference_spec.threshold,
            "postprocess": inference_spec.postprocess,
        },
        "train_overrides": list(train_overrides or []),
    }


def specs_from_meta(
    meta: Mapping[str, Any], source: str = "the checkpoint"
) -> tuple[InputSpec, InferenceSpec]:
    """The :class:`InputSpec` and :class:`InferenceSpec` recorded in checkpoint metadata."""
    try:
        if meta.get("version") == 1:
            return _v1_specs(meta)
        for key in ("input", "inference"):
            if not isinstance(meta.get(key), Mapping):
                raise ConfigError(f"the metadata has no {key!r} spec")
        return InputSpec.from_dict(meta["input"]), InferenceSpec.from_dict(meta["inference"])
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{source}: {error}") from None


def _v1_specs(meta: Mapping[str, Any]) -> tuple[InputSpec, InferenceSpec]:
    """Version 1 metadata: ``data`` (window, stride, ...) and ``threshold``."""
    data = meta.get("data")
    if not isinstance(data, Mapping):
        raise ConfigError("the metadata has no 'data' section (preprocessing)")
    working_mode = data.get("working_mode") or "auto"
    input_spec = InputSpec(
        mode=data.get("mode", "windowed"),
        tile_size=data.get("window", 160),
        tile_stride=data.get("stride", 80),
        working_size=data.get("working_size", 640),
        working_mode="resize" if working_mode == "auto" else working_mode,
        channels=data.get("channels", ["brain"]),
        context_slices=data.get("context_slices") or 0,
    )
    return input_spec, InferenceSpec(threshold=meta.get("threshold", 0.5))


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint's network (weights loaded, eval mode, on the CPU) and its two specs."""

    path: Path
    net: nn.Module
    input_spec: InputSpec
    inference_spec: InferenceSpec
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def operating_point(self) -> dict[str, Any]:
        """Where the stored threshold and post-processing came from (``source`` ...)."""
        point = self.meta.get("operating_point")
        if isinstance(point, Mapping):
            return dict(point)
        return {"source": f"checkpoint format {self.meta.get('version')}"}


def load_model(path: str | os.PathLike[str]) -> TrainedModel:
    """Read a checkpoint safely and rebuild its network and specs.

    Raises :class:`CheckpointError` for anything that is not a usable ichseg checkpoint (one line
    naming the file), including one whose weights hold NaN or infinite values or whose network
    gives NaN or infinite logits on a small test input (a run that diverged: its probabilities
    would be NaN, its masks empty).
    """
    path = Path(path)
    meta, state_dict = read_checkpoint(path)
    input_spec, inference_spec = specs_from_meta(meta, str(path))
    net = build_net(meta.get("net"), str(path))
    expected = meta["net"].get("in_channels")
    if isinstance(expected, int) and expected != input_spec.in_channels:
        context = input_spec.context_slices
        slices = f" x {2 * context + 1} slices (context_slices={context})" if context else ""
        raise CheckpointError(
            f"{path}: the network takes {expected} input channel(s) but the input spec lists "
            f"{len(input_spec.channels)} CT window(s){slices}"
        )
    depth = getattr(net, "depth", None)
    side = input_spec.input_size
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
    check_finite_weights(weights, str(path))
    net.load_state_dict(weights, strict=True)
    net.eval().requires_grad_(False)
    check_finite_outputs(net, input_spec.in_channels, depth, str(path))
    setattr(net, CHECKPOINT_ATTRIBUTE, str(path))
    return TrainedModel(path, net, input_spec, inference_spec, dict(meta))


def store_operating_point(
    path: str | os.PathLike[str], inference_spec: InferenceSpec, record: Mapping[str, Any]
) -> None:
    """Write a chosen operating point into a checkpoint's metadata, atomically: its
    ``inference`` spec and the ``operating_point`` record (where the choice came from)."""
    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    meta = dict(checkpoint.get("ichseg") or {})
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: only format-{FORMAT_VERSION} ichseg checkpoints can store an operating point"
        )
    meta["inference"] = inference_spec.to_dict()
    meta["operating_point"] = dict(record)
    checkpoint["ichseg"] = meta
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


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
        reason = detail.group(1).strip() if detail else first_line(err)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({reason})") from None
    except OSError as err:
        raise CheckpointError(
            f"{path}: cannot be read ({err.strerror or first_line(err)})"
        ) from None
    except (
        Exception
    ) as err:  # torch raises RuntimeError, EOFError, ValueError... for non-checkpoints
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint file ({first_line(err)})"
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
        raise CheckpointError(f"{source}: cannot build {target} ({first_line(err)})") from None


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


def check_finite_weights(weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` when a floating-point weight holds NaN or inf."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{source}: the weight {name} holds {bad} NaN or infinite value(s): the training "
                "run diverged before this checkpoint was saved, so its predictions would be NaN; "
                "use a checkpoint of an earlier epoch or retrain with a lower learning rate"
            )


def check_finite_outputs(net: nn.Module, channels: int, depth: Any, source: str) -> None:
    """Raise :class:`CheckpointError` when ``net`` gives NaN or infinite logits on a small test
    input (a ramp in [0, 1], ``4 * 2**depth`` pixels square: milliseconds): finite but huge
    weights overflow, which the weights alone do not show."""
    side = 4 * 2**depth if isinstance(depth, int) else 64
    probe = torch.linspace(0.0, 1.0, channels * side * side).reshape(1, channels, side, side)
    with torch.inference_mode():
        logits = net(probe)
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            f"{source}: the network gives NaN or infinite outputs on a test input (its weights "
            "are finite but far too large: the training run diverged before this checkpoint was "
            "saved); use a checkpoint of an earlier epoch or retrain with a lower learning rate"
        )


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
