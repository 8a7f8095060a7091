"""What a phantom holds: its releases and sizes, the patient numbers and each patient's plan.

A plan (age, gender, slices, subtypes, fracture, scan geometry) is drawn from ``(seed, patient_id)``
only, so a smaller phantom holds the same first patients. See docs/phantom.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ichseg.errors import ConfigError

NIFTI_PATIENT_IDS: tuple[int, ...] = (*range(49, 59), *range(66, 131))
"""Patient numbers of the NIfTI release, in order (059-065 are missing in the real data)."""


RELEASES = ("nifti", "jpg")
DEFAULT_PATIENTS = {"nifti": 75, "jpg": 82}
DEFAULT_SIZE = {"nifti": 512, "jpg": 650}
DEFAULT_SLICES = (30, 40)
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_PATIENTS = 500
MAX_SLICES = 1000


MISSING_BONE_PATIENT, MISSING_BONE_SLICE = (
    84,
    36,
)  # the real release lacks Patients_CT/084/bone/36.jpg


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


def _missing_bone(plans: Sequence[_PatientPlan]) -> dict[int, tuple[int, ...]]:
    """Where the missing bone JPG goes: 084/36 if possible, else the second patient's last slice."""
    for plan in plans:
        if plan.patient_id == MISSING_BONE_PATIENT and plan.n_slices >= MISSING_BONE_SLICE:
            return {plan.patient_id: (MISSING_BONE_SLICE,)}
    chosen = plans[1] if len(plans) > 1 else plans[0]
    return {chosen.patient_id: (chosen.n_slices,)}


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
