"""The images of each release on disk: NIfTI volumes and the JPG brain, bone and mask images.

See docs/phantom.md.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ichseg.data.ctich import SUBTYPES
from ichseg.data.phantom.plan import (
    _PatientPlan,
)
from ichseg.data.windowing import WINDOWS, apply_window

#: (level, width) of the JPG release's brain and bone images (the presets of ichseg.data.windowing)
BRAIN_WINDOW: tuple[float, float] = (float(WINDOWS["brain"].level), float(WINDOWS["brain"].width))
BONE_WINDOW: tuple[float, float] = (float(WINDOWS["bone"].level), float(WINDOWS["bone"].width))


JPEG_QUALITY = 95

# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def _window_u8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> uint8 display window (:func:`ichseg.data.windowing.apply_window`)."""
    return apply_window(hu, (level, width), np.uint8)


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
