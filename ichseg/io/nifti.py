"""The NIfTI files of ichseg: CT scans in Hounsfield units, masks written like a reference scan,
and the voxel volume in mL from the header (docs/predict.md).

Every function names the file in its :class:`~ichseg.errors.DatasetError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import ConfigError, DatasetError, first_line
from ichseg.utils.atomic import atomic_path

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
#: Spatial units of a NIfTI header (``xyzt_units``) in millimetres; unknown units count as mm.
UNIT_MM: dict[str, float] = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}


def as_hu(
    volume: np.ndarray, name: str = "the volume", path: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """An ``(H, W, N)`` HU volume as int16: floats rounded, values clipped to the int16 range.

    Raises :class:`~ichseg.errors.DatasetError` (about ``path``, when given) for a volume that is
    not 3D, has no slices, holds NaN or infinite values, or is not numeric. The one HU decoding of
    ichseg: the dataset reader and prediction both use it.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DatasetError(
            f"{name}: expected a 3D volume with slices on the third axis, got shape {volume.shape}",
            path,
        )
    if min(volume.shape) == 0:
        raise DatasetError(f"{name}: the volume is empty (shape {volume.shape})", path)
    if volume.dtype == np.int16:
        return volume
    if volume.dtype.kind == "f":
        if not np.isfinite(volume).all():
            raise DatasetError(f"{name}: scan contains NaN or infinite values", path)
        volume = np.rint(volume)
    elif volume.dtype.kind == "b":
        return volume.astype(np.int16)
    elif volume.dtype.kind not in "iu":
        raise DatasetError(f"{name}: unsupported voxel type {volume.dtype} for a CT scan", path)
    return np.clip(volume, -32768, 32767).astype(np.int16)


def load_image(path: str | os.PathLike[str]) -> Any:
    """The 3D nibabel NIfTI image of ``path``, decoded into memory (no view of a file that may
    change); its data is not read yet (:func:`image_data`).

    Raises :class:`~ichseg.errors.DatasetError` naming the file for a missing or unreadable file,
    or a volume that is not 3D.
    """
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(path, mmap=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found", path) from None
    except Exception as err:  # nibabel raises many types for a bad header
        raise DatasetError(f"{path}: unreadable NIfTI ({first_line(err)})", path) from None
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise DatasetError(f"{path}: not a NIfTI image ({type(image).__name__})", path)
    if len(image.shape) != 3:
        raise DatasetError(
            f"{path}: expected a 3D volume with slices on the third axis, "
            f"got shape {tuple(image.shape)}",
            path,
        )
    return image


def image_data(image: Any, path: str | os.PathLike[str]) -> np.ndarray:
    """The voxel array of a :func:`load_image` image, as stored (scaled by the header's slope)."""
    try:
        return np.asanyarray(image.dataobj)
    except Exception as err:  # truncated or corrupt data block
        raise DatasetError(
            f"{path}: unreadable NIfTI data, the file may be truncated ({first_line(err)})", path
        ) from None


def raw_header(path: str | os.PathLike[str], image: Any) -> Any:
    """The header of the NIfTI file ``path`` exactly as stored, before nibabel repairs it.

    nibabel's loader silently "fixes" a header on reading (zero voxel sizes become 1, negative ones
    their absolute value), so ``image.header`` can no longer tell a missing voxel size from a 1 mm
    one; this reads the header block again without those fixes. ``image`` is the
    :func:`load_image` image of ``path`` (its header class reads the block).
    """
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as handle:
            return type(image.header).from_fileobj(handle, check=False)
    except Exception as err:  # nibabel and gzip raise many types for a damaged file
        raise DatasetError(f"{path}: unreadable NIfTI header ({first_line(err)})", path) from None


def voxel_spacing_mm(
    path: str | os.PathLike[str], image: Any | None = None
) -> tuple[float, float, float]:
    """The voxel sizes in mm of the NIfTI file ``path`` along its three array axes, from the raw
    header (``pixdim[1:4]`` in the header's spatial unit; mm when the unit is unknown).

    The one reader of voxel sizes in ichseg: the dataset reader and prediction both use it.
    Raises :class:`~ichseg.errors.DatasetError` naming the file when the stored sizes are not
    three positive finite numbers (zero, negative, NaN or infinite): ichseg never assumes a 1 mm
    voxel. ``image``: the file's :func:`load_image` image, when already loaded.
    """
    if image is None:
        image = load_image(path)
    header = raw_header(path, image)
    pixdim = np.asarray(header.structarr["pixdim"], dtype=np.float64)[1:4]
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        shown = " x ".join(f"{value:g}" for value in pixdim)
        raise DatasetError(
            f"{path}: the header's voxel sizes (pixdim 1-3) are {shown}, not three positive "
            "numbers; fix the header (ichseg does not assume 1 mm voxels)",
            path,
        )
    unit = header.get_xyzt_units()[0]
    scale = UNIT_MM.get(unit, 1.0)
    return tuple(float(value) * scale for value in pixdim)  # type: ignore[return-value]


def read_ct(
    path: str | os.PathLike[str], header_only: bool = False
) -> tuple[np.ndarray | None, Any]:
    """An ``(H, W, N)`` int16 HU volume (None with ``header_only``) and its nibabel image.

    Raises :class:`~ichseg.errors.DatasetError` naming the file for a missing or unreadable file,
    a volume that is not 3D, voxel sizes that are not positive finite numbers in the raw header
    (:func:`voxel_spacing_mm`), or NaN / infinite values.
    """
    image = load_image(path)
    voxel_spacing_mm(path, image)
    if header_only:
        return None, image
    return as_hu(image_data(image, path), str(path), path), image


def save_like(reference: Any, data: np.ndarray, target: Path, description: str) -> None:
    """Write ``data`` atomically as a NIfTI with ``reference``'s affine and header.

    The header keeps the orientation (qform / sform and their codes), zooms and units; its data
    type is set to ``data``'s, the intensity scaling is reset, ``cal_min`` / ``cal_max`` are 0 / 1.
    """
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0.0, 1.0
    header["descrip"] = description.encode("ascii")[:79]
    # the affine is the header's own best affine, so nibabel leaves qform / sform as they are
    image = type(reference)(data, reference.affine, header)
    with atomic_path(target) as tmp:
        image.to_filename(str(tmp))


def spacing_volume_ml(spacing_mm: Any) -> float:
    """Voxel volume in mL of a grid with ``spacing_mm`` (its first three values: x, y, z in mm).

    Raises :class:`~ichseg.errors.ConfigError` unless they are three positive finite numbers.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)[:3]
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ConfigError(f"voxel spacing must be three positive numbers in mm, got {spacing_mm}")
    return float(np.prod(spacing)) / 1000.0


def voxel_volume_ml(header: Any) -> float:
    """Voxel volume in mL from a NIfTI header's ``pixdim[1:4]`` and spatial units (NaN if
    unusable). A header loaded by nibabel has been repaired already (zero sizes read as 1): for a
    file, use :func:`voxel_spacing_mm`, which reads the header as stored."""
    zooms = np.asarray(header.structarr["pixdim"], dtype=np.float64)[1:4]
    unit = header.get_xyzt_units()[0]
    zooms = zooms * UNIT_MM.get(unit, 1.0)
    try:
        return spacing_volume_ml(zooms)
    except ConfigError:
        return math.nan


def nifti_stem(path: Path) -> str | None:
    """The name without ``.nii`` / ``.nii.gz`` (case-insensitive), or None for another file."""
    lower = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def write_like(
    reference: str | os.PathLike[str] | None,
    data: np.ndarray,
    target: Path,
    description: str,
    affine: np.ndarray | None = None,
) -> None:
    """Write ``data`` (H, W, N) atomically with the header of the NIfTI file ``reference``, or,
    without one (the JPG release), as a plain NIfTI with ``affine`` (default identity)."""
    import nibabel as nib

    if reference is not None:
        try:
            image = nib.load(Path(reference), mmap=False)
        except Exception as err:  # nibabel raises many types for a bad header
            raise DatasetError(f"{reference}: unreadable NIfTI ({first_line(err)})") from None
        save_like(image, data, target, description)
        return
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    image.header["descrip"] = description.encode("ascii")[:79]
    with atomic_path(target) as tmp:
        image.to_filename(str(tmp))
