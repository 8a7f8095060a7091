"""ICH lesions of the phantom by subtype (EDH, SDH, IPH, IVH, SAH) and skull fractures.

Each lesion is a 3D shape cut by the slices, drawn in its typical form and place.
See docs/phantom.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ichseg.data.ctich import SUBTYPES
from ichseg.data.phantom.anatomy import (
    _Anatomy,
    _dome_scale,
    _Grid,
    _Slice,
    _wrap,
)
from ichseg.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# Lesions: 3D shapes cut by the slices
# --------------------------------------------------------------------------------------------------


@dataclass
class _Lesion:
    """A lesion of one subtype centred on slice ``zc`` with half-extent ``rz`` slices."""

    subtype: str
    zc: float
    rz: float
    hu: float

    def profile(self, k: int) -> float:
        """0..1 size factor on slice ``k`` (an ellipsoid cut: 0 outside the lesion's slices)."""
        x = (k - self.zc) / self.rz
        return math.sqrt(1.0 - x * x) if abs(x) < 1.0 else 0.0

    def mask(self, grid: _Grid, sl: _Slice) -> np.ndarray | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def oedema(self, grid: _Grid, sl: _Slice) -> np.ndarray | None:
        """Pixels of perilesional oedema on this slice (None: none)."""
        return None


@dataclass
class _ExtraAxial(_Lesion):
    """EDH (biconvex lens) or SDH (crescent) against the inner table of the skull."""

    angle: float = 0.0  # centre angle
    half_arc: float = 0.4  # rad
    thickness_mm: float = 10.0
    drift: float = 0.0  # rad per slice

    def mask(self, grid: _Grid, sl: _Slice) -> np.ndarray | None:
        g = self.profile(sl.k)
        if g <= 0.0:
            return None
        if self.subtype == "EDH":
            arc = self.half_arc * (0.35 + 0.65 * g)
            thick = self.thickness_mm * g
        else:
            arc = self.half_arc * (0.5 + 0.5 * g)
            thick = self.thickness_mm * g**0.6
        rel = np.abs(_wrap(grid.theta - (self.angle + self.drift * (sl.k - self.zc)))) / arc
        inside = sl.intracranial & (rel < 1.0)
        if self.subtype == "EDH":  # lens: thickest in the middle, convex towards the brain
            limit = thick * (1.0 - rel**2)
        else:  # crescent: thin, nearly constant thickness, tapering ends
            limit = thick * np.clip(1.0 - rel**2, 0.0, None) ** 0.35
            limit = limit * (1.0 + 0.15 * grid.tex[0])
        return inside & (sl.d < limit)


@dataclass
class _Parenchymal(_Lesion):
    """IPH: an irregular blob in the brain parenchyma, with a hypodense oedema rim."""

    centre: tuple[float, float] = (0.0, 0.0)  # (u, v) mm
    radii: tuple[float, float] = (10.0, 8.0)
    orientation: float = 0.0
    oedema_mm: float = 3.0
    oedema_drop: float = 8.0

    def _metric(self, grid: _Grid) -> np.ndarray:
        du, dv = grid.u - self.centre[0], grid.v - self.centre[1]
        c, s = math.cos(self.orientation), math.sin(self.orientation)
        a = (c * du + s * dv) / self.radii[0]
        b = (-s * du + c * dv) / self.radii[1]
        return np.sqrt(a * a + b * b) / (1.0 + 0.12 * grid.tex[0] + 0.15 * grid.fine[0])

    def mask(self, grid: _Grid, sl: _Slice) -> np.ndarray | None:
        g = self.profile(sl.k)
        if g <= 0.0:
            return None
        return (self._metric(grid) < g) & sl.intracranial & (sl.depth > 0.5)

    def oedema(self, grid: _Grid, sl: _Slice) -> np.ndarray | None:
        g = self.profile(sl.k)
        if g <= 0.0:
            return None
        extra = self.oedema_mm / min(self.radii)
        metric = self._metric(grid)
        return (metric >= g) & (metric < g + extra) & sl.parenchyma


@dataclass
class _Intraventricular(_Lesion):
    """IVH: blood layering in the dependent (posterior) part of a lateral ventricle, or a cast."""

    sides: tuple[int, ...] = (0,)
    level: float = 0.5  # fraction of the ventricle's AP extent filled from the back (1 = cast)

    def mask(self, grid: _Grid, sl: _Slice) -> np.ndarray | None:
        if self.profile(sl.k) <= 0.0 or not sl.ventricles:
            return None
        out = np.zeros(sl.d.shape, dtype=bool)
        for side in self.sides:
            vent = sl.ventricles[side]
            if not vent.any():
                continue
            y = grid.y_img[vent]
            level = y.min() + self.level * (y.max() - y.min()) + 0.5 * grid.spacing
            out |= vent & (grid.y_img <= level)
        return out


@dataclass
class _Subarachnoid(_Lesion):
    """SAH: thin, patchy blood along the brain surface and in the sulci of one sector."""

    angle: float = 0.0
    half_arc: float = 0.7
    thickness_mm: float = 2.0
    gap_mm: float = 1.0

    def mask(self, grid: _Grid, sl: _Slice) -> np.ndarray | None:
        g = self.profile(sl.k)
        if g <= 0.0:
            return None
        rel = np.abs(_wrap(grid.theta - self.angle)) / (self.half_arc * (0.5 + 0.5 * g))
        surface = sl.d < self.gap_mm + self.thickness_mm * (0.7 + 0.3 * grid.tex[1])
        patchy = grid.tex[0] * 0.8 + grid.tex[1] * 0.6 > -0.9
        return sl.intracranial & (rel < 1.0) & (surface | sl.sulci) & patchy


@dataclass
class _Fracture:
    """A crack through the skull over a few consecutive slices."""

    angle: float
    slices: tuple[int, ...]
    width_mm: float
    tilt_mm: float
    hu: float


def _lesion_extent(rng: np.random.Generator, n_slices: int, lo: float, hi: float) -> float:
    """Half-extent of a lesion in slices: a fraction of the scan, at least 1.6 slices."""
    return max(1.6, n_slices * rng.uniform(lo, hi))


def _slice_heights(anat: _Anatomy, n_slices: int) -> np.ndarray:
    """Height t of every slice centre (0 = skull base, 1 = vertex)."""
    return anat.t_start + anat.t_span * (np.arange(n_slices) + 0.5) / n_slices


def _pick_slice(rng: np.random.Generator, heights: np.ndarray, lo: float, hi: float) -> float:
    """A slice index whose height lies in [lo, hi] (the nearest one when none does)."""
    candidates = np.flatnonzero((heights >= lo) & (heights <= hi))
    if candidates.size == 0:
        candidates = np.array([int(np.argmin(np.abs(heights - (lo + hi) / 2)))])
    return float(rng.choice(candidates)) + rng.uniform(-0.4, 0.4)


def _draw_extra_axial(
    rng: np.random.Generator,
    anat: _Anatomy,
    heights: np.ndarray,
    n_slices: int,
    spacing: float,
    subtype: str,
    hu: float,
) -> _Lesion:
    """An EDH (lens) or SDH (crescent) against the inner table."""
    s = anat.scale
    is_edh = subtype == "EDH"
    zc = _pick_slice(rng, heights, 0.3, 0.8)
    return _ExtraAxial(
        subtype=subtype,
        zc=zc,
        rz=_lesion_extent(rng, n_slices, 0.06, 0.12),
        hu=hu,
        angle=rng.uniform(-math.pi, math.pi),
        half_arc=rng.uniform(0.28, 0.5) if is_edh else rng.uniform(0.7, 1.2),
        thickness_mm=max(
            (rng.uniform(8.0, 20.0) if is_edh else rng.uniform(4.0, 11.0)) * s,
            (3.0 if is_edh else 2.5) * spacing,
        ),
        drift=rng.uniform(-0.04, 0.04),
    )


def _draw_parenchymal(
    rng: np.random.Generator,
    anat: _Anatomy,
    heights: np.ndarray,
    n_slices: int,
    spacing: float,
    subtype: str,
    hu: float,
) -> _Lesion:
    """An IPH blob with oedema, inside the brain."""
    s = anat.scale
    zc = _pick_slice(rng, heights, 0.35, 0.75)
    angle = rng.uniform(-math.pi, math.pi)
    inner = (
        _dome_scale(float(np.interp(zc, np.arange(n_slices), heights))) * anat.semi_lr
        - anat.scalp_mm
        - anat.skull_front_back_mm
    )
    r = rng.uniform(0.15, 0.5) * inner
    return _Parenchymal(
        subtype=subtype,
        zc=zc,
        rz=_lesion_extent(rng, n_slices, 0.04, 0.09),
        hu=hu,
        centre=(r * math.cos(angle), r * math.sin(angle)),
        radii=(
            max(rng.uniform(6.0, 17.0) * s, 3.0 * spacing),
            max(rng.uniform(5.0, 13.0) * s, 3.0 * spacing),
        ),
        orientation=rng.uniform(0, math.pi),
        oedema_mm=rng.uniform(2.0, 5.0),
        oedema_drop=rng.uniform(6.0, 10.0),
    )


def _draw_intraventricular(
    rng: np.random.Generator,
    anat: _Anatomy,
    heights: np.ndarray,
    n_slices: int,
    spacing: float,
    subtype: str,
    hu: float,
) -> _Lesion:
    """An IVH in one or both lateral ventricles, layering or a cast."""
    mid = (anat.vent_start + anat.vent_end) / 2
    half = (anat.vent_end - anat.vent_start) / 2
    zc = _pick_slice(rng, heights, mid - 0.5 * half, mid + 0.5 * half)
    sides = (0, 1) if rng.random() < 0.4 else (int(rng.integers(0, 2)),)
    cast = rng.random() < 0.3
    return _Intraventricular(
        subtype=subtype,
        zc=zc,
        rz=_lesion_extent(rng, n_slices, 0.05, 0.1),
        hu=hu,
        sides=sides,
        level=1.0 if cast else rng.uniform(0.25, 0.6),
    )


def _draw_subarachnoid(
    rng: np.random.Generator,
    anat: _Anatomy,
    heights: np.ndarray,
    n_slices: int,
    spacing: float,
    subtype: str,
    hu: float,
) -> _Lesion:
    """A SAH along the surface of one sector."""
    zc = _pick_slice(rng, heights, 0.35, 0.8)
    return _Subarachnoid(
        subtype=subtype,
        zc=zc,
        rz=_lesion_extent(rng, n_slices, 0.05, 0.1),
        hu=rng.uniform(55.0, 75.0),
        angle=rng.uniform(-math.pi, math.pi),
        half_arc=rng.uniform(0.4, 1.0),
        thickness_mm=max(rng.uniform(1.5, 3.0), 2.0 * spacing),
        gap_mm=anat.csf_gap_mm,
    )


_DRAWERS = {
    "EDH": _draw_extra_axial,
    "SDH": _draw_extra_axial,
    "IPH": _draw_parenchymal,
    "IVH": _draw_intraventricular,
    "SAH": _draw_subarachnoid,
}


def _draw_lesions(
    rng: np.random.Generator,
    anat: _Anatomy,
    subtypes: Sequence[str],
    n_slices: int,
    spacing: float,
) -> list[_Lesion]:
    """Draw one 3D lesion per requested subtype, in its typical form and place."""
    heights = _slice_heights(anat, n_slices)
    lesions: list[_Lesion] = []
    for subtype in subtypes:
        hu = rng.uniform(58.0, 80.0)
        draw = _DRAWERS.get(subtype)
        if draw is None:
            raise ConfigError(
                f"unknown ICH subtype {subtype!r}; expected one of {', '.join(SUBTYPES)}."
            )
        lesions.append(draw(rng, anat, heights, n_slices, spacing, subtype, hu))
    return lesions


def _draw_fracture(
    rng: np.random.Generator,
    anat: _Anatomy,
    lesions: Sequence[_Lesion],
    n_slices: int,
    spacing: float,
) -> _Fracture:
    """A fracture over 2-4 consecutive slices, over the EDH when there is one."""
    heights = _slice_heights(anat, n_slices)
    edh = next(
        (les for les in lesions if isinstance(les, _ExtraAxial) and les.subtype == "EDH"), None
    )
    if edh is not None:
        angle = edh.angle + rng.uniform(-0.15, 0.15)
        centre = edh.zc
    else:
        angle = rng.uniform(-math.pi, math.pi)
        centre = _pick_slice(rng, heights, 0.3, 0.8)
    count = min(int(rng.integers(2, 5)), n_slices)
    first = int(np.clip(round(centre - (count - 1) / 2), 0, n_slices - count))
    return _Fracture(
        angle=angle,
        slices=tuple(range(first, first + count)),
        width_mm=max(rng.uniform(1.0, 2.0), 1.3 * spacing),
        tilt_mm=rng.uniform(-3.0, 3.0),
        hu=rng.uniform(35.0, 55.0),
    )
