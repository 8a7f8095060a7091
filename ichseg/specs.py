"""The two value objects that describe a trained model's inputs and how it is applied.

* :class:`InputSpec`: how CT slices become network inputs (data mode, tile grid, working size and
  how scans reach it, CT windows as channels, 2.5D context). The DataModule resolves it
  (:attr:`ichseg.data.CTICHDataModule.input_spec`); the network's input channels follow from it.
* :class:`InferenceSpec`: how a network is applied to a whole scan and its probabilities turned
  into a mask (tile blending, batch size, autocast, threshold, closing / opening).

Both are frozen, validated once in ``__post_init__``, and round-trip through plain data
(:meth:`~InputSpec.to_dict` / :meth:`~InputSpec.from_dict`), which is how checkpoints carry them
(docs/predict.md, "Checkpoint format"). The stitched evaluation and ``ichseg.predict`` both build
an :class:`ichseg.inference.Predictor` from the same two specs, so that a mask written by
prediction is the mask the report scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ichseg.errors import ConfigError

DATA_MODES: tuple[str, ...] = ("windowed", "full_slice")
WORKING_MODES: tuple[str, ...] = ("resize", "crop")
BLENDS: tuple[str, ...] = ("constant", "gaussian")
AUTOCASTS: tuple[str, ...] = ("auto", "none", "bf16", "fp16")
ORDERS: tuple[str, ...] = ("close-open", "open-close")
CONVENTIONS: tuple[str, ...] = ("opencv", "symmetric")
#: Slice size at which closing / opening sizes are given (the paper's 640 x 640 slices).
REFERENCE_SIZE = 640


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}.{name} must be a positive integer, got {value!r}")
    return value


def _choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def _from_mapping(cls: type, data: Any, owner: str) -> Any:
    """``cls(**data)`` for a mapping whose keys are all fields of ``cls`` (one line otherwise)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{owner} must be a mapping of its fields, not {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(
            f"{owner}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    return cls(**dict(data))


@dataclass(frozen=True)
class InputSpec:
    """How slices are prepared for the network, exactly as in training.

    Attributes:
        mode: ``"windowed"`` (tiles of ``tile_size`` with ``tile_stride``, the paper) or
            ``"full_slice"`` (whole working-size slices, one tile per slice).
        tile_size, tile_stride: the tile grid on a working-size slice (160 / 80 on 640: 7 x 7).
        working_size: side of the square working slices (640).
        working_mode: how scans reach the working size: ``"resize"`` (bilinear; the NIfTI release,
            512 -> 640) or ``"crop"`` (an equal border removed; the JPG release, 650 -> 640).
        channels: CT windows stacked as channels (names such as ``"brain"`` or
            ``(level, width)`` pairs, :func:`ichseg.data.windowing.get_window`).
        context_slices: 2.5D input: ``k`` neighbouring slices on each side as more channels.
        orientation: the array orientation of the training scans (codes such as
            ``("L", "A", "S")``, :mod:`ichseg.io.orientation`): prediction brings a scan to it
            before the network sees it. None: not recorded (the JPG release; checkpoints of
            earlier versions), taken to be CT-ICH's ``("L", "A", "S")``.
    """

    mode: str = "windowed"
    tile_size: int = 160
    tile_stride: int = 80
    working_size: int = 640
    working_mode: str = "resize"
    channels: tuple[Any, ...] = ("brain",)
    context_slices: int = 0
    orientation: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        from ichseg.data.tiles import check_context_slices
        from ichseg.data.windowing import get_window
        from ichseg.io.orientation import check_codes

        owner = "input spec"
        _choice(owner, "mode", self.mode, DATA_MODES)
        _choice(owner, "working_mode", self.working_mode, WORKING_MODES)
        for name in ("tile_size", "tile_stride", "working_size"):
            _positive_int(owner, name, getattr(self, name))
        channels = self.channels
        if isinstance(channels, str) or not isinstance(channels, Sequence) or not channels:
            raise ConfigError(f"{owner}.channels must be a non-empty list of CT windows")
        channels = tuple(tuple(c) if isinstance(c, (list, tuple)) else c for c in channels)
        for channel in channels:
            try:
                get_window(channel)
            except (ConfigError, TypeError, ValueError):
                raise ConfigError(f"{owner}.channels: unknown CT window {channel!r}") from None
        object.__setattr__(self, "channels", channels)
        try:
            check_context_slices(self.context_slices)
        except ConfigError as error:
            raise ConfigError(f"{owner}.{error}") from None
        if self.orientation is not None:
            codes = self.orientation
            if isinstance(codes, str) or not isinstance(codes, Sequence):
                raise ConfigError(f"{owner}.orientation must be three axis codes, got {codes!r}")
            try:
                object.__setattr__(self, "orientation", check_codes(codes, f"{owner}.orientation"))
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.mode == "windowed" and self.tile_size > self.working_size:
            raise ConfigError(
                f"{owner}: the tile ({self.tile_size}) is larger than the working size "
                f"({self.working_size})"
            )

    @property
    def in_channels(self) -> int:
        """Network input channels: ``len(channels) * (2 * context_slices + 1)``."""
        from ichseg.data.tiles import input_channels

        return input_channels(len(self.channels), self.context_slices)

    @property
    def input_size(self) -> int:
        """Side of one network input: the tile, or the whole working slice."""
        return self.working_size if self.mode == "full_slice" else self.tile_size

    @property
    def grid(self) -> Any:
        """The :class:`~ichseg.data.tiles.TileGrid` of tiles on a working slice (one tile in
        full-slice mode)."""
        from ichseg.data.tiles import make_grid

        if self.mode == "full_slice":
            return make_grid(self.working_size, self.working_size, self.working_size)
        return make_grid(self.working_size, self.tile_size, self.tile_stride)

    @property
    def tiles_per_slice(self) -> int:
        """Network inputs per slice."""
        return len(self.grid)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples), as checkpoints store it."""
        data = asdict(self)
        data["channels"] = [list(c) if isinstance(c, tuple) else c for c in self.channels]
        data["orientation"] = None if self.orientation is None else list(self.orientation)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        """The spec from :meth:`to_dict`'s plain data; unknown keys are refused."""
        return _from_mapping(cls, data, "input spec")


@dataclass(frozen=True)
class InferenceSpec:
    """How a network is applied to whole scans and its probabilities turned into masks.

    Attributes:
        blend: weights of overlapping tiles: ``"constant"`` (the paper's average) or
            ``"gaussian"`` (nnU-Net's); ``sigma_scale`` is the Gaussian's width as a fraction of
            the tile.
        tile_batch_size: tiles per forward pass (whole slices in full-slice mode).
        autocast: ``"auto"`` (the training precision in the evaluation; bf16 on CUDA in
            prediction), ``"none"``, ``"bf16"`` or ``"fp16"``; CUDA only, never on the CPU.
        threshold: probability threshold of the mask (the operating point).
        postprocess: closing and opening after the threshold (``False``: threshold only).
        closing_size, opening_size: square sizes in pixels of ``reference_size`` slices, scaled
            to the scan's grid (1 or less: that step is skipped).
        order: ``"close-open"`` (the paper) or ``"open-close"``.
        convention: ``"opencv"`` (the authors' anchor for even squares) or ``"symmetric"``.
        reference_size: the slice size at which the sizes are given (640).
        temperature: temperature scaling of the probabilities, ``sigmoid(logit(p) / T)`` on the
            scan's grid (1: none). The stitched evaluation fits it on val (``calibrate``) and then
            gives ``threshold`` on the calibrated scale, so the masks do not change.
    """

    blend: str = "constant"
    sigma_scale: float = 0.125
    tile_batch_size: int = 64
    autocast: str = "auto"
    threshold: float = 0.5
    postprocess: bool = True
    closing_size: int = 10
    opening_size: int = 5
    order: str = "close-open"
    convention: str = "opencv"
    reference_size: int = REFERENCE_SIZE
    temperature: float = 1.0

    def __post_init__(self) -> None:
        owner = "inference spec"
        _choice(owner, "blend", self.blend, BLENDS)
        _choice(owner, "autocast", self.autocast, AUTOCASTS)
        _choice(owner, "order", self.order, ORDERS)
        _choice(owner, "convention", self.convention, CONVENTIONS)
        _positive_int(owner, "tile_batch_size", self.tile_batch_size)
        _positive_int(owner, "reference_size", self.reference_size)
        for name in ("closing_size", "opening_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{owner}.{name} must be 0 or a positive integer, got {value!r}")
        if not isinstance(self.postprocess, bool):
            raise ConfigError(
                f"{owner}.postprocess must be true or false, not {self.postprocess!r}"
            )
        for name, low, high in (("threshold", 0.0, 1.0), ("sigma_scale", 1e-6, float("inf"))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{owner}.{name} must be a number, got {value!r}")
            if not low <= float(value) <= high:
                raise ConfigError(f"{owner}.{name} must lie in [{low:g}, {high:g}], got {value!r}")
            object.__setattr__(self, name, float(value))
        value = self.temperature
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ConfigError(f"{owner}.temperature must be a positive number, got {value!r}")
        object.__setattr__(self, "temperature", float(value))

    def postprocess_config(self, threshold: float | None = None) -> Any:
        """The :class:`~ichseg.eval.postprocess.PostprocessConfig` of this spec (at ``threshold``,
        default the spec's); sizes 0 when ``postprocess`` is off."""
        from ichseg.eval.postprocess import PostprocessConfig

        on = self.postprocess
        return PostprocessConfig(
            threshold=self.threshold if threshold is None else float(threshold),
            closing_size=self.closing_size if on else 0,
            opening_size=self.opening_size if on else 0,
            order=self.order,
            convention=self.convention,
        )

    def with_operating_point(self, threshold: float, postprocess: bool) -> InferenceSpec:
        """A copy with another threshold and post-processing on / off."""
        return replace(self, threshold=float(threshold), postprocess=bool(postprocess))

    def updated(self, changes: Mapping[str, Any]) -> InferenceSpec:
        """A copy with the fields of ``changes`` whose value is not None (validated again)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"inference spec: unknown key(s) {', '.join(unknown)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as checkpoints store it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceSpec:
        """The spec from :meth:`to_dict`'s plain data; unknown keys are refused."""
        return _from_mapping(cls, data, "inference spec")
