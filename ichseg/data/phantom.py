"""Synthetic head-CT phantom written in the exact on-disk layouts of the PhysioNet CT-ICH releases.

The phantom lets every reader, experiment and test run without the real download. It writes either
release, files, names, CSV formats and known quirks included:

* ``nifti`` (CT-ICH 1.3.x): ``ct_scans/<NNN>.nii`` (int16 HU, slices on axis 2),
  ``masks/<NNN>.nii`` (uint8 0/1), ``hemorrhage_diagnosis_raw_ct.csv``,
  ``Patient_demographics.csv``; patients 049-058 and 066-130 (059-065 missing, as in the real data).
* ``jpg`` (CT-ICH 1.0-1.2): ``Patients_CT/<NNN>/brain/<K>.jpg`` (brain window 40/120),
  ``brain/<K>_HGE_Seg.jpg`` (mask, only on slices with ICH), ``bone/<K>.jpg`` (bone window
  700/3200), ``hemorrhage_diagnosis.csv`` (UTF-8 BOM, CRLF), ``patient_demographics.csv``; one bone
  JPG missing.

Each scan is built from analytic shapes in millimetres: air, scalp, a skull of varying thickness,
grey/white matter with sulci, the interhemispheric fissure and falx, lateral ventricles, skull-base
bone, and optional calcifications, a head rest and a skull fracture. Patients with ICH get 3D
lesions of the five subtypes (EDH lens, SDH crescent, IPH blob with oedema, IVH in a ventricle, SAH
along the surface and in sulci). Noise and a small blur give CT texture and partial-volume rims at
the skull. Masks and labels are consistent by construction, and every patient is seeded from
``(seed, patient_id)``: the same arguments give byte-identical files, and a smaller phantom holds
the same first patients as a larger one.

Command line::

    python -m ichseg.data.phantom OUT --release nifti --patients 6 --slices 10 --size 128 --seed 0
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ichseg.data.ctich import (  # the official names and orders
    LABEL_COLUMNS,
    SUBTYPE_COLUMNS,
    SUBTYPES,
)
from ichseg.errors import ConfigError, DatasetError

__all__ = [
    "BONE_WINDOW",
    "BRAIN_WINDOW",
    "LABEL_COLUMNS",
    "NIFTI_PATIENT_IDS",
    "SUBTYPE_COLUMNS",
    "SUBTYPES",
    "PhantomManifest",
    "PhantomPatient",
    "Tissue",
    "generate_phantom",
    "main",
    "parse_slices",
    "make_head_volume",
    "patient_ids",
]

# --------------------------------------------------------------------------------------------------
# Dataset constants (official names and orders)
# --------------------------------------------------------------------------------------------------

NIFTI_PATIENT_IDS: tuple[int, ...] = (*range(49, 59), *range(66, 131))
"""Patient numbers of the NIfTI release, in order (059-065 are missing in the real data)."""

BRAIN_WINDOW: tuple[float, float] = (
    40.0,
    120.0,
)  # (level, width) of the JPG release's brain images
BONE_WINDOW: tuple[float, float] = (700.0, 3200.0)  # (level, width) of its bone images

RELEASES = ("nifti", "jpg")
DEFAULT_PATIENTS = {"nifti": 75, "jpg": 82}
DEFAULT_SIZE = {"nifti": 512, "jpg": 650}
DEFAULT_SLICES = (30, 40)
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_PATIENTS = 500
MAX_SLICES = 1000

JPEG_QUALITY = 95
MIN_LESION_PIXELS = 12  # lesion pieces smaller than this (per slice) are dropped
MISSING_BONE_PATIENT, MISSING_BONE_SLICE = (
    84,
    36,
)  # the real release lacks Patients_CT/084/bone/36.jpg

_JPG_DEMOGRAPHICS_HEADER = (
    "Patient Number",
    "Age\n(years)",
    "Gender",
    *SUBTYPE_COLUMNS,
    "Fracture (Yes/No)",
    "Condition on file",
    "Note",
)
_NIFTI_DEMOGRAPHICS_HEADER = (
    "Patient Number",
    "Age\n(years)",
    "Gender",
    "Hemorrhage type based on the radiologists diagnosis ",
    "",
    "",
    "",
    "",
    "Fracture (yes 1/no 0)",
    "Note1",
)
_NIFTI_DEMOGRAPHICS_SUBHEADER = ("", "", "", *SUBTYPE_COLUMNS, "", "")


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
# Public records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomPatient:
    """One written patient, with the ground truth a reader should get back from the files."""

    patient_id: int  # e.g. 49
    age: float  # years, may be fractional for infants
    gender: str  # "Male" / "Female"
    shape: tuple[int, int, int]  # (H, W, N) as written, slices on axis 2
    subtypes: np.ndarray  # (N, 5) bool, order IVH, IPH, SAH, EDH, SDH (CSV column order)
    fracture: np.ndarray  # (N,) bool
    mask_pixels: np.ndarray  # (N,) int64 ICH pixels per slice in the written mask
    spacing: tuple[float, float, float] | None  # mm (x, y, z); None for the jpg release
    missing_bone_slices: tuple[int, ...]  # 1-based slices whose bone JPG was not written (jpg only)

    @property
    def n_slices(self) -> int:
        """Number of slices."""
        return self.shape[2]

    @property
    def has_ich(self) -> bool:
        """Whether any slice of this patient has ICH."""
        return bool(self.subtypes.any())


@dataclass(frozen=True)
class PhantomManifest:
    """What :func:`generate_phantom` wrote: the root folder, the release and every patient."""

    root: Path
    release: str  # "nifti" or "jpg"
    patients: tuple[PhantomPatient, ...]

    @property
    def n_slices(self) -> int:
        """Slices over all patients."""
        return sum(p.n_slices for p in self.patients)

    @property
    def n_ich_slices(self) -> int:
        """Slices with any ICH over all patients."""
        return sum(int(p.subtypes.any(axis=1).sum()) for p in self.patients)


# --------------------------------------------------------------------------------------------------
# Patient plans: demographics, diagnosis and scan geometry, drawn per (seed, patient_id)
# --------------------------------------------------------------------------------------------------

# The first ten patients of every phantom follow a fixed plan so that even a small phantom holds
# every subtype, a fracture, calcifications and patients without ICH.
# index -> (subtypes, fracture, calcified)
_FIXED_PLANS: dict[int, tuple[tuple[str, ...], bool, bool]] = {
    0: (("EDH",), True, False),
    1: ((), False, True),
    2: (("SDH",), False, True),
    3: (("IPH", "IVH"), False, False),
    4: ((), False, False),
    5: (("SAH",), False, True),
    6: ((), False, False),
    7: ((), True, False),
    8: (("EDH", "SAH"), True, False),
    9: ((), False, True),
}
_P_ICH = 0.42
_PRIMARY_WEIGHTS = {"EDH": 0.36, "IPH": 0.24, "SDH": 0.16, "SAH": 0.12, "IVH": 0.12}
_P_SECOND_SUBTYPE = 0.3
_P_FRACTURE = {"EDH": 0.7, "ICH": 0.12, "none": 0.04}
_P_MALE = 0.56


@dataclass(frozen=True)
class _PatientPlan:
    index: int
    patient_id: int
    age: float
    gender: str
    n_slices: int
    subtypes: tuple[str, ...]
    fracture: bool
    calcifications: bool
    fov_mm: float
    slice_thickness_mm: float
    z_origin_mm: float
    note: str


def patient_ids(release: str, n_patients: int) -> tuple[int, ...]:
    """Patient numbers of a phantom of ``n_patients`` in ``release``.

    NIfTI: the first ``n`` of 049-058, 066-130 (then 131, 132, ... beyond 75). JPG: 049 .. 049+n-1.
    """
    if release == "nifti":
        ids = list(NIFTI_PATIENT_IDS[:n_patients])
        ids += range(131, 131 + n_patients - len(ids))
        return tuple(ids)
    return tuple(range(49, 49 + n_patients))


def _draw_age(rng: np.random.Generator) -> float:
    """Age in years: ~27 % children (infants in quarter years), adults 18 + a skewed draw."""
    is_child = rng.random() < 0.27
    child = rng.uniform(0.1, 17.9)
    adult = float(min(18.0 + rng.gamma(1.2, 14.5), 92.0))
    if not is_child:
        return float(round(adult))
    if child < 1.0:
        return max(0.25, round(child * 4) / 4)
    return float(math.floor(child))


def _plan_patient(seed: int, index: int, patient_id: int, slices: tuple[int, int]) -> _PatientPlan:
    """Draw one patient's plan; the draws depend on (seed, patient_id) only (and fixed plans)."""
    rng = np.random.default_rng([seed, patient_id, 0])
    age = _draw_age(rng)
    gender = "Male" if rng.random() < _P_MALE else "Female"
    lo, hi = slices
    if patient_id == MISSING_BONE_PATIENT and hi >= MISSING_BONE_SLICE:
        lo = max(lo, MISSING_BONE_SLICE)  # keep the real quirk (084 bone/36.jpg missing) possible
    n_slices = int(rng.integers(lo, hi + 1))
    has_ich = rng.random() < _P_ICH
    names = list(_PRIMARY_WEIGHTS)
    weights = np.array(list(_PRIMARY_WEIGHTS.values()))
    primary = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    others = [n for n in names if n != primary]
    other_w = np.array([_PRIMARY_WEIGHTS[n] for n in others])
    second = others[int(rng.choice(len(others), p=other_w / other_w.sum()))]
    with_second = rng.random() < _P_SECOND_SUBTYPE
    fracture_draw = rng.random()
    calcified = rng.random() < (0.5 if age >= 12 else 0.1)
    fov = float(rng.uniform(220.0, 250.0))
    thickness = float(round(rng.uniform(4.5, 5.0), 2))
    z_origin = float(round(rng.uniform(-90.0, -40.0), 1))
    note = "Slight motion artefact" if rng.random() < 0.05 else ""

    if index in _FIXED_PLANS:
        subtypes, fracture, calcified = _FIXED_PLANS[index]
    else:
        subtypes = ((primary, second) if with_second else (primary,)) if has_ich else ()
        key = "EDH" if "EDH" in subtypes else ("ICH" if subtypes else "none")
        fracture = fracture_draw < _P_FRACTURE[key]
    return _PatientPlan(
        index=index,
        patient_id=patient_id,
        age=age,
        gender=gender,
        n_slices=n_slices,
        subtypes=tuple(subtypes),
        fracture=fracture,
        calcifications=calcified,
        fov_mm=fov,
        slice_thickness_mm=thickness,
        z_origin_mm=z_origin,
        note=note,
    )


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
    s = anat.scale
    for subtype in subtypes:
        hu = rng.uniform(58.0, 80.0)
        if subtype in ("EDH", "SDH"):
            is_edh = subtype == "EDH"
            zc = _pick_slice(rng, heights, 0.3, 0.8)
            lesions.append(
                _ExtraAxial(
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
            )
        elif subtype == "IPH":
            zc = _pick_slice(rng, heights, 0.35, 0.75)
            angle = rng.uniform(-math.pi, math.pi)
            inner = (
                _dome_scale(float(np.interp(zc, np.arange(n_slices), heights))) * anat.semi_lr
                - anat.scalp_mm
                - anat.skull_front_back_mm
            )
            r = rng.uniform(0.15, 0.5) * inner
            lesions.append(
                _Parenchymal(
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
            )
        elif subtype == "IVH":
            mid = (anat.vent_start + anat.vent_end) / 2
            half = (anat.vent_end - anat.vent_start) / 2
            zc = _pick_slice(rng, heights, mid - 0.5 * half, mid + 0.5 * half)
            sides = (0, 1) if rng.random() < 0.4 else (int(rng.integers(0, 2)),)
            cast = rng.random() < 0.3
            lesions.append(
                _Intraventricular(
                    subtype=subtype,
                    zc=zc,
                    rz=_lesion_extent(rng, n_slices, 0.05, 0.1),
                    hu=hu,
                    sides=sides,
                    level=1.0 if cast else rng.uniform(0.25, 0.6),
                )
            )
        elif subtype == "SAH":
            zc = _pick_slice(rng, heights, 0.35, 0.8)
            lesions.append(
                _Subarachnoid(
                    subtype=subtype,
                    zc=zc,
                    rz=_lesion_extent(rng, n_slices, 0.05, 0.1),
                    hu=rng.uniform(55.0, 75.0),
                    angle=rng.uniform(-math.pi, math.pi),
                    half_arc=rng.uniform(0.4, 1.0),
                    thickness_mm=max(rng.uniform(1.5, 3.0), 2.0 * spacing),
                    gap_mm=anat.csf_gap_mm,
                )
            )
        else:
            raise ConfigError(
                f"unknown ICH subtype {subtype!r}; expected one of {', '.join(SUBTYPES)}."
            )
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


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _drop_small_pieces(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected pieces smaller than ``min_pixels``."""
    if not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _head_box(grid: _Grid, dome: float, pad: int = 3) -> tuple[slice, slice] | None:
    """Rows and columns of the rectangle holding the head on a slice of this dome scale."""
    inside = grid.extent <= dome
    rows = np.flatnonzero(inside.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(inside[rows[0] : rows[-1] + 1].any(axis=0))
    n = grid.size
    return (
        slice(max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, n)),
        slice(max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, n)),
    )


def _render_slice(
    anat: _Anatomy,
    grid: _Grid,
    k: int,
    t: float,
    lesions: Sequence[_Lesion],
    fracture: _Fracture | None,
    noise_rng: np.random.Generator,
    tissue: np.ndarray,
    bits: np.ndarray,
) -> tuple[np.ndarray, bool]:
    """Render slice ``k`` into ``tissue`` and ``bits`` (zeroed (S, S)); return HU and fracture flag.

    The head is drawn inside its bounding rectangle only; noise and blur cover the whole slice.
    """
    img = np.full((grid.size, grid.size), anat.hu_air, dtype=np.float32)
    if grid.headrest is not None:
        np.copyto(img, anat.hu_headrest, where=grid.headrest)
        tissue[grid.headrest] = Tissue.HEADREST
    dome = _dome_scale(t)
    box = _head_box(grid, dome)
    fractured = False
    if box is not None:
        rows, cols = box
        fractured = _render_head(
            anat,
            grid.crop(rows, cols),
            k,
            t,
            dome,
            lesions,
            fracture,
            img[rows, cols],
            tissue[rows, cols],
            bits[rows, cols],
        )
    # CT texture: white noise, then a small blur (also the partial-volume effect at every edge).
    img += anat.noise_sigma * noise_rng.standard_normal(img.shape, dtype=np.float32)
    img = ndimage.gaussian_filter(img, anat.blur_sigma_px, mode="nearest", truncate=3.0)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), fractured


def _render_head(
    anat: _Anatomy,
    grid: _Grid,
    k: int,
    t: float,
    dome: float,
    lesions: Sequence[_Lesion],
    fracture: _Fracture | None,
    img: np.ndarray,
    tissue: np.ndarray,
    bits: np.ndarray,
) -> bool:
    """Paint the head of slice ``k`` into ``img``, ``tissue``, ``bits``; True if fractured here."""
    sp = grid.spacing

    # Layers from outside in: scalp, skull (thicker where the cut is tangential), intracranial.
    skin = dome * grid.radius
    skull_out = skin - max(anat.scalp_mm, 1.2 * sp)
    oblique = 1.0 + 1.5 * max(0.0, t - 0.8) / 0.2
    base = max(0.0, (0.22 - t) / 0.22)  # 0 above the skull base, up to 1 at its bottom
    thickness = grid.skull * oblique
    if base > 0.0:
        thickness = thickness + anat.orbit_roof_mm * base * grid.front_weight
    d = skull_out - thickness - grid.rho
    intracranial = d >= 0.0
    scalp = (grid.rho <= skin) & (grid.rho > skull_out)
    skull = (grid.rho <= skull_out) & ~intracranial
    np.copyto(img, anat.hu_scalp, where=scalp)
    tissue[scalp] = Tissue.SCALP
    w = np.clip(-d / thickness, 0.0, 1.0)
    bone = anat.hu_diploe + (anat.hu_table - anat.hu_diploe) * (2.0 * w - 1.0) ** 2
    np.copyto(img, bone, where=skull)
    tissue[skull] = Tissue.BONE

    # Brain: grey cortex ribbon lining the surface, the sulci and the fissures; white matter inside.
    gap = max(anat.csf_gap_mm, 0.6 * sp)
    depth = d - gap
    parenchyma = intracranial & (depth >= 0.0)
    cortex = max(anat.cortex_mm, 1.2 * sp) * (
        1.0 + 0.25 * (grid.cortex[0] * math.cos(0.4 * k) + grid.cortex[1] * math.sin(0.4 * k))
    )
    bend = math.cos(0.3 * k) * grid.fine[0] + math.sin(0.3 * k) * grid.fine[1]
    phase = grid.sulcus_phase + (0.35 * k) + 0.06 * depth + 1.6 * bend
    arc = np.abs(phase - np.round(phase * (1 / (2 * math.pi))) * (2 * math.pi))
    arc *= grid.rho * (1.0 / anat.sulcus_count)
    variation = math.sin(0.3 * k) * grid.fine[0] - math.cos(0.3 * k) * grid.fine[1]
    sulcus_depth = anat.sulcus_depth_mm * (0.65 + 0.35 * variation)
    if t < 0.2:  # few sulci at the skull base
        sulcus_depth *= max(t, 0.0) / 0.2
    half_sulcus = np.maximum(anat.sulcus_width_mm * (0.75 + 0.35 * grid.fine[1]), 0.9 * sp) / 2
    sulci = parenchyma & (arc < half_sulcus) & (depth < sulcus_depth)
    grey = parenchyma & (
        (depth < cortex) | ((arc < half_sulcus + cortex) & (depth < sulcus_depth + cortex))
    )
    sylvian = _bump(t, 0.28, 0.56)
    if sylvian > 0.0:
        half_width = max(anat.sylvian_width_mm, 1.2 * sp) / 2
        reach = anat.sylvian_depth_mm * sylvian
        near_surface = parenchyma & (depth < reach + cortex)
        for sign in (-1.0, 1.0):  # a cleft from the temple inwards, bent forwards and wavy
            c, s = math.cos(anat.sylvian_angle), sign * math.sin(anat.sylvian_angle)
            ahead = grid.u * c + grid.v * s > 0.0
            across = np.abs(grid.v * c - grid.u * s + 0.15 * sign * depth + 2.0 * bend)
            sulci |= near_surface & ahead & (depth < reach) & (across < half_width)
            grey |= near_surface & ahead & (across < half_width + cortex)

    fissure = _fissure(anat, grid, t, parenchyma)
    half_fissure = max(anat.fissure_width_mm, 1.2 * sp) / 2
    fissure_csf = fissure & (np.abs(grid.midline) < half_fissure)
    grey |= fissure & (np.abs(grid.midline) < half_fissure + cortex)

    ventricles, third = _ventricles(anat, grid, t)
    deep_grey = _deep_grey(anat, grid, t)
    if deep_grey is not None:
        grey |= deep_grey & parenchyma

    texture = 1.5 * (math.cos(0.25 * k) * grid.tex[0] + math.sin(0.25 * k) * grid.tex[1])
    brain_hu = np.where(grey, np.float32(anat.hu_grey), np.float32(anat.hu_white)) + texture
    np.copyto(img, brain_hu, where=parenchyma)
    tissue[parenchyma] = Tissue.WHITE
    tissue[grey] = Tissue.GREY

    csf = (intracranial & ~parenchyma) | sulci | fissure_csf
    for vent in ventricles:
        vent &= parenchyma
        csf |= vent
    if third is not None:
        csf |= third & parenchyma
    np.copyto(img, anat.hu_csf + 0.5 * texture, where=csf)
    tissue[csf] = Tissue.CSF
    parenchyma &= ~csf
    falx = fissure & (np.abs(grid.midline) < max(anat.falx_width_mm, 0.7 * sp) / 2)
    np.copyto(img, anat.hu_falx, where=falx)
    tissue[falx] = Tissue.DURA

    if base > 0.0:
        _skull_base(anat, grid, t, base, intracranial, img, tissue)
        parenchyma &= tissue != Tissue.BONE
    _calcifications(anat, grid, t, ventricles, img, tissue)

    sl = _Slice(
        k=k,
        t=t,
        d=d,
        depth=depth,
        intracranial=intracranial & (tissue != Tissue.BONE),
        parenchyma=parenchyma,
        sulci=sulci,
        ventricles=ventricles,
    )

    # Lesions (bleed overrides anatomy), perilesional oedema.
    for lesion in lesions:
        mask = lesion.mask(grid, sl)
        if mask is None:
            continue
        mask = _drop_small_pieces(mask & sl.intracranial, MIN_LESION_PIXELS)
        if not mask.any():
            continue
        oedema = lesion.oedema(grid, sl)
        if oedema is not None:
            oedema &= (bits == 0) & ~mask
            np.copyto(img, img - getattr(lesion, "oedema_drop", 0.0), where=oedema)
        value = np.clip(lesion.hu + 4.0 * grid.fine[1] + 3.0 * grid.tex[1], 50.0, 90.0)
        np.copyto(img, value, where=mask)
        tissue[mask] = Tissue.BLEED
        bits[mask] |= np.uint8(1 << SUBTYPES.index(lesion.subtype))

    # Partial-volume rim inside the inner table (values pass through 50-150 HU over 1-2 pixels).
    near = intracranial & (d < 5.0 * anat.rim_decay_px * sp)
    img[near] += anat.rim_hu * np.exp(-d[near] / (anat.rim_decay_px * sp))

    if fracture is None or k not in fracture.slices:
        return False
    across_bone = np.clip((skull_out - grid.rho) / thickness, 0.0, 1.0)
    offset = _wrap(grid.theta - fracture.angle) * grid.rho - fracture.tilt_mm * across_bone
    crack = skull & (np.abs(offset) < fracture.width_mm / 2)
    if not crack.any():
        return False
    np.copyto(img, fracture.hu, where=crack)
    tissue[crack] = Tissue.SCALP
    return True


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


# --------------------------------------------------------------------------------------------------
# One scan in memory
# --------------------------------------------------------------------------------------------------


def make_head_volume(
    rng: np.random.Generator,
    n_slices: int,
    size: int,
    *,
    with_ich: bool,
    spacing_mm: float,
    age: float = 40.0,
    subtypes: Sequence[str] | None = None,
    fracture: bool | None = None,
    calcifications: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One synthetic scan in memory: HU int16 (H, W, N), bool ICH mask (H, W, N), per-slice labels.

    ``size`` is H = W in pixels and ``spacing_mm`` the in-plane pixel spacing (the field of view is
    ``size * spacing_mm``); slices run from the skull base (0) to the vertex (N-1), whatever N is.
    ``subtypes`` chooses the lesions (names from :data:`SUBTYPES`); when None and ``with_ich``, one
    or two are drawn. ``fracture`` / ``calcifications`` None means drawn at random. Axis 0 runs
    left-right and axis 1 posterior to anterior (``vol[:, :, k]`` shows the front on the right).

    The labels dict holds ``subtypes`` ((N, 5) bool, order of :data:`SUBTYPES`: which lesion types
    have mask pixels on each slice), ``fracture`` ((N,) bool), ``tissue`` ((H, W, N) uint8 codes of
    :class:`Tissue`) and ``subtype_map`` ((H, W, N) uint8, bit i set where subtype i's lesion lies).
    """
    if n_slices < 1 or size < 8 or spacing_mm <= 0:
        raise ConfigError(
            f"make_head_volume needs n_slices >= 1, size >= 8 and spacing_mm > 0, "
            f"got {n_slices}, {size}, {spacing_mm}."
        )
    noise_rng = np.random.default_rng(rng.integers(0, 2**63))
    anat = _draw_anatomy(rng, age, calcifications)
    grid = _make_grid(rng, anat, size, spacing_mm)
    if not with_ich:
        chosen: tuple[str, ...] = ()
    elif subtypes:
        chosen = tuple(dict.fromkeys(subtypes))
    else:
        names = list(_PRIMARY_WEIGHTS)
        weights = np.array(list(_PRIMARY_WEIGHTS.values()))
        count = 2 if rng.random() < _P_SECOND_SUBTYPE else 1
        picks = rng.choice(len(names), size=count, replace=False, p=weights / weights.sum())
        chosen = tuple(names[int(i)] for i in picks)
    lesions = _draw_lesions(rng, anat, chosen, n_slices, spacing_mm)
    if fracture is None:
        fracture = (
            rng.random() < _P_FRACTURE["EDH" if "EDH" in chosen else ("ICH" if chosen else "none")]
        )
    crack = _draw_fracture(rng, anat, lesions, n_slices, spacing_mm) if fracture else None

    # Fortran order: each slice is contiguous, and nibabel writes the volume without a copy.
    hu = np.empty((size, size, n_slices), dtype=np.int16, order="F")
    tissue = np.zeros((size, size, n_slices), dtype=np.uint8, order="F")
    subtype_map = np.zeros((size, size, n_slices), dtype=np.uint8, order="F")
    fracture_flags = np.zeros(n_slices, dtype=bool)
    flags = np.zeros((n_slices, len(SUBTYPES)), dtype=bool)
    slice_tissue = np.zeros((size, size), dtype=np.uint8)
    slice_bits = np.zeros((size, size), dtype=np.uint8)
    for k, t in enumerate(_slice_heights(anat, n_slices)):
        slice_tissue.fill(0)
        slice_bits.fill(0)
        hu[:, :, k], fracture_flags[k] = _render_slice(
            anat, grid, k, float(t), lesions, crack, noise_rng, slice_tissue, slice_bits
        )
        tissue[:, :, k] = slice_tissue
        subtype_map[:, :, k] = slice_bits
        if lesions:
            present = np.bitwise_or.reduce(slice_bits, axis=None)
            flags[k] = [bool(present & (1 << i)) for i in range(len(SUBTYPES))]
    labels = {
        "subtypes": flags,
        "fracture": fracture_flags,
        "tissue": tissue,
        "subtype_map": subtype_map,
    }
    return hu, subtype_map > 0, labels


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def _window_u8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> uint8 display window (the library's formula)."""
    return np.clip(np.rint((hu - (level - width / 2)) / width * 255), 0, 255).astype(np.uint8)


def _jpeg_bytes(image: np.ndarray) -> bytes:
    """Encode a 2D uint8 array as an 8-bit grayscale JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def _affine(plan: _PatientPlan, size: int, spacing: float, thickness: float) -> np.ndarray:
    """A scanner-like affine: x flipped (as DICOM converters often write), centred in-plane."""
    half = (size - 1) / 2.0 * spacing
    return np.array(
        [
            [-spacing, 0.0, 0.0, half],
            [0.0, spacing, 0.0, -half + 15.0],
            [0.0, 0.0, thickness, plan.z_origin_mm],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(data.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def _write_patient_jpg(
    folder: Path,
    hu: np.ndarray,
    mask: np.ndarray,
    subtype_map: np.ndarray,
    flags: np.ndarray,
    missing_bone: Sequence[int],
) -> np.ndarray:
    """Write one patient's brain, bone and mask JPGs; return decoded mask pixels per slice."""
    brain_dir, bone_dir = folder / "brain", folder / "bone"
    brain_dir.mkdir(parents=True)
    bone_dir.mkdir()
    n_slices = hu.shape[2]
    pixels = np.zeros(n_slices, dtype=np.int64)
    for k in range(n_slices):
        number = k + 1
        upright = np.rot90(hu[:, :, k], 1)  # anterior up, as the released JPGs are displayed
        (brain_dir / f"{number}.jpg").write_bytes(_jpeg_bytes(_window_u8(upright, *BRAIN_WINDOW)))
        if number not in missing_bone:
            (bone_dir / f"{number}.jpg").write_bytes(_jpeg_bytes(_window_u8(upright, *BONE_WINDOW)))
        if not flags[k].any():
            continue
        data = _jpeg_bytes(np.rot90(mask[:, :, k], 1).astype(np.uint8) * np.uint8(255))
        decoded = _decode_jpeg(data) > 127
        bits = np.rot90(subtype_map[:, :, k], 1)
        for i in np.flatnonzero(flags[k]):
            if not (decoded & ((bits & np.uint8(1 << i)) > 0)).any():  # pragma: no cover - guard
                raise RuntimeError(f"JPEG mask lost subtype {SUBTYPES[i]} on slice {number}")
        (brain_dir / f"{number}_HGE_Seg.jpg").write_bytes(data)
        pixels[k] = int(decoded.sum())
    return pixels


def _flag(value: bool) -> str:
    return "1" if value else ""


def _format_age(age: float) -> str:
    return str(int(age)) if float(age).is_integer() else f"{age:g}"


def _write_label_csv(path: Path, release: str, patients: Sequence[PhantomPatient]) -> None:
    """The per-slice label CSV (9 columns); the jpg release's has a BOM and CRLF line endings."""
    encoding, newline = ("utf-8-sig", "\r\n") if release == "jpg" else ("utf-8", "\n")
    with open(path, "w", encoding=encoding, newline="") as handle:
        writer = csv.writer(handle, lineterminator=newline)
        writer.writerow(LABEL_COLUMNS)
        for patient in patients:
            for k in range(patient.n_slices):
                row = patient.subtypes[k]
                writer.writerow(
                    [
                        patient.patient_id,
                        k + 1,
                        *(int(x) for x in row),
                        int(not row.any()),
                        int(patient.fracture[k]),
                    ]
                )


def _write_demographics(
    path: Path, release: str, patients: Sequence[PhantomPatient], notes: dict[int, str]
) -> None:
    """The demographics CSV with each release's own header rows; flags are ``1`` or empty."""

    def row(p: PhantomPatient) -> list[object]:
        any_sub = p.subtypes.any(axis=0)
        # the JPG release has a diagnosis column before the notes; the NIfTI release does not
        diagnosis = ["Hemorrhage" if any_sub.any() else "No Hemorrhage"] if release == "jpg" else []
        return [
            p.patient_id,
            _format_age(p.age),
            p.gender,
            *(_flag(x) for x in any_sub),
            _flag(p.fracture.any()),
            *diagnosis,
            notes.get(p.patient_id, ""),
        ]

    with open(path, "w", encoding="utf-8", newline="") as handle:
        if release == "jpg":
            csv.writer(handle, lineterminator="\r\n", quoting=csv.QUOTE_ALL).writerow(
                _JPG_DEMOGRAPHICS_HEADER
            )
            writer = csv.writer(handle, lineterminator="\r\n")
        else:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(_NIFTI_DEMOGRAPHICS_HEADER)
            writer.writerow(_NIFTI_DEMOGRAPHICS_SUBHEADER)
        writer.writerows(row(p) for p in patients)


def _write_patient(
    root: Path,
    release: str,
    plan: _PatientPlan,
    seed: int,
    size: int,
    missing_bone: tuple[int, ...],
) -> PhantomPatient:
    """Generate one patient (in memory) and write its files under ``root``."""
    spacing = float(np.float32(round(plan.fov_mm / size, 6)))
    thickness = float(np.float32(plan.slice_thickness_mm))
    hu, mask, labels = make_head_volume(
        np.random.default_rng([seed, plan.patient_id, 1]),
        plan.n_slices,
        size,
        with_ich=bool(plan.subtypes),
        spacing_mm=spacing,
        age=plan.age,
        subtypes=plan.subtypes,
        fracture=plan.fracture,
        calcifications=plan.calcifications,
    )
    name = f"{plan.patient_id:03d}"
    flags = labels["subtypes"]
    if release == "nifti":
        affine = _affine(plan, size, spacing, thickness)
        _write_nifti(root / "ct_scans" / f"{name}.nii", hu, affine)
        _write_nifti(root / "masks" / f"{name}.nii", mask.astype(np.uint8), affine)
        pixels = mask.sum(axis=(0, 1), dtype=np.int64)
        spacing_xyz: tuple[float, float, float] | None = (spacing, spacing, thickness)
    else:
        pixels = _write_patient_jpg(
            root / "Patients_CT" / name, hu, mask, labels["subtype_map"], flags, missing_bone
        )
        spacing_xyz = None
    for array in (flags, labels["fracture"], pixels):
        array.setflags(write=False)  # the manifest records what was written: keep it read-only
    return PhantomPatient(
        patient_id=plan.patient_id,
        age=plan.age,
        gender=plan.gender,
        shape=(size, size, plan.n_slices),
        subtypes=flags,
        fracture=labels["fracture"],
        mask_pixels=pixels,
        spacing=spacing_xyz,
        missing_bone_slices=missing_bone,
    )


def _missing_bone(plans: Sequence[_PatientPlan]) -> dict[int, tuple[int, ...]]:
    """Where the missing bone JPG goes: 084/36 if possible, else the second patient's last slice."""
    for plan in plans:
        if plan.patient_id == MISSING_BONE_PATIENT and plan.n_slices >= MISSING_BONE_SLICE:
            return {plan.patient_id: (MISSING_BONE_SLICE,)}
    chosen = plans[1] if len(plans) > 1 else plans[0]
    return {chosen.patient_id: (chosen.n_slices,)}


# --------------------------------------------------------------------------------------------------
# generate_phantom: validation, temporary folder, rename
# --------------------------------------------------------------------------------------------------

_DATASET_ENTRIES = {
    "ct_scans",
    "masks",
    "patients_ct",
    "hemorrhage_diagnosis_raw_ct.csv",
    "hemorrhage_diagnosis.csv",
    "patient_demographics.csv",
}


def parse_slices(value: int | str | Sequence[int]) -> tuple[int, int]:
    """Slices as an inclusive (low, high) range from ``12``, ``"12"``, ``"30-40"``, ``(30, 40)``."""
    try:
        if isinstance(value, (int, np.integer)):
            lo = hi = int(value)
        elif isinstance(value, str):
            parts = value.strip().split("-")
            if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
                raise ValueError
            lo, hi = int(parts[0]), int(parts[-1])
        else:
            lo, hi = (int(x) for x in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"slices must be a count like 12 or a range like 30-40, got {value!r}."
        ) from None
    if not 1 <= lo <= hi <= MAX_SLICES:
        raise ConfigError(
            f"slices must be a count or a range low-high with 1 <= low <= high <= {MAX_SLICES}, "
            f"got {value!r}."
        )
    return lo, hi


def _validate(release: str, n_patients: int | None, size: int | None) -> tuple[int, int]:
    if release not in RELEASES:
        raise ConfigError(f"release must be 'nifti' or 'jpg', got {release!r}.")
    n = DEFAULT_PATIENTS[release] if n_patients is None else int(n_patients)
    s = DEFAULT_SIZE[release] if size is None else int(size)
    if not 1 <= n <= MAX_PATIENTS:
        raise ConfigError(f"the number of patients must be between 1 and {MAX_PATIENTS}, got {n}.")
    if not MIN_SIZE <= s <= MAX_SIZE:
        raise ConfigError(
            f"the image size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {s}."
        )
    return n, s


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT (unless overwrite) and, even then, one holding non-dataset files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder; choose another output path.", out)
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise DatasetError(
            f"{out} already exists and is not empty; pass --overwrite to replace it.",
            out,
        )
    foreign = [e for e in entries if e.lower() not in _DATASET_ENTRIES]
    if foreign:
        raise DatasetError(
            f"{out} holds files that are not part of a CT-ICH dataset (e.g. {foreign[0]!r}), "
            f"so it is not overwritten; remove it yourself or choose another output path.",
            out,
        )


@contextlib.contextmanager
def _staging_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling folder of ``out``, removed if anything fails before it is renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``, replacing an existing ``out`` (already checked) atomically."""
    if not out.exists():
        os.replace(staging, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    try:
        os.replace(out, trash / "old")
        os.replace(staging, out)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def generate_phantom(
    root: str | os.PathLike[str],
    release: str = "nifti",
    n_patients: int | None = None,
    n_slices: int | str | tuple[int, int] = DEFAULT_SLICES,
    size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> PhantomManifest:
    """Write a synthetic CT-ICH dataset of ``release`` ("nifti" or "jpg") to ``root``.

    ``n_patients`` defaults to the real count (75 NIfTI / 82 JPG), ``size`` to the real image size
    (512 / 650). ``n_slices`` is a count or an inclusive (low, high) range drawn per patient.
    Files are written into a temporary sibling folder renamed to ``root`` at the end; an existing
    non-empty ``root`` is an error unless ``overwrite`` (and even then only if it holds nothing but
    dataset files). Raises :class:`~ichseg.errors.IchsegError` subclasses on bad arguments.

    Only one patient is in memory at a time. The manifest holds what a reader should get back.
    """
    n, s = _validate(release, n_patients, size)
    slices = parse_slices(n_slices)
    out = Path(root)
    _check_target(out, overwrite)
    ids = patient_ids(release, n)
    plans = [_plan_patient(int(seed), i, pid, slices) for i, pid in enumerate(ids)]
    missing = _missing_bone(plans) if release == "jpg" else {}

    from tqdm.auto import tqdm

    patients: list[PhantomPatient] = []
    with _staging_folder(out) as staging:
        if release == "nifti":
            (staging / "ct_scans").mkdir()
            (staging / "masks").mkdir()
        else:
            (staging / "Patients_CT").mkdir()
        bar = tqdm(plans, desc=f"phantom ({release})", unit="patient", disable=not progress)
        for plan in bar:
            patients.append(
                _write_patient(
                    staging, release, plan, int(seed), s, missing.get(plan.patient_id, ())
                )
            )
        notes = {plan.patient_id: plan.note for plan in plans}
        if release == "nifti":
            _write_label_csv(staging / "hemorrhage_diagnosis_raw_ct.csv", release, patients)
            _write_demographics(staging / "Patient_demographics.csv", release, patients, notes)
        else:
            _write_label_csv(staging / "hemorrhage_diagnosis.csv", release, patients)
            _write_demographics(staging / "patient_demographics.csv", release, patients, notes)
        _check_target(out, overwrite)  # it may have appeared while we were writing
        _move_into_place(staging, out)
    return PhantomManifest(root=out, release=release, patients=tuple(patients))


def main(argv=None) -> int:
    """Command-line entry point (the same as :func:`ichseg.cli.phantom.main`)."""
    from ichseg.cli.phantom import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
