"""Inner structures of one phantom slice: fissure, ventricles, deep grey matter, skull base and
calcifications, each as a mask for the slice's height. See docs/phantom.md.
"""

from __future__ import annotations

import math

import numpy as np

from ichseg.data.phantom.anatomy import Tissue, _Anatomy, _bump, _Grid


def _fissure(anat: _Anatomy, grid: _Grid, t: float, parenchyma: np.ndarray) -> np.ndarray:
    """Where the interhemispheric fissure runs on this slice (a band around the midline)."""
    band = parenchyma & (np.abs(grid.midline) < 6.0)
    if t < 0.2:
        return np.zeros_like(parenchyma)
    if t < anat.vent_start:
        return band & (grid.u > 5.0)
    if t < anat.vent_end:
        reach = anat.vent_length_mm * (0.5 + 0.5 * _bump(t, anat.vent_start, anat.vent_end)) + 8.0
        return band & (np.abs(grid.u - anat.vent_centre_mm) > reach)
    return band


def _ventricles(
    anat: _Anatomy, grid: _Grid, t: float
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The two lateral ventricles (banana shapes beside the midline) and the third ventricle."""
    size = _bump(t, anat.vent_start, anat.vent_end)
    ventricles: list[np.ndarray] = []
    if size > 0.0:
        length = anat.vent_length_mm * (0.5 + 0.5 * size)
        width = max(anat.vent_width_mm * math.sqrt(size), 1.5 * grid.spacing)
        uc = grid.u - anat.vent_centre_mm
        # Frontal horns close to the septum; bodies diverge backwards to the atria.
        spread = anat.vent_bend * np.where(uc < 0.0, uc * uc, 0.15 * uc * uc)
        for sign in (-1.0, 1.0):
            centre_v = sign * (anat.vent_offset_mm + width + spread)
            dist = (uc / length) ** 2 + ((grid.v - centre_v) / width) ** 2
            ventricles.append(dist < 1.0)
    third = None
    third_size = _bump(t, anat.vent_start - 0.1, anat.vent_start + 0.03)
    if third_size > 0.0:
        half_width = max(1.2 * anat.scale, 0.8 * grid.spacing)
        third = (np.abs(grid.v) < half_width) & (
            np.abs(grid.u + 4.0 * anat.scale) < 11.0 * anat.scale
        )
    return ventricles, third


def _deep_grey(anat: _Anatomy, grid: _Grid, t: float) -> np.ndarray | None:
    """Basal ganglia and thalami: grey ellipses beside the ventricles in the middle slices."""
    size = _bump(t, anat.vent_start - 0.08, anat.vent_start + 0.14)
    if size <= 0.0:
        return None
    s = anat.scale * math.sqrt(size)
    lentiform = ((grid.u - 8.0 * anat.scale) / (12.0 * s)) ** 2 + (
        (np.abs(grid.v) - 18.0 * anat.scale) / (5.0 * s)
    ) ** 2
    thalamus = ((grid.u + 12.0 * anat.scale) / (9.0 * s)) ** 2 + (
        (np.abs(grid.v) - 9.0 * anat.scale) / (6.5 * s)
    ) ** 2
    return (lentiform < 1.0) | (thalamus < 1.0)


def _skull_base(
    anat: _Anatomy,
    grid: _Grid,
    t: float,
    base: float,
    intracranial: np.ndarray,
    img: np.ndarray,
    tissue: np.ndarray,
) -> None:
    """Skull-base bone in the lowest slices: petrous ridges (wedges) and the clivus."""
    s = anat.scale
    bone = np.zeros_like(intracranial)
    for sign in (-1.0, 1.0):  # petrous ridge: a wedge from its apex near the midline out backwards
        p1 = np.array([-4.0 * s, sign * 9.0 * s])
        p2 = np.array([-30.0 * s, sign * 50.0 * s])
        seg = p2 - p1
        h = np.clip(
            ((grid.u - p1[0]) * seg[0] + (grid.v - p1[1]) * seg[1]) / float(seg @ seg), 0, 1
        )
        dist = np.hypot(grid.u - (p1[0] + h * seg[0]), grid.v - (p1[1] + h * seg[1]))
        bone |= dist < (0.8 + 6.0 * h**1.5) * s * (0.4 + 0.6 * base)
    if t < 0.12:
        bone |= np.hypot((grid.u + 2.0 * s) / 1.6, grid.v) < 4.5 * s
    bone &= intracranial
    np.copyto(img, anat.hu_skull_base, where=bone)
    tissue[bone] = Tissue.BONE


def _calcifications(
    anat: _Anatomy,
    grid: _Grid,
    t: float,
    ventricles: list[np.ndarray],
    img: np.ndarray,
    tissue: np.ndarray,
) -> None:
    """Pineal gland (midline, behind the third ventricle) and choroid plexus calcifications."""
    spots: list[tuple[float, float, float, float]] = []  # (u, v, radius, hu)
    if anat.pineal is not None:
        radius, hu, height = anat.pineal
        if abs(t - height) < 0.04:
            spots.append((-16.0 * anat.scale, 0.0, radius, hu))
    if anat.choroid is not None and ventricles and _bump(t, anat.vent_start, anat.vent_end) > 0.6:
        radius, hu = anat.choroid
        u0 = -0.7 * anat.vent_length_mm
        for sign in (-1.0, 1.0):
            v0 = sign * (anat.vent_offset_mm + 0.8 * anat.vent_width_mm + anat.vent_bend * u0**2)
            spots.append((anat.vent_centre_mm + u0, v0, radius, hu))
    for u0, v0, radius, hu in spots:
        spot = np.hypot(grid.u - u0, grid.v - v0) < max(radius, 1.0 * grid.spacing)
        spot &= tissue != Tissue.BONE
        np.copyto(img, hu, where=spot)
        tissue[spot] = Tissue.CALCIFICATION
