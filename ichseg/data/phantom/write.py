"""Writing a phantom: both release layouts, the label and demographics CSVs, atomically.

Files go to a temporary sibling folder renamed to the output at the end. See docs/phantom.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ichseg.data.ctich import LABEL_COLUMNS, SUBTYPE_COLUMNS
from ichseg.data.layout import PHANTOM_MARKER
from ichseg.data.phantom.images import (
    _affine,
    _write_nifti,
    _write_patient_jpg,
)
from ichseg.data.phantom.plan import (
    DEFAULT_SLICES,
    _missing_bone,
    _PatientPlan,
    _plan_patient,
    _validate,
    parse_slices,
    patient_ids,
)
from ichseg.data.phantom.render import make_head_volume
from ichseg.errors import DatasetError
from ichseg.utils.atomic import make_temp_dir

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


def _write_marker(
    path: Path, release: str, n_patients: int, slices: list[int], size: int, seed: int
) -> None:
    """The marker that says the folder is synthetic (:data:`ichseg.data.layout.PHANTOM_MARKER`),
    with the arguments that regenerate it byte for byte."""
    from ichseg import __version__

    document = {
        "synthetic": True,
        "generator": "ichseg.data.phantom",
        "ichseg_version": __version__,
        "release": release,
        "patients": n_patients,
        "slices": slices,
        "size": size,
        "seed": seed,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


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


# --------------------------------------------------------------------------------------------------
# generate_phantom: validation, temporary folder, rename
# --------------------------------------------------------------------------------------------------

#: The top-level entries a phantom writes (either release), and how the files inside them are named.
_TOP_FILES = {
    PHANTOM_MARKER,
    "hemorrhage_diagnosis_raw_ct.csv",
    "Patient_demographics.csv",
    "hemorrhage_diagnosis.csv",
    "patient_demographics.csv",
}
_NIFTI_FILE = re.compile(r"^\d{3}\.nii$")
_JPG_FILE = {"brain": re.compile(r"^\d+(?:_HGE_Seg)?\.jpg$"), "bone": re.compile(r"^\d+\.jpg$")}
_PATIENT_FOLDER = re.compile(r"^\d{3}$")


def _foreign_entry(out: Path) -> Path | None:
    """The first entry under ``out`` (in name order) that a phantom does not write, or None.

    A phantom writes only the label and demographics CSVs, its marker (``ichseg_phantom.json``),
    ``ct_scans/NNN.nii``, ``masks/NNN.nii`` and ``Patients_CT/NNN/{brain,bone}/K[_HGE_Seg].jpg``;
    anything else (another name, a link, a folder where a file belongs) is someone else's.
    """

    def entries(folder: Path) -> list[Path]:
        return sorted(folder.iterdir(), key=lambda p: p.name)

    def plain(path: Path, is_dir: bool) -> bool:
        return not path.is_symlink() and (path.is_dir() if is_dir else path.is_file())

    for entry in entries(out):
        if entry.name in _TOP_FILES and plain(entry, False):
            continue
        if entry.name in ("ct_scans", "masks") and plain(entry, True):
            for path in entries(entry):
                if not (_NIFTI_FILE.match(path.name) and plain(path, False)):
                    return path
            continue
        if entry.name == "Patients_CT" and plain(entry, True):
            for patient in entries(entry):
                if not (_PATIENT_FOLDER.match(patient.name) and plain(patient, True)):
                    return patient
                for window in entries(patient):
                    if not (window.name in _JPG_FILE and plain(window, True)):
                        return window
                    for path in entries(window):
                        if not (_JPG_FILE[window.name].match(path.name) and plain(path, False)):
                            return path
            continue
        return entry
    return None


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT unless ``overwrite``, and even then one holding anything that a
    phantom did not write (naming the first such file): only a phantom is ever replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder; choose another output path.", out)
    try:
        if not any(out.iterdir()):
            return
        if not overwrite:
            raise DatasetError(
                f"{out} already exists and is not empty; pass --overwrite to replace it.",
                out,
            )
        foreign = _foreign_entry(out)
    except OSError as err:
        raise DatasetError(f"{out}: cannot read the folder ({err.strerror or err})", out) from None
    if foreign is not None:
        raise DatasetError(
            f"{out} holds {foreign}, which is not a file of an ichseg phantom, so nothing is "
            "overwritten; remove it yourself or choose another output path.",
            out,
        )


@contextlib.contextmanager
def _staging_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` (with the umask's permissions), removed if anything
    fails before it is renamed; a folder that cannot be written is one :class:`DatasetError`."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(parent, prefix=f".{out.name}.", suffix=".partial")
    except OSError as err:
        raise DatasetError(
            f"{parent}: cannot write the phantom into this folder ({err.strerror or err})", parent
        ) from None
    try:
        yield staging
    except OSError as err:  # e.g. the disk filled up while writing
        raise DatasetError(
            f"{out}: cannot write the phantom ({err.strerror or err}); nothing was written", out
        ) from None
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
        try:
            os.replace(staging, out)
        except OSError:
            os.replace(trash / "old", out)  # put the earlier phantom back
            raise
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
    a phantom's own files). Raises :class:`~ichseg.errors.IchsegError` subclasses on bad arguments.

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
        _write_marker(staging / PHANTOM_MARKER, release, n, list(slices), s, int(seed))
        _check_target(out, overwrite)  # it may have appeared while we were writing
        _move_into_place(staging, out)
    return PhantomManifest(root=out, release=release, patients=tuple(patients))
