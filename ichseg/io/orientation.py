"""Array orientation of CT volumes: which way each array axis points in the patient.

A network trained on CT-ICH's NIfTI scans has only seen slices whose array axes point
(L, A, S): ``vol[:, :, k]`` is axial slice ``k`` with the patient's left at high first-axis
indices and the front of the head at high second-axis indices. A scan whose header says its axes
point elsewhere (another converter, a DICOM series, a transposed or flipped export) holds the same
anatomy in another array layout; :func:`reorientation` finds the flips and axis swaps that bring
it to the model's orientation (nibabel's orientation tools, from the header's affine) and back, so
the network sees what it was trained on and the mask is written in the scan's own space.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: The array orientation of CT-ICH's NIfTI scans (and of the phantom): what a checkpoint that
#: does not record its training orientation is taken to expect.
CTICH_ORIENTATION: tuple[str, str, str] = ("L", "A", "S")
_CODES = {"L", "R", "A", "P", "S", "I"}


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """The orientation codes of an affine's three array axes (nibabel's ``aff2axcodes``), e.g.
    ``("L", "A", "S")``: the direction in which each axis' index increases."""
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    if any(code is None for code in codes):
        raise ValueError(f"the affine has a degenerate axis (orientation {codes})")
    return tuple(str(code) for code in codes)  # type: ignore[return-value]


def check_codes(codes: Sequence[str], owner: str = "orientation") -> tuple[str, str, str]:
    """``codes`` as a validated 3-tuple: one of L/R, one of A/P and one of S/I, in any order."""
    values = tuple(str(code).upper() for code in codes)
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    if (
        len(values) != 3
        or not set(values) <= _CODES
        or any(len(pair & set(values)) != 1 for pair in pairs)
    ):
        raise ValueError(
            f"{owner} must be three axis codes, one each of L/R, A/P and S/I, got {list(codes)}"
        )
    return values  # type: ignore[return-value]


def most_common(orientations: Iterable[Sequence[str]]) -> tuple[str, str, str] | None:
    """The orientation most scans share (the first seen on a tie), None for no scans."""
    counts = Counter(tuple(codes) for codes in orientations)
    if not counts:
        return None
    return counts.most_common(1)[0][0]  # type: ignore[return-value]


@dataclass(frozen=True)
class Reorientation:
    """The flips and axis permutation from a scan's array layout to a target orientation.

    ``forward`` takes an ``(X, Y, Z, ...)`` array of the scan to the target layout, ``backward``
    takes an array in the target layout back to the scan's; they are exact inverses (views, no
    resampling: only the order of voxels changes).
    """

    source: tuple[str, str, str]
    target: tuple[str, str, str]

    @property
    def identity(self) -> bool:
        """True when the scan is already in the target orientation."""
        return self.source == self.target

    def _transform(self, start: Sequence[str], end: Sequence[str]) -> np.ndarray:
        from nibabel.orientations import axcodes2ornt, ornt_transform

        return ornt_transform(axcodes2ornt(tuple(start)), axcodes2ornt(tuple(end)))

    def forward(self, array: np.ndarray) -> np.ndarray:
        """``array`` (scan layout) in the target layout."""
        if self.identity:
            return array
        from nibabel.orientations import apply_orientation

        return apply_orientation(array, self._transform(self.source, self.target))

    def backward(self, array: np.ndarray) -> np.ndarray:
        """``array`` (target layout) back in the scan's layout."""
        if self.identity:
            return array
        from nibabel.orientations import apply_orientation

        return apply_orientation(array, self._transform(self.target, self.source))

    def spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        """Voxel sizes of the scan's axes, listed for the target layout's axes."""
        transform = self._transform(self.source, self.target)
        out = [0.0, 0.0, 0.0]
        for axis, (new_axis, _flip) in enumerate(transform):
            out[int(new_axis)] = float(spacing[axis])
        return out[0], out[1], out[2]

    def shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The shape of a scan-layout array of ``shape`` in the target layout."""
        sizes = self.spacing([float(n) for n in shape[:3]])
        return int(sizes[0]), int(sizes[1]), int(sizes[2])

    def describe(self) -> str:
        """E.g. ``"oriented R,A,S: reoriented to the model's L,A,S"``."""
        return (
            f"oriented {','.join(self.source)}: reoriented to the model's {','.join(self.target)}"
            " for the network, outputs written in the scan's own orientation"
        )


def reorientation(affine: np.ndarray, target: Sequence[str] = CTICH_ORIENTATION) -> Reorientation:
    """The :class:`Reorientation` of a scan with ``affine`` to ``target`` codes."""
    return Reorientation(axcodes(affine), check_codes(target))
