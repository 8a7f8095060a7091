"""Where the files of each CT-ICH release are: the release of a folder, and each patient's files.

:func:`find_release` tells the NIfTI release (1.3.x: ``ct_scans/``, ``masks/``) from the JPG one
(1.0-1.2: ``Patients_CT/NNN/brain|bone/``) and finds its root; the indexers list each patient's
files without decoding any image, one problem one sentence naming the file (docs/data.md).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ichseg.errors import DatasetError, DatasetWarning

Release = Literal["nifti", "jpg"]

_NIFTI_NAME = re.compile(r"^(\d+)\.nii(?:\.gz)?$")
_JPG_IMAGE_NAME = re.compile(r"^(\d+)\.jpg$", re.IGNORECASE)
_JPG_MASK_NAME = re.compile(r"^(\d+)_HGE_Seg\.jpg$", re.IGNORECASE)
_PATIENT_DIR = re.compile(r"^\d+$")

#: The file an ichseg phantom writes at the root of its release: the generator's arguments. Its
#: presence marks the data as synthetic, so that every report on it says so.
PHANTOM_MARKER = "ichseg_phantom.json"


def is_synthetic(release_root: str | Path) -> bool:
    """Whether the release folder ``release_root`` (as :func:`find_release` returns it) was
    written by :func:`ichseg.data.phantom.generate_phantom` (it holds :data:`PHANTOM_MARKER`)."""
    return (Path(release_root) / PHANTOM_MARKER).is_file()


@dataclass
class _PatientFiles:
    """Where one patient's files are (no image decoded)."""

    patient_id: int
    image: Path  # NIfTI scan file, or the JPG patient folder
    mask: Path | None = None  # NIfTI mask file
    jpg_slices: dict[int, Path] = field(default_factory=dict)  # slice number -> brain JPG
    jpg_masks: dict[int, Path] = field(default_factory=dict)
    jpg_bone: dict[int, Path] = field(default_factory=dict)


def find_release(root: str | Path) -> tuple[Path, Release]:
    """Locate a CT-ICH release under ``root`` and say which one it is.

    ``root`` may be the release folder itself or a folder holding exactly one release folder (as
    unpacked from the PhysioNet archive).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: dataset root does not exist", root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a folder", root)
    release = _release_of(root)
    if release is not None:
        return root, release
    children = [child for child in sorted(root.iterdir()) if child.is_dir() and _release_of(child)]
    if len(children) == 1:
        return children[0], _release_of(children[0])  # type: ignore[return-value]
    if not any(root.iterdir()):
        raise DatasetError(f"{root}: dataset root is empty", root)
    raise DatasetError(
        f"{root}: not a CT-ICH release (expected ct_scans/ and masks/ for the NIfTI release 1.3.x, "
        "or Patients_CT/ for the JPG release 1.0-1.2)",
        root,
    )


def _release_of(folder: Path) -> Release | None:
    if (folder / "ct_scans").is_dir() or (folder / "masks").is_dir():
        return "nifti"
    if (folder / "Patients_CT").is_dir():
        return "jpg"
    return None


def _skipped(path: Path, expected: str) -> None:
    """Warn (:class:`~ichseg.errors.DatasetWarning`) that ``path`` is not read: its name is not
    one of the release's. Hidden files (``.DS_Store``) are skipped silently."""
    if not path.name.startswith("."):
        warnings.warn(f"{path}: skipped, the name is not {expected}", DatasetWarning, stacklevel=3)


def _find_file(folder: Path, name: str) -> Path | None:
    """``folder/name``, matching the name case-insensitively (``Patient_demographics.csv``)."""
    exact = folder / name
    if exact.is_file():
        return exact
    for candidate in sorted(folder.iterdir()):
        if candidate.name.lower() == name.lower() and candidate.is_file():
            return candidate
    return None


def _index_nifti(
    root: Path, problems: list[DatasetError], seen: set[int]
) -> dict[int, _PatientFiles]:
    scans_dir, masks_dir = root / "ct_scans", root / "masks"
    for folder in (scans_dir, masks_dir):
        if not folder.is_dir():
            problems.append(
                DatasetError(
                    f"{folder}: folder missing (the NIfTI release needs ct_scans/ and masks/)",
                    folder,
                )
            )
    scans = _nifti_files(scans_dir, problems)
    masks = _nifti_files(masks_dir, problems)
    patients: dict[int, _PatientFiles] = {}
    for patient, scan_path in sorted(scans.items()):
        mask_path = masks.get(patient)
        if mask_path is None and masks_dir.is_dir():
            problems.append(
                DatasetError(f"{scan_path}: scan has no mask in {masks_dir}", scan_path)
            )
        patients[patient] = _PatientFiles(patient, scan_path, mask_path)
    seen.update(scans, masks)
    for patient, mask_path in sorted(masks.items()):
        if patient not in scans and scans_dir.is_dir():
            problems.append(
                DatasetError(f"{mask_path}: mask has no scan in {scans_dir}", mask_path)
            )
    return patients


def _nifti_files(folder: Path, problems: list[DatasetError]) -> dict[int, Path]:
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        match = _NIFTI_NAME.match(path.name)
        if not match:
            _skipped(path, "a patient number (NNN.nii or NNN.nii.gz)")
            continue
        patient = int(match.group(1))
        if patient in found:
            problems.append(
                DatasetError(
                    f"{path}: patient {patient} has two files "
                    f"({found[patient].name} and {path.name})",
                    path,
                )
            )
            continue
        found[patient] = path
    return found


def _index_jpg(
    root: Path, problems: list[DatasetError], seen: set[int]
) -> dict[int, _PatientFiles]:
    patients_dir = root / "Patients_CT"
    patients: dict[int, _PatientFiles] = {}
    if not patients_dir.is_dir():
        problems.append(
            DatasetError(
                f"{patients_dir}: folder missing (the JPG release needs Patients_CT/)", patients_dir
            )
        )
        return patients
    for folder in sorted(patients_dir.iterdir()):
        if not folder.is_dir() or not _PATIENT_DIR.match(folder.name):
            _skipped(folder, "a patient folder (NNN/)")
            continue
        files = _PatientFiles(int(folder.name), folder)
        seen.add(files.patient_id)
        brain_dir, bone_dir = folder / "brain", folder / "bone"
        if not brain_dir.is_dir():
            problems.append(DatasetError(f"{brain_dir}: folder missing", brain_dir))
            continue
        for path in brain_dir.iterdir():
            if match := _JPG_IMAGE_NAME.match(path.name):
                files.jpg_slices[int(match.group(1))] = path
            elif match := _JPG_MASK_NAME.match(path.name):
                files.jpg_masks[int(match.group(1))] = path
            else:
                _skipped(path, "a slice image or mask (K.jpg or K_HGE_Seg.jpg)")
        if bone_dir.is_dir():
            for path in bone_dir.iterdir():
                if match := _JPG_IMAGE_NAME.match(path.name):
                    files.jpg_bone[int(match.group(1))] = path
                else:
                    _skipped(path, "a slice image (K.jpg)")
        if not files.jpg_slices:
            problems.append(DatasetError(f"{brain_dir}: no slice images (K.jpg)", brain_dir))
            continue
        numbers = sorted(files.jpg_slices)
        if numbers != list(range(1, len(numbers) + 1)):
            gaps = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
            problems.append(
                DatasetError(
                    f"{brain_dir}: slice images are not numbered 1..N "
                    f"(missing {_short_list(gaps)})",
                    brain_dir,
                )
            )
            continue
        for number, mask_path in sorted(files.jpg_masks.items()):
            if number not in files.jpg_slices:
                problems.append(
                    DatasetError(f"{mask_path}: mask has no slice image {number}.jpg", mask_path)
                )
        patients[files.patient_id] = files
    return patients


def _short_list(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")
