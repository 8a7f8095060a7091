"""Read the PhysioNet CT-ICH dataset, either release, into per-patient :class:`Scan` records.

Two layouts exist (docs/data.md):

* NIfTI release 1.3.x: ``ct_scans/NNN.nii[.gz]`` (int16 HU, slices on axis 2),
  ``masks/NNN.nii[.gz]``, ``hemorrhage_diagnosis_raw_ct.csv``, ``Patient_demographics.csv``.
* JPG release 1.0-1.2: ``Patients_CT/NNN/brain/K.jpg`` (brain window), ``brain/K_HGE_Seg.jpg``
  (mask, only for slices with ICH), ``bone/K.jpg`` (bone window), ``hemorrhage_diagnosis.csv``,
  ``patient_demographics.csv``.

:func:`open_dataset` recognises the release and indexes files and CSVs without decoding any image;
:meth:`CTICHDataset.load` decodes one patient at a time, so iterating the whole release holds one
scan (and at most one float copy of it) in memory. Problems are reported as
:class:`~ichseg.errors.DatasetError` with one sentence naming the file; the same sentences feed the
dataset check (``python -m ichseg.data.check``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ichseg.data.labels import (  # the dataset's records, also importable from here
    DEMOGRAPHICS_FILE,
    LABEL_COLUMNS,
    LABEL_FILES,
    SUBTYPE_COLUMNS,
    SUBTYPES,
    Demographics,
    SliceLabels,
    read_demographics,
    read_slice_labels,
)
from ichseg.data.layout import (  # finding a release's files, also importable from here
    Release,
    _find_file,
    _index_jpg,
    _index_nifti,
    _PatientFiles,
    find_release,
    is_synthetic,
)
from ichseg.data.windowing import apply_window
from ichseg.errors import ConfigError, DatasetError, DatasetProblems, first_line
from ichseg.io.nifti import as_hu, image_data, load_image, spacing_volume_ml, voxel_spacing_mm

__all__ = [
    "DEMOGRAPHICS_FILE", "JPG_MASK_THRESHOLD", "LABEL_COLUMNS", "LABEL_FILES", "SUBTYPES",
    "SUBTYPE_COLUMNS", "CTICHDataset", "Demographics", "Release", "Scan", "SliceLabels",
    "find_release", "index_dataset", "open_dataset", "read_demographics", "read_slice_labels",
]  # fmt: skip

#: Grey levels above this are mask in the (lossy) JPG masks.
JPG_MASK_THRESHOLD = 127


# --------------------------------------------------------------------------- records


@dataclass
class Scan:
    """One patient's scan, decoded.

    ``image`` is int16 Hounsfield units (NIfTI release) or the uint8 brain window (JPG release),
    shape (H, W, N) with slices on axis 2 as in the NIfTI files. ``bone`` is the JPG release's uint8
    bone window (missing bone JPGs are zero-filled and listed in ``missing_bone_slices``, 1-based);
    None for the NIfTI release, whose windows are computed from HU. ``mask`` is bool (H, W, N).
    ``spacing`` (mm, per array axis) and ``affine`` come from the NIfTI header; the JPG release has
    neither (None).
    """

    patient_id: int
    release: Release
    image: np.ndarray
    mask: np.ndarray
    labels: SliceLabels
    demographics: Demographics | None
    spacing: tuple[float, float, float] | None
    affine: np.ndarray | None
    paths: dict[str, Path]
    bone: np.ndarray | None = None
    missing_bone_slices: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[2])

    @property
    def voxel_volume_ml(self) -> float | None:
        """Volume of one voxel in mL from the header spacing (None without spacing)."""
        return None if self.spacing is None else spacing_volume_ml(self.spacing)

    def available_windows(self) -> tuple[str, ...]:
        """CT windows this scan can provide as channels."""
        if self.release == "nifti":
            from ichseg.data.windowing import WINDOWS

            return tuple(WINDOWS)
        return ("brain", "bone")

    def windowed(
        self, names: Sequence[str] = ("brain",), dtype: np.dtype | type | str = np.uint8
    ) -> np.ndarray:
        """The scan as windowed slices, channels stacked: ``(N, C, H, W)`` contiguous.

        ``dtype`` uint8 (0-255) or float (0-1). The JPG release offers only ``brain`` and ``bone``.
        """
        dtype = np.dtype(dtype)
        height, width, n_slices = self.image.shape
        out = np.empty((n_slices, len(names), height, width), dtype=dtype)
        for channel, name in enumerate(names):
            out[:, channel] = np.moveaxis(self._window_volume(name, dtype), 2, 0)
        return out

    def mask_slices(self) -> np.ndarray:
        """The mask as ``(N, H, W)`` bool, contiguous."""
        return np.ascontiguousarray(np.moveaxis(self.mask, 2, 0))

    def _window_volume(self, name: str, dtype: np.dtype) -> np.ndarray:
        if self.release == "nifti":
            return apply_window(self.image, name, dtype)
        stored = {"brain": self.image, "bone": self.bone}
        if name not in stored or stored[name] is None:
            raise ConfigError(
                f"the JPG release of patient {self.patient_id:03d} has only brain and bone "
                f"windows, not {name!r}"
            )
        volume = stored[name]
        if dtype == np.uint8:
            return volume
        return volume.astype(dtype) / np.asarray(255.0, dtype=dtype)


# --------------------------------------------------------------------------- the dataset


class CTICHDataset:
    """A CT-ICH release on disk, indexed lazily: ``load(patient_id)`` decodes one scan.

    Construct with :func:`open_dataset`. Iterating yields :class:`Scan` records one at a time.
    ``labels`` (per-slice CSV labels) and ``demographics`` are read at construction; images are not.
    """

    def __init__(
        self,
        root: Path,
        release: Release,
        files: dict[int, _PatientFiles],
        labels: dict[int, SliceLabels],
        demographics: dict[int, Demographics],
        labels_path: Path,
        demographics_path: Path | None,
    ) -> None:
        self.root = root
        self.release: Release = release
        self._files = files
        self.labels = labels
        self.demographics = demographics
        self.labels_path = labels_path
        self.demographics_path = demographics_path

    @property
    def synthetic(self) -> bool:
        """True for a generated phantom (:func:`ichseg.data.layout.is_synthetic`), whose reports
        carry a banner saying the data is synthetic."""
        return is_synthetic(self.root)

    @property
    def patient_ids(self) -> list[int]:
        """Patients with images, ascending."""
        return sorted(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[Scan]:
        for patient in self.patient_ids:
            yield self.load(patient)

    def __repr__(self) -> str:
        return (
            f"CTICHDataset(root={str(self.root)!r}, release={self.release!r}, patients={len(self)})"
        )

    def n_slices(self, patient_id: int) -> int:
        """Slices of a patient, from the label CSV (no image decoded)."""
        return self.labels[patient_id].n_slices

    def patient_labels(self) -> np.ndarray:
        """(P, 6) bool per patient in :attr:`patient_ids` order:
        [has ICH, IVH, IPH, SAH, EDH, SDH].
        """
        table = np.zeros((len(self), 6), dtype=bool)
        for row, patient in enumerate(self.patient_ids):
            subtypes = self.labels[patient].patient_subtypes()
            table[row, 0] = subtypes.any()
            table[row, 1:] = subtypes
        return table

    def orientation(self) -> tuple[str, str, str] | None:
        """The array orientation (axis codes, :mod:`ichseg.io.orientation`) most of the scans'
        headers give; None for the JPG release, which has no header. Only headers are read."""
        if self.release != "nifti":
            return None
        if not hasattr(self, "_orientation"):
            from ichseg.io.orientation import axcodes, most_common

            codes = []
            for patient in self.patient_ids:
                try:
                    codes.append(axcodes(load_image(self._files[patient].image).affine))
                except (DatasetError, ValueError):
                    continue  # the scan's own reader names the problem when it is loaded
            self._orientation = most_common(codes)
        return self._orientation

    def load(self, patient_id: int) -> Scan:
        """Decode one patient's scan; raises :class:`DatasetError` naming the file on a problem."""
        try:
            files = self._files[patient_id]
        except KeyError:
            raise DatasetError(
                f"{self.root}: no scan for patient {patient_id}", self.root
            ) from None
        labels = self.labels[patient_id]
        if self.release == "nifti":
            scan = _load_nifti(files, labels)
        else:
            scan = _load_jpg(files, labels)
        scan.demographics = self.demographics.get(patient_id)
        return scan


def open_dataset(root: str | Path) -> CTICHDataset:
    """Recognise and index the CT-ICH release under ``root`` (no image is decoded).

    Raises :class:`DatasetError` (or :class:`DatasetProblems` listing several) for a missing root or
    folders, a scan without mask, a label CSV that is missing or lacks a column, CSV rows for a
    patient without images, or images without CSV rows.
    """
    dataset, problems = index_dataset(root)
    if problems:
        raise problems[0] if len(problems) == 1 else DatasetProblems(problems)
    assert dataset is not None
    return dataset


def index_dataset(root: str | Path) -> tuple[CTICHDataset | None, list[DatasetError]]:
    """Index a release, collecting every structural problem instead of stopping at the first.

    Returns the dataset restricted to the patients that are consistent (None when nothing could be
    indexed) and the list of problems. Used by the dataset check.
    """
    try:
        root, release = find_release(root)
    except DatasetError as err:
        return None, [err]
    problems: list[DatasetError] = []
    seen: set[int] = set()  # patients with any file, even broken ones (reported once, above)
    index = _index_nifti if release == "nifti" else _index_jpg
    files = index(root, problems, seen)

    labels_path = _find_file(root, LABEL_FILES[release]) or _find_file(
        root, LABEL_FILES["jpg" if release == "nifti" else "nifti"]
    )
    if labels_path is None:
        missing = root / LABEL_FILES[release]
        problems.append(DatasetError(f"{missing}: label CSV missing", missing))
        return None, problems
    try:
        labels = read_slice_labels(labels_path)
    except DatasetError as err:
        problems.append(err)
        return None, problems

    demographics_path = _find_file(root, DEMOGRAPHICS_FILE)
    demographics: dict[int, Demographics] = {}
    if demographics_path is not None:
        try:
            demographics = read_demographics(demographics_path)
        except DatasetError as err:
            problems.append(err)

    for patient in sorted(set(labels) - seen):
        problems.append(
            DatasetError(
                f"{labels_path}: rows for patient {patient} but no images of that patient",
                labels_path,
            )
        )
    consistent: dict[int, _PatientFiles] = {}
    for patient, patient_files in sorted(files.items()):
        if patient not in labels:
            problems.append(
                DatasetError(
                    f"{patient_files.image}: images of patient {patient} "
                    f"have no rows in {labels_path.name}",
                    patient_files.image,
                )
            )
            continue
        if release == "jpg":
            n_images, n_rows = len(patient_files.jpg_slices), labels[patient].n_slices
            if n_images != n_rows:
                problems.append(
                    DatasetError(
                        f"{patient_files.image}: {n_images} slice images "
                        f"but {n_rows} rows in {labels_path.name}",
                        patient_files.image,
                    )
                )
                continue
        if release == "nifti" and patient_files.mask is None:
            continue
        consistent[patient] = patient_files
    dataset = CTICHDataset(
        root, release, consistent, labels, demographics, labels_path, demographics_path
    )
    return dataset, problems


# --------------------------------------------------------------------------- decoding


def _load_nifti(files: _PatientFiles, labels: SliceLabels) -> Scan:
    assert files.mask is not None
    image, affine, spacing = _read_nifti(files.image, want_hu=True)
    mask_data, _, _ = _read_nifti(files.mask, want_hu=False)
    if mask_data.shape != image.shape:
        raise DatasetError(
            f"{files.mask}: mask shape {mask_data.shape} differs from its scan "
            f"{files.image.name} {image.shape}",
            files.mask,
        )
    if image.shape[2] != labels.n_slices:
        raise DatasetError(
            f"{files.image}: {image.shape[2]} slices but {labels.n_slices} rows in the label CSV",
            files.image,
        )
    return Scan(
        patient_id=files.patient_id,
        release="nifti",
        image=image,
        mask=mask_data,
        labels=labels,
        demographics=None,
        spacing=spacing,
        affine=affine,
        paths={"image": files.image, "mask": files.mask},
    )


def _read_nifti(
    path: Path, want_hu: bool
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Decode a NIfTI volume: int16 HU (``want_hu``) or a bool mask (``> 0``).

    The scan's spacing comes from its raw header (:func:`~ichseg.io.nifti.voxel_spacing_mm`: zero,
    negative or non-finite voxel sizes are an error, never 1 mm); a mask's is not used.
    """
    img = load_image(path)
    spacing = voxel_spacing_mm(path, img) if want_hu else (math.nan,) * 3
    data = image_data(img, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not want_hu:
        if data.dtype.kind == "f" and np.isnan(data).any():
            raise DatasetError(f"{path}: mask contains NaN values", path)
        return data > 0, affine, spacing  # type: ignore[return-value]
    return as_hu(data, str(path), path), affine, spacing  # type: ignore[return-value]


def _load_jpg(files: _PatientFiles, labels: SliceLabels) -> Scan:
    numbers = sorted(files.jpg_slices)
    first = _read_jpg(files.jpg_slices[numbers[0]])
    height, width = first.shape
    n_slices = len(numbers)
    brain = np.empty((height, width, n_slices), dtype=np.uint8)
    bone = np.zeros((height, width, n_slices), dtype=np.uint8)
    mask = np.zeros((height, width, n_slices), dtype=bool)
    missing_bone: list[int] = []
    for index, number in enumerate(numbers):
        brain[:, :, index] = _read_jpg(files.jpg_slices[number], (height, width))
        bone_path = files.jpg_bone.get(number)
        if bone_path is None:
            missing_bone.append(number)
        else:
            bone[:, :, index] = _read_jpg(bone_path, (height, width))
        mask_path = files.jpg_masks.get(number)
        if mask_path is not None:
            mask[:, :, index] = _read_jpg(mask_path, (height, width)) > JPG_MASK_THRESHOLD
    return Scan(
        patient_id=files.patient_id,
        release="jpg",
        image=brain,
        mask=mask,
        labels=labels,
        demographics=None,
        spacing=None,
        affine=None,
        paths={
            "image": files.image / "brain",
            "mask": files.image / "brain",
            "bone": files.image / "bone",
        },
        bone=bone,
        missing_bone_slices=tuple(missing_bone),
    )


def _read_jpg(path: Path, expected: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: unreadable JPG ({first_line(err)})", path) from None
    if expected is not None and array.shape != expected:
        raise DatasetError(
            f"{path}: image is {array.shape[1]}x{array.shape[0]} pixels, "
            f"expected {expected[1]}x{expected[0]} like the patient's first slice",
            path,
        )
    return array
