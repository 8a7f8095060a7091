"""Several trained models applied as one: the mean of their probabilities, its spread, and the
volume each member alone would give.

nnU-Net predicts with the models of its five cross-validation folds and averages their softmax;
:class:`Ensemble` does the same for ichseg checkpoints (each member applied exactly as its own
evaluation applied it: its input spec, blending and temperature), and also keeps what nnU-Net
throws away: the per-voxel spread across members (an uncertainty map) and each member's own mask
volume, whose range is an interval for the ensemble's volume. One member without flips is exactly
that member's :class:`~ichseg.inference.Predictor`.

::

    HU (H, W, N) -> each member's probabilities (N, H, W) [and of the left-right flipped scan]
      -> mean (the ensemble's probabilities) and standard deviation across members (spread)
      -> the ensemble's operating point -> mask;  each member's own operating point -> its volume
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ichseg.errors import ConfigError
from ichseg.inference.predictor import Predictor
from ichseg.specs import InferenceSpec, InputSpec

#: Inference-spec fields that may differ between members: each member keeps its own (its fitted
#: operating point and temperature); the ensemble's operating point is chosen from them.
MEMBER_FIELDS: frozenset[str] = frozenset({"threshold", "postprocess", "temperature"})
#: Input-spec fields that may differ between members (the orientation recorded from each fold's
#: scans: the ensemble uses the first member's, which every member is applied in).
MEMBER_INPUT_FIELDS: frozenset[str] = frozenset({"orientation"})


@dataclass(frozen=True)
class EnsemblePrediction:
    """What :meth:`Ensemble.predict_hu` returns, all ``(H, W, N)`` like the input volume.

    Attributes:
        probabilities: float32, the mean over members (and flips) in [0, 1].
        mask: bool, the ensemble's operating point applied to ``probabilities``.
        spread: float32 standard deviation per voxel of the probabilities of every pass (each
            member, and its flipped pass with flips), or None with a single member and no flips.
        member_voxels: ICH voxels of each member's own mask (its own operating point).
    """

    probabilities: np.ndarray
    mask: np.ndarray
    spread: np.ndarray | None
    member_voxels: tuple[int, ...]


def combined_spec(specs: Sequence[InferenceSpec], names: Sequence[str]) -> InferenceSpec:
    """The ensemble's inference spec: the members' common settings, threshold the median of
    theirs, post-processing on when most members (or half) have it on.

    Raises :class:`~ichseg.errors.ConfigError` naming the member whose other settings differ.
    """
    first = specs[0]
    for spec, name in zip(specs[1:], names[1:], strict=True):
        for f in fields(InferenceSpec):
            if f.name in MEMBER_FIELDS:
                continue
            a, b = getattr(first, f.name), getattr(spec, f.name)
            if a != b:
                raise ConfigError(
                    f"{name}: its inference spec differs from {names[0]}'s ({f.name} {b!r} vs "
                    f"{a!r}); the members of an ensemble must be applied alike"
                )
    threshold = float(statistics.median(spec.threshold for spec in specs))
    postprocess = 2 * sum(spec.postprocess for spec in specs) >= len(specs)
    # each member applies its own temperature; their mean is not rescaled again
    return first.updated({"threshold": threshold, "postprocess": postprocess, "temperature": 1.0})


def check_input_specs(specs: Sequence[InputSpec], names: Sequence[str]) -> None:
    """Refuse members whose inputs are prepared differently (one line naming the member)."""
    first = specs[0]
    for spec, name in zip(specs[1:], names[1:], strict=True):
        for f in fields(InputSpec):
            a, b = getattr(first, f.name), getattr(spec, f.name)
            if f.name not in MEMBER_INPUT_FIELDS and a != b:
                raise ConfigError(
                    f"{name}: its input spec differs from {names[0]}'s ({f.name} {b!r} vs {a!r}); "
                    "an ensemble needs members trained on the same inputs"
                )


class Ensemble:
    """Members (:class:`~ichseg.inference.Predictor`) applied to the same scan and averaged.

    Args:
        members: the predictors; their input specs must agree (the orientation aside), and their
            inference specs apart from threshold, post-processing and temperature.
        inference_spec: the ensemble's operating point (threshold, post-processing); default
            :func:`combined_spec` of the members'.
        flip: also apply every member to the left-right flipped scan (first array axis, the
            patient's left-right in the model's orientation) and average the flipped-back
            probabilities (test-time augmentation; off by default, as the paper trains without
            flips).
        names: how members are named in messages (default ``member 1`` ...).
    """

    def __init__(
        self,
        members: Sequence[Predictor],
        inference_spec: InferenceSpec | None = None,
        flip: bool = False,
        names: Sequence[str] | None = None,
    ) -> None:
        if not members:
            raise ConfigError("an ensemble needs at least one model")
        self.members = list(members)
        self.names = (
            list(names)
            if names is not None
            else [f"member {i + 1}" for i in range(len(self.members))]
        )
        check_input_specs([m.input_spec for m in self.members], self.names)
        if inference_spec is None:
            if len(self.members) == 1:
                inference_spec = self.members[0].inference_spec
            else:
                specs = [m.inference_spec for m in self.members]
                inference_spec = combined_spec(specs, self.names)
        self.inference_spec = inference_spec
        self.flip = bool(flip)
        self._judge = Predictor(
            self.members[0].net, self.members[0].input_spec, inference_spec,
            self.members[0].device,
        )  # fmt: skip

    @property
    def input_spec(self) -> InputSpec:
        """The members' input spec (the first member's orientation)."""
        return self.members[0].input_spec

    @property
    def device(self) -> Any:
        return self.members[0].device

    @property
    def passes(self) -> int:
        """Network passes over each slice's tiles: members x (2 with flips)."""
        return len(self.members) * (2 if self.flip else 1)

    @property
    def single(self) -> bool:
        """One member without flips: exactly that member's predictor."""
        return self.passes == 1

    def _passes(self, member: Predictor, hu: np.ndarray, progress: Any) -> list[np.ndarray]:
        """``(N, H, W)`` float32 probabilities of one member: of the scan and, with flips, of the
        flipped scan flipped back."""
        shape = hu.shape[:2]
        out = [member.probabilities(member.working_slices(hu), shape, progress)]
        if self.flip:
            flipped = member.probabilities(member.working_slices(hu[::-1]), shape, progress)
            out.append(np.ascontiguousarray(flipped[:, ::-1, :]))
        return out

    def predict_hu(self, hu: np.ndarray, progress: Any = None) -> EnsemblePrediction:
        """Apply every member to an ``(H, W, N)`` HU volume in the model's orientation."""
        if self.single:
            member = self.members[0]
            probabilities = self._passes(member, hu, progress)[0]
            mask = member.mask(probabilities)
            return EnsemblePrediction(
                probabilities=np.moveaxis(probabilities, 0, 2),
                mask=np.moveaxis(mask, 0, 2),
                spread=None,
                member_voxels=(int(np.count_nonzero(mask)),),
            )
        total: np.ndarray | None = None
        squares: np.ndarray | None = None
        member_voxels = []
        for member in self.members:
            passes = self._passes(member, hu, progress)
            own = passes[0] if len(passes) == 1 else (passes[0] + passes[1]) * np.float32(0.5)
            member_voxels.append(int(np.count_nonzero(member.mask(own))))
            for probabilities in passes:
                if total is None:
                    total = probabilities.astype(np.float64)
                    squares = np.square(total)
                else:
                    assert squares is not None
                    total += probabilities
                    squares += np.square(probabilities, dtype=np.float64)
        assert total is not None and squares is not None
        mean = total / self.passes
        spread = np.sqrt(np.maximum(squares / self.passes - np.square(mean), 0.0))
        mean32 = mean.astype(np.float32)
        mask = self._judge.mask(mean32)
        return EnsemblePrediction(
            probabilities=np.moveaxis(mean32, 0, 2),
            mask=np.moveaxis(mask, 0, 2),
            spread=np.moveaxis(spread.astype(np.float32), 0, 2),
            member_voxels=tuple(member_voxels),
        )
