"""The anatomy of one phantom head: tissue codes, per-patient parameters and the in-plane grid.

Sizes are in millimetres and HU; children have smaller heads and thinner skulls, the elderly are
atrophic. See docs/phantom.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
from scipy import ndimage


class Tissue(IntEnum):
    """Tissue codes of the ``labels["tissue"]`` map returned by :func:`make_head_volume`."""

    AIR = 0
    SCALP = 1  # scalp / soft tissue outside the skull, and the soft tissue in a fracture gap
    BONE = 2  # skull vault and skull-base bone
    GREY = 3  # cortex ribbon and deep grey nuclei
    WHITE = 4
    CSF = 5  # ventricles, sulci, fissure, subarachnoid space
    CALCIFICATION = 6  # pineal gland / choroid plexus
    BLEED = 7  # any ICH subtype
    DURA = 8  # falx
    HEADREST = 9


# --------------------------------------------------------------------------------------------------
# Anatomy of one head (drawn per patient), and the in-plane grid it is drawn on
# --------------------------------------------------------------------------------------------------


def _head_scale(age: float) -> float:
    """Linear head size relative to an adult (about 0.62 at birth, 0.8 at 1 year, 0.92 at 5)."""
    return 1.0 - 0.2 * math.exp(-age / 0.8) - 0.18 * math.exp(-age / 6.0)


def _dome_scale(t: float) -> float:
    """Relative head cross-section at height ``t`` (0 = skull base, 1 = vertex): a dome."""
    peak = 0.45
    if t <= peak:
        scale = 1.0 - 0.3 * ((peak - t) / peak) ** 2
    else:
        x = (t - peak) / (1.06 - peak)
        scale = math.sqrt(max(0.0, 1.0 - x * x))
    return max(scale, 0.3)


def _bump(t: float, start: float, end: float) -> float:
    """A smooth 0..1..0 profile over ``start < t < end`` (0 outside)."""
    if end <= start or not start < t < end:
        return 0.0
    return math.sin(math.pi * (t - start) / (end - start))


def _wrap(angle: np.ndarray | float) -> Any:
    """Wrap angles to [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


@dataclass
class _Anatomy:
    """Per-patient anatomy parameters (millimetres, HU, radians)."""

    age: float
    scale: float  # head size relative to an adult
    semi_ap: float  # outer semi-axes of the widest cross-section (mm)
    semi_lr: float
    shape_harmonics: tuple[float, float, float, float, float]  # e1, e2, phase2, e3, phase3
    rotation: float  # in-plane rotation (rad)
    offset: tuple[float, float]  # head centre offset (x_lr, y_ap) in mm
    scalp_mm: float
    skull_temple_mm: float
    skull_front_back_mm: float
    orbit_roof_mm: float
    csf_gap_mm: float
    cortex_mm: float
    sulcus_count: int
    sulcus_depth_mm: float
    sulcus_width_mm: float
    fissure_width_mm: float
    falx_width_mm: float
    sylvian_angle: float  # angle of the Sylvian fissures from the front (rad)
    sylvian_depth_mm: float
    sylvian_width_mm: float
    phases: tuple[float, ...]  # assorted phases for the texture of the folds
    t_start: float  # height of the first slice centre (0 = skull base)
    t_span: float
    vent_start: float  # heights where the lateral ventricles begin and end
    vent_end: float
    vent_length_mm: float
    vent_width_mm: float
    vent_offset_mm: float
    vent_bend: float
    vent_centre_mm: float
    hu_air: float
    hu_scalp: float
    hu_diploe: float
    hu_table: float
    hu_grey: float
    hu_white: float
    hu_csf: float
    hu_falx: float
    hu_skull_base: float
    rim_hu: float  # partial-volume rim at the inner table: amplitude and decay (pixels)
    rim_decay_px: float
    noise_sigma: float  # white noise added before the blur (HU)
    blur_sigma_px: float
    headrest: bool
    hu_headrest: float
    pineal: tuple[float, float, float] | None  # (radius_mm, hu, height t) or None
    choroid: tuple[float, float] | None  # (radius_mm, hu) or None


def _draw_anatomy(rng: np.random.Generator, age: float, calcifications: bool | None) -> _Anatomy:
    """Draw the anatomy of one head: children smaller with thinner skulls, the elderly atrophic."""
    scale = _head_scale(age)
    child = float(np.clip(0.35 + 0.65 * age / 18.0, 0.35, 1.0))  # skull thickness factor
    atrophy = max(0.0, age - 55.0) / 30.0
    infant = age < 1.5
    calcified_draw = rng.random() < (0.5 if age >= 12 else 0.1)
    calcified = calcified_draw if calcifications is None else calcifications
    vent_start = rng.uniform(0.42, 0.48)
    pineal_r, pineal_hu, choroid_r, choroid_hu = (
        rng.uniform(1.5, 2.6),
        rng.uniform(150.0, 380.0),
        rng.uniform(1.4, 2.2),
        rng.uniform(110.0, 260.0),
    )
    choroid_too = rng.random() < 0.6
    anatomy = _Anatomy(
        age=age,
        scale=scale,
        semi_ap=rng.uniform(88.0, 98.0) * scale,
        semi_lr=rng.uniform(72.0, 80.0) * scale,
        shape_harmonics=(
            rng.uniform(-0.03, 0.0),
            rng.uniform(-0.015, 0.015),
            rng.uniform(0, 2 * math.pi),
            rng.uniform(-0.012, 0.012),
            rng.uniform(0, 2 * math.pi),
        ),
        rotation=math.radians(rng.uniform(-15.0, 15.0)),
        offset=(
            float(np.clip(rng.normal(0, 5), -12, 12)),
            float(np.clip(rng.normal(0, 6), -14, 14)),
        ),
        scalp_mm=rng.uniform(3.0, 6.0) * (0.7 + 0.3 * scale),
        skull_temple_mm=rng.uniform(2.5, 4.0) * child,
        skull_front_back_mm=rng.uniform(6.0, 9.0) * child,
        orbit_roof_mm=rng.uniform(12.0, 20.0) * scale,
        csf_gap_mm=rng.uniform(0.6, 1.4) + 2.0 * atrophy,
        cortex_mm=rng.uniform(2.5, 3.5) * (0.8 + 0.2 * scale),
        sulcus_count=int(rng.integers(18, 27)),
        sulcus_depth_mm=rng.uniform(8.0, 14.0) * scale,
        sulcus_width_mm=rng.uniform(1.0, 1.8) + 1.5 * atrophy,
        fissure_width_mm=rng.uniform(0.8, 1.5) + 1.5 * atrophy,
        falx_width_mm=rng.uniform(0.5, 0.8),
        sylvian_angle=rng.uniform(1.05, 1.3),
        sylvian_depth_mm=rng.uniform(18.0, 28.0) * scale,
        sylvian_width_mm=rng.uniform(1.5, 2.5) + 2.0 * atrophy,
        phases=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 8)),
        t_start=rng.uniform(-0.03, 0.05),
        t_span=rng.uniform(0.9, 0.97),
        vent_start=vent_start,
        vent_end=vent_start + rng.uniform(0.24, 0.3),
        vent_length_mm=rng.uniform(26.0, 32.0) * scale,
        vent_width_mm=(rng.uniform(3.0, 5.0) + 4.0 * atrophy) * (0.6 + 0.4 * scale),
        vent_offset_mm=rng.uniform(1.0, 2.2),
        vent_bend=rng.uniform(0.004, 0.008) / scale,
        vent_centre_mm=rng.uniform(-6.0, 0.0) * scale,
        hu_air=-1000.0,
        hu_scalp=rng.uniform(25.0, 50.0),
        hu_diploe=rng.uniform(700.0, 950.0),
        hu_table=rng.uniform(1450.0, 1750.0) if age >= 2 else rng.uniform(900.0, 1300.0),
        hu_grey=rng.uniform(37.0, 44.0),
        hu_white=rng.uniform(22.0, 28.0) - (5.0 if infant else 0.0),
        hu_csf=rng.uniform(4.0, 12.0),
        hu_falx=rng.uniform(48.0, 70.0),
        hu_skull_base=rng.uniform(1200.0, 1600.0),
        rim_hu=rng.uniform(120.0, 190.0),
        rim_decay_px=rng.uniform(0.6, 1.0),
        noise_sigma=rng.uniform(11.0, 14.0),
        blur_sigma_px=rng.uniform(0.65, 0.8),
        headrest=bool(rng.random() < 0.7),
        hu_headrest=rng.uniform(-80.0, 30.0),
        pineal=(pineal_r, pineal_hu, vent_start - 0.03) if calcified else None,
        choroid=(choroid_r, choroid_hu) if calcified and choroid_too else None,
    )
    # Sizes are floored in pixels later (so small phantoms keep visible structures).
    return anatomy


@dataclass
class _Grid:
    """In-plane coordinates of one patient (float32, shape (S, S)), in the head's own frame."""

    size: int
    spacing: float  # mm per pixel
    u: np.ndarray  # anterior-posterior coordinate in mm (+ anterior), head frame
    v: np.ndarray  # left-right coordinate in mm, head frame (midline at 0)
    rho: np.ndarray  # distance from the head centre (mm)
    theta: np.ndarray  # angle, 0 = anterior, +-pi/2 = temples, +-pi = posterior
    y_img: np.ndarray  # scanner-frame anterior coordinate (mm), for gravity-dependent fluid levels
    radius: np.ndarray  # outer head radius of the widest cross-section along theta (mm)
    skull: np.ndarray  # skull thickness along theta (mm)
    front_weight: np.ndarray  # 0..1, large towards the forehead (orbital roofs at the skull base)
    cortex: tuple[np.ndarray, np.ndarray]  # sin/cos of the cortex-thickness wave
    sulcus_phase: np.ndarray  # angular phase of the sulci
    midline: np.ndarray  # v distance from the (slightly wavy) midline
    tex: tuple[np.ndarray, np.ndarray]  # smooth random fields (~50 mm grain), ~N(0, 1)
    fine: tuple[np.ndarray, np.ndarray]  # finer random fields (~15 mm grain) that bend the sulci
    extent: np.ndarray  # rho / radius: the head covers extent <= dome scale on a slice
    headrest: np.ndarray | None  # bool mask of the head rest

    def crop(self, rows: slice, cols: slice) -> _Grid:
        """The same grid restricted to a rectangle (views, no copies)."""
        values = {}
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray):
                value = value[rows, cols]
            elif isinstance(value, tuple) and value and isinstance(value[0], np.ndarray):
                value = tuple(x[rows, cols] for x in value)
            values[name] = value
        values["headrest"] = None
        return _Grid(**values)


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 20) -> np.ndarray:
    """A smooth random field of shape (size, size), zero mean, unit variance, ~4 cells grain."""
    coarse = ndimage.gaussian_filter(rng.standard_normal((cells, cells)), 2.0, mode="wrap")
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-9)
    fine = ndimage.zoom(coarse, size / cells, order=1, mode="grid-wrap", grid_mode=True)
    return fine.astype(np.float32)[:size, :size]


def _make_grid(rng: np.random.Generator, anat: _Anatomy, size: int, spacing: float) -> _Grid:
    """Build the in-plane coordinate grid of one patient (rotation and offset applied)."""
    centre = (size - 1) / 2.0
    axis = (np.arange(size, dtype=np.float32) - centre) * spacing
    # Axis 0 runs left-right, axis 1 posterior->anterior: vol[:, :, k] shows the front on the right.
    x_lr = axis[:, None] - anat.offset[0]
    y_ap = axis[None, :] - anat.offset[1]
    cos_r, sin_r = math.cos(anat.rotation), math.sin(anat.rotation)
    u = (cos_r * y_ap + sin_r * x_lr).astype(np.float32)
    v = (-sin_r * y_ap + cos_r * x_lr).astype(np.float32)
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    a, b = anat.semi_ap, anat.semi_lr
    e1, e2, p2, e3, p3 = anat.shape_harmonics
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    radius = a * b / np.sqrt((b * cos_t) ** 2 + (a * sin_t) ** 2)
    radius *= 1.0 + e1 * cos_t + e2 * np.cos(2 * theta + p2) + e3 * np.cos(3 * theta + p3)
    skull = anat.skull_temple_mm + (anat.skull_front_back_mm - anat.skull_temple_mm) * cos_t**2
    skull *= 1.0 + 0.08 * np.sin(4 * theta + anat.phases[0])
    skull = np.maximum(skull, 1.6 * spacing)
    front_weight = np.clip(cos_t, 0.0, None) ** 6
    wave = 5 * theta + anat.phases[1]
    sulcus_phase = (
        anat.sulcus_count * theta + anat.phases[2] + 0.9 * np.sin(3 * theta + anat.phases[3])
    )
    midline = v - 1.2 * np.sin(u / 35.0 + anat.phases[4])
    tex = (_smooth_field(rng, size), _smooth_field(rng, size))
    fine = (_smooth_field(rng, size, 64), _smooth_field(rng, size, 64))
    headrest = None
    if anat.headrest:
        r_img = np.hypot(x_lr, y_ap - 10.0)
        ring = np.abs(r_img - (anat.semi_ap + 18.0)) < 1.6
        headrest = ring & (y_ap < -0.55 * r_img)
    f32 = np.float32
    return _Grid(
        size=size,
        spacing=spacing,
        u=u,
        v=v,
        rho=rho.astype(f32),
        theta=theta.astype(f32),
        y_img=np.broadcast_to(y_ap, (size, size)).astype(f32),
        radius=radius.astype(f32),
        skull=skull.astype(f32),
        front_weight=front_weight.astype(f32),
        cortex=(np.sin(wave).astype(f32), np.cos(wave).astype(f32)),
        sulcus_phase=sulcus_phase.astype(f32),
        midline=midline.astype(f32),
        tex=tex,
        fine=fine,
        extent=(rho / radius).astype(f32),
        headrest=headrest,
    )


# --------------------------------------------------------------------------------------------------
# Per-slice context shared by the anatomy and the lesions
# --------------------------------------------------------------------------------------------------


@dataclass
class _Slice:
    """Geometry of one slice: distances to the skull and the compartments lesions live in."""

    k: int
    t: float  # height (0 = skull base, 1 = vertex)
    d: np.ndarray  # mm inward from the inner table (negative in bone, scalp and air)
    depth: np.ndarray  # mm below the brain surface (d minus the CSF gap)
    intracranial: np.ndarray  # bool
    parenchyma: np.ndarray  # bool, brain tissue (before lesions), excluding CSF spaces
    sulci: np.ndarray  # bool, CSF in sulci
    ventricles: list[np.ndarray] = field(default_factory=list)  # bool per lateral ventricle
