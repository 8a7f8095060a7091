"""DICOM CT series in, DICOM SEG out (the optional extra ``pip install 'ichseg[dicom]'``).

:func:`find_series` lists the image series under a folder, :func:`read_series` turns one into the
int16 HU NIfTI image the rest of ichseg works on, :func:`write_seg` writes a predicted mask back as
a DICOM Segmentation that references the source slices, and :func:`write_series` writes a small CT
series (for tests and examples); the last two live in :mod:`ichseg.io.dicom_write` and are
re-exported here on first use.

The reader is pydicom with ichseg's own slice ordering, not SimpleITK's ``ImageSeriesReader``:
pydicom is pure Python and small, it gives exact control over what is refused (each refusal is a
one-sentence :class:`~ichseg.errors.DatasetError` naming the series), and it is the package
highdicom builds on, so reading and writing share one dependency. SimpleITK would add a 50+ MB
binary and resamples, or only warns, when the slice spacing is not uniform. Slices are ordered by
projecting ``ImagePositionPatient`` onto the slice normal (the cross product of the row and column
directions of ``ImageOrientationPatient``), never by file name or ``InstanceNumber``. Series that
would need resampling (gantry/detector tilt, missing slices, non-uniform spacing, mixed
orientation or pixel spacing) are refused rather than silently resampled; dcm2niix corrects them.

pydicom and highdicom are imported inside the functions, so ``import ichseg.io.dicom`` works
without them; :func:`is_dicom_folder` needs neither. Only DICOM Part 10 files (the 128-byte
preamble then ``DICM``) are recognised.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import ConfigError, DatasetError, first_line

#: Largest difference between two slices' ImageOrientationPatient (direction cosines).
IOP_TOLERANCE = 1e-4
#: Largest difference between two slices' PixelSpacing, in mm.
SPACING_TOLERANCE_MM = 1e-4
#: Largest in-plane offset of a slice from the first one (the positions of a series without tilt
#: lie on a line along the normal), in mm: above rounding of the positions, below any real tilt.
TILT_TOLERANCE_MM = 0.02
#: Two slices closer than this along the normal share a position, in mm.
DUPLICATE_TOLERANCE_MM = 0.01
#: A step between neighbouring slices above this many median steps is a missing slice.
GAP_FACTOR = 1.5

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_SKIPPED_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "PR", "KO", "REG", "RTPLAN"})
_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def _require(module: str, what: str = "reading DICOM") -> Any:
    """Import ``module`` (pydicom or highdicom), or raise the ConfigError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the optional extra: pip install 'ichseg[dicom]'") from None


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM image series found by :func:`find_series`.

    ``name`` is filesystem-safe and unique among the series found together
    (``<PatientID>_<SeriesNumber>``); ``files`` are sorted by path (not by slice position);
    ``folder`` is the deepest folder holding all of them; ``description`` names the series in
    messages (series number, SeriesDescription, patient).
    """

    uid: str
    name: str
    files: tuple[Path, ...]
    folder: Path
    description: str

    def relative(self, path: Path) -> str:
        """``path`` relative to the series folder, for messages."""
        try:
            return str(path.relative_to(self.folder))
        except ValueError:
            return str(path)

    def problem(self, text: str) -> DatasetError:
        """A DatasetError about this series: ``<description> in <folder>: <text>``."""
        return DatasetError(f"{self.description} in {self.folder}: {text}", self.folder)


def _has_dicom_magic(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (128-byte preamble, then ``DICM``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _walk_files(folder: Path) -> list[Path]:
    """Every regular file under ``folder``, recursively, sorted by path."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(Path(root) / name for name in sorted(files))
    return found


def is_dicom_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether any file under ``folder`` (recursively) is a DICOM Part 10 file; stops at the first
    one. Needs neither pydicom nor highdicom."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if _has_dicom_magic(Path(root) / name):
                return True
    return False


def _safe_name(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]`` (runs of anything else become ``_``), never hidden
    and never ``.`` or ``..``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")


def _uid_suffix(uid: str) -> str:
    return re.sub(r"[^0-9]", "", uid)[-8:] or "0"


def _is_image(ds: Any) -> bool:
    """Whether a header is an image slice: pixel rows and columns, and not a SEG, SR, structure
    set or presentation state (whose Modality says so)."""
    if str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
        return False
    if str(ds.get("Modality", "")).upper() in _SKIPPED_MODALITIES:
        return False
    return "Rows" in ds and "Columns" in ds and "SeriesInstanceUID" in ds


def find_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """The DICOM image series under ``folder`` (recursively), sorted by name.

    Files that are not DICOM (text, NIfTI, ...) and DICOM objects that are not image slices
    (DICOMDIR, SEG, SR, presentation states) are skipped; slices are grouped by
    SeriesInstanceUID. Raises :class:`~ichseg.errors.DatasetError` for a missing folder or a
    DICOM file whose header cannot be read, and :class:`~ichseg.errors.ConfigError` without
    pydicom.
    """
    pydicom = _require("pydicom")
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder of DICOM files", folder)
    groups: dict[str, list[Path]] = {}
    headers: dict[str, Any] = {}
    for path in _walk_files(folder):
        if not _has_dicom_magic(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # pydicom raises many types for a damaged header
            raise DatasetError(
                f"{path}: unreadable DICOM header ({first_line(err)})", path
            ) from None
        if not _is_image(ds):
            continue
        uid = str(ds.SeriesInstanceUID)
        groups.setdefault(uid, []).append(path)
        headers.setdefault(uid, ds)

    base_names: dict[str, str] = {}
    for uid, ds in headers.items():
        patient = _safe_name(str(ds.get("PatientID", "") or ""))
        number = ds.get("SeriesNumber", None)
        number_text = _safe_name(str(number)) if number not in (None, "") else ""
        if patient and number_text:
            base_names[uid] = f"{patient}_{number_text}"
        else:
            base_names[uid] = f"{patient or 'series'}_{_uid_suffix(uid)}"
    counts: dict[str, int] = {}
    for name in base_names.values():
        counts[name] = counts.get(name, 0) + 1
    names: dict[str, str] = {}
    taken: set[str] = set()
    for uid in sorted(base_names):
        name = base_names[uid]
        if counts[name] > 1:
            name = f"{name}_{_uid_suffix(uid)}"
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}_{n}", n + 1
        taken.add(unique)
        names[uid] = unique

    series = []
    for uid, files in groups.items():
        ds = headers[uid]
        common = Path(os.path.commonpath([str(p.parent) for p in files]))
        number = ds.get("SeriesNumber", None)
        text = f"DICOM series {number if number not in (None, '') else '(no number)'}"
        label = str(ds.get("SeriesDescription", "") or "").strip()
        if label:
            text += f" ({label})"
        text += f" of patient {str(ds.get('PatientID', '') or '') or '(no ID)'}"
        series.append(DicomSeries(uid, names[uid], tuple(files), common, text))
    return sorted(series, key=lambda s: s.name)


@dataclass(frozen=True)
class _Geometry:
    """A series' slices in ascending order along the normal, and its voxel-to-LPS geometry."""

    headers: tuple[Any, ...]
    files: tuple[Path, ...]
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as in DICOM
    slice_spacing: float
    origin: np.ndarray
    rows: int
    columns: int


def _floats(value: Any) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)


def _fmt(values: np.ndarray) -> str:
    """A vector for a message: ``[1, 0, 0]``."""
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def _read_headers(series: DicomSeries, pydicom: Any) -> list[Any]:
    """The headers of ``series``' files, each checked to be one greyscale frame with geometry."""
    rel = series.relative
    headers = []
    for path in series.files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as err:  # pydicom raises many types for a damaged header
            raise series.problem(
                f"unreadable DICOM header in {rel(path)} ({first_line(err)})"
            ) from None
    if not headers:
        raise series.problem("the series has no slices")
    for path, ds in zip(series.files, headers, strict=True):
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise series.problem(
                f"{rel(path)} is a multi-frame image ({frames} frames), which is not supported yet"
            )
        missing = [tag for tag in _GEOMETRY_TAGS if ds.get(tag, None) in (None, "")]
        if missing:
            raise series.problem(
                f"{rel(path)} lacks the geometry tag(s) {', '.join(missing)}, "
                "so its place in the volume is unknown"
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise series.problem(f"{rel(path)} is not a greyscale image (SamplesPerPixel != 1)")
    return headers


def _common_plane(
    series: DicomSeries, headers: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """ImageOrientationPatient, PixelSpacing and (Rows, Columns), checked to be the same in every
    slice (in ``series.files`` order) and the spacing positive."""
    rel, first = series.relative, headers[0]
    iop0 = _floats(first.ImageOrientationPatient)
    spacing0 = _floats(first.PixelSpacing)
    size0 = (int(first.Rows), int(first.Columns))
    if iop0.shape != (6,) or spacing0.shape != (2,):
        raise series.problem(
            f"{rel(series.files[0])} has a malformed ImageOrientationPatient or PixelSpacing"
        )
    for path, ds in zip(series.files, headers, strict=True):
        iop = _floats(ds.ImageOrientationPatient)
        if iop.shape != (6,) or np.abs(iop - iop0).max() > IOP_TOLERANCE:
            raise series.problem(
                "the slices have differing ImageOrientationPatient "
                f"({_fmt(iop0)} in {rel(series.files[0])}, {_fmt(iop)} in {rel(path)})"
            )
        spacing = _floats(ds.PixelSpacing)
        if spacing.shape != (2,) or np.abs(spacing - spacing0).max() > SPACING_TOLERANCE_MM:
            raise series.problem(
                "the slices have differing PixelSpacing "
                f"({_fmt(spacing0)} mm in {rel(series.files[0])}, "
                f"{_fmt(spacing)} mm in {rel(path)})"
            )
        size = (int(ds.Rows), int(ds.Columns))
        if size != size0:
            raise series.problem(
                "the slices have differing sizes (Rows x Columns "
                f"{size0[0]}x{size0[1]} in {rel(series.files[0])}, "
                f"{size[0]}x{size[1]} in {rel(path)})"
            )
    if min(spacing0) <= 0:
        raise series.problem(f"PixelSpacing {_fmt(spacing0)} is not positive")
    return iop0, spacing0, size0


def _directions(series: DicomSeries, iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The row and column directions of ``iop`` (checked orthonormal) and the unit slice normal."""
    row_dir, col_dir = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(float(row_dir @ col_dir)) > 1e-3
    ):
        raise series.problem(
            f"ImageOrientationPatient {_fmt(iop)} is not two orthogonal unit vectors"
        )
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    return row_dir, col_dir, normal


def _sort_along(
    series: DicomSeries, headers: Sequence[Any], normal: np.ndarray
) -> tuple[list[Any], tuple[Path, ...], np.ndarray, np.ndarray]:
    """Headers, files, ImagePositionPatient and position along ``normal``, in ascending order
    along the normal (stable, so ties keep file order)."""
    positions = np.stack([_floats(ds.ImagePositionPatient) for ds in headers])
    if positions.shape[1] != 3:
        raise series.problem("an ImagePositionPatient does not hold 3 values")
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    files = tuple(series.files[i] for i in order)
    return [headers[i] for i in order], files, positions[order], along[order]


def _check_tilt(
    series: DicomSeries, positions: np.ndarray, along: np.ndarray, normal: np.ndarray
) -> None:
    """Refuse a series whose sorted slice positions do not lie on a line along the normal."""
    offsets = positions - positions[0]
    in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    worst = int(np.argmax(in_plane))
    if in_plane[worst] > TILT_TOLERANCE_MM:
        distance = float(along[worst] - along[0])
        angle = math.degrees(math.atan2(float(in_plane[worst]), abs(distance)))
        raise series.problem(
            f"the slice positions drift {in_plane[worst]:.2f} mm across the slice plane over "
            f"{abs(distance):.2f} mm along the normal (gantry/detector tilt of about "
            f"{angle:.1f} degrees), which ichseg does not correct; resample the series first, "
            "e.g. with dcm2niix"
        )


def _slice_spacing(
    series: DicomSeries, headers: Sequence[Any], files: Sequence[Path], along: np.ndarray
) -> float:
    """The spacing between sorted slices, refusing duplicate positions, gaps and non-uniform
    steps; a single slice's is its SliceThickness (or SpacingBetweenSlices)."""
    rel = series.relative
    if len(headers) == 1:
        first = headers[0]
        thickness = first.get("SliceThickness", None) or first.get("SpacingBetweenSlices", None)
        if thickness in (None, "") or float(thickness) <= 0:
            raise series.problem(
                "a single slice without a positive SliceThickness has no slice spacing"
            )
        return float(thickness)
    steps = np.diff(along)
    dup = int(np.argmin(steps))
    if steps[dup] < DUPLICATE_TOLERANCE_MM:
        raise series.problem(
            f"{rel(files[dup])} and {rel(files[dup + 1])} share the slice position "
            f"{along[dup]:.2f} mm along the normal (duplicate slices)"
        )
    median = float(np.median(steps))
    gap = int(np.argmax(steps))
    if steps[gap] > GAP_FACTOR * median:
        raise series.problem(
            f"slices are missing: a gap of {steps[gap]:.2f} mm between the slice positions "
            f"{along[gap]:.2f} and {along[gap + 1]:.2f} mm along the normal, where the "
            f"spacing is {median:.2f} mm"
        )
    if float(np.abs(steps - median).max()) > max(0.02, 0.01 * median):
        raise series.problem(
            f"the slice spacing is not uniform ({steps.min():.3f} to {steps.max():.3f} mm), "
            "which ichseg does not resample; resample the series first, e.g. with dcm2niix"
        )
    return float(along[-1] - along[0]) / (len(headers) - 1)


def _geometry(series: DicomSeries, pydicom: Any) -> _Geometry:
    """Read the headers of ``series``, check that they form a regular volume, sort them."""
    headers = _read_headers(series, pydicom)
    iop, spacing, size = _common_plane(series, headers)
    row_dir, col_dir, normal = _directions(series, iop)
    headers, files, positions, along = _sort_along(series, headers, normal)
    _check_tilt(series, positions, along, normal)
    return _Geometry(
        headers=tuple(headers),
        files=files,
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_spacing=_slice_spacing(series, headers, files, along),
        origin=positions[0],
        rows=size[0],
        columns=size[1],
    )


def _affine_ras(geo: _Geometry) -> np.ndarray:
    """The voxel (i = column, j = row, k = slice) to RAS millimetre affine of a geometry."""
    affine = np.eye(4)
    affine[:3, 0] = geo.row_dir * geo.pixel_spacing[1]
    affine[:3, 1] = geo.col_dir * geo.pixel_spacing[0]
    affine[:3, 2] = geo.normal * geo.slice_spacing
    affine[:3, 3] = geo.origin
    affine[:2, :] *= -1  # LPS -> RAS
    return affine


def read_series(series: DicomSeries) -> Any:
    """The series as a nibabel ``Nifti1Image`` of int16 Hounsfield units.

    ``data[i, j, k]``: i is the column index (along a row), j the row index, k the slice in
    ascending order along the slice normal. HU = stored value x RescaleSlope + RescaleIntercept,
    rounded and clipped to int16. The affine (qform and sform, code 1 = scanner) maps voxels to
    RAS millimetres; a standard axial CT comes out as LPS (``nibabel.aff2axcodes``).

    Raises :class:`~ichseg.errors.DatasetError` naming the series when its slices differ in
    orientation, pixel spacing or size, show gantry tilt, miss slices, share positions, are
    multi-frame, lack geometry tags, or hold pixel data that cannot be decoded.
    """
    pydicom = _require("pydicom")
    import nibabel as nib

    geo = _geometry(series, pydicom)
    volume = np.empty((geo.columns, geo.rows, len(geo.files)), dtype=np.int16)
    for k, path in enumerate(geo.files):
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:  # pydicom raises many types for a damaged file
            raise series.problem(
                f"{series.relative(path)} is unreadable ({first_line(err)})"
            ) from None
        try:
            stored = ds.pixel_array
        except Exception as err:  # missing decoder, truncated data, ...
            syntax = ds.file_meta.get("TransferSyntaxUID", None)
            if syntax is not None and syntax.is_compressed:
                raise series.problem(
                    f"the pixel data of {series.relative(path)} cannot be decoded (transfer syntax "
                    f"{syntax.name}, {syntax}: {first_line(err).rstrip(':')}); a decoder such as "
                    "`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` may decode it"
                ) from None
            raise series.problem(
                f"the pixel data of {series.relative(path)} cannot be read ({first_line(err)})"
            ) from None
        if stored.shape != (geo.rows, geo.columns):
            raise series.problem(
                f"the pixel data of {series.relative(path)} has shape {stored.shape}, "
                f"not Rows x Columns {geo.rows}x{geo.columns}"
            )
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu = np.rint(stored.astype(np.float64) * slope + intercept)
        volume[:, :, k] = np.clip(hu, -32768, 32767).astype(np.int16).T

    affine = _affine_ras(geo)
    image = nib.Nifti1Image(volume, affine)
    image.set_data_dtype(np.int16)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_zooms((geo.pixel_spacing[1], geo.pixel_spacing[0], geo.slice_spacing))
    image.header.set_xyzt_units("mm")
    return image


def __getattr__(name: str) -> Any:
    """``write_seg`` and ``write_series``, from :mod:`ichseg.io.dicom_write` (imported lazily, as
    it imports this module)."""
    if name in ("write_seg", "write_series"):
        from ichseg.io import dicom_write

        return getattr(dicom_write, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
