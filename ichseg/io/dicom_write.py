"""DICOM SEG output of a predicted mask, and a writer of CT series for tests and examples.

:func:`write_seg` writes a mask in :func:`~ichseg.io.dicom.read_series`' layout as a binary
DICOM Segmentation (highdicom) that references every source slice; :func:`write_series` writes
an uncompressed CT Image Storage series (pydicom), shuffled by default, from which the tests and
examples build their DICOM input. Both are re-exported by :mod:`ichseg.io.dicom`; pydicom and
highdicom are imported inside the functions, so importing this module needs neither.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.io.dicom import CT_IMAGE_STORAGE, DicomSeries, _geometry, _require
from ichseg.utils.atomic import atomic_path


def _content_label(description: str) -> str:
    """``description`` as a DICOM CS value (upper case, digits, space, underscore; 16 chars)."""
    label = re.sub(r"[^A-Z0-9 _]", "_", description.upper())[:16].strip()
    return label or "ICH"


def _seg_codes(hd: Any) -> tuple[Any, Any, Any]:
    """The SEG's coded concepts: segmented property category and type (SNOMED CT), and the
    algorithm family (DICOM)."""
    try:
        from pydicom.sr.codedict import codes

        return (
            codes.SCT.MorphologicallyAbnormalStructure,
            codes.SCT.Hemorrhage,
            codes.DCM.ArtificialIntelligence,
        )
    except (ImportError, AttributeError):
        return (
            hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure"),
            hd.sr.CodedConcept("50960005", "SCT", "Hemorrhage"),
            hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"),
        )


def write_seg(
    mask: np.ndarray, series: DicomSeries, target: str | os.PathLike[str], description: str = "ICH"
) -> None:
    """Write ``mask`` as a binary DICOM SEG of ``series`` to ``target``, atomically.

    ``mask`` is a bool or 0/1 array in :func:`~ichseg.io.dicom.read_series`' layout (column, row,
    slice in ascending order along the normal). The SEG has one segment, "Intracranial hemorrhage"
    (SNOMED CT morphologically abnormal structure / hemorrhage, algorithm type AUTOMATIC, ichseg
    and its version), one frame per source slice (empty frames kept, so an all-zero mask writes
    too), and references every source slice. ``description`` becomes its SeriesDescription and
    content label. Raises ValueError for a mask of the wrong shape or values, and the errors of
    :func:`~ichseg.io.dicom.read_series` for a series it could not read.
    """
    pydicom = _require("pydicom", "writing DICOM SEG")
    hd = _require("highdicom", "writing DICOM SEG")
    import ichseg

    geo = _geometry(series, pydicom)
    mask = np.asarray(mask)
    expected = (geo.columns, geo.rows, len(geo.files))
    if mask.shape != expected:
        raise ValueError(
            f"{series.description}: mask shape {mask.shape} does not match the series "
            f"(columns, rows, slices) {expected}"
        )
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{series.description}: a SEG mask must hold only 0 and 1")
        mask = mask.astype(bool)
    frames = np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8)

    category, kind, family = _seg_codes(hd)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="ichseg", family=family, version=ichseg.__version__
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Intracranial hemorrhage",
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    sources = [pydicom.dcmread(path) for path in geo.files]
    source_number = sources[0].get("SeriesNumber", None)
    series_number = 1000 + (int(source_number) if source_number not in (None, "") else 0)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=max(1, series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ichseg",
        manufacturer_model_name="ichseg",
        software_versions=ichseg.__version__,
        device_serial_number="0",
        content_label=_content_label(description),
        content_description=description[:64] or None,
        series_description=description[:64] or None,
        omit_empty_frames=False,
    )
    with atomic_path(target) as tmp:
        seg.save_as(tmp)


def _save(pydicom: Any, ds: Any, path: Path) -> None:
    """Save ``ds`` as a Part 10 file (preamble, file meta) with pydicom 2.4 or 3."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)


def _ds(value: float) -> str:
    """A number as a DICOM DS string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


@dataclass(frozen=True)
class _SeriesSpec:
    """What every slice written by :func:`write_series` shares."""

    key: tuple[str, ...]  # entropy sources of the SOP instance UIDs
    study_uid: str
    series_uid: str
    frame_uid: str
    patient_id: str
    series_number: int
    series_description: str
    iop: np.ndarray
    spacing: Sequence[float]
    slope: float
    intercept: float
    signed: bool
    rows: int
    columns: int


def _stored_values(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``(hu - intercept) / slope``, rounded, as uint16 when none is negative, else int16."""
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    dtype = np.uint16 if stored.min() >= 0 else np.int16
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError("HU values do not fit 16 bits with this slope and intercept")
    return stored.astype(dtype)


def _slice_positions(
    n_slices: int,
    iop: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    positions: Sequence[Sequence[float]] | None,
) -> Sequence[Sequence[float]]:
    """Every slice's ImagePositionPatient: ``positions`` (checked to number ``n_slices``), or
    ``origin + k * spacing[2] * normal``."""
    normal = np.cross(iop[:3], iop[3:])
    if positions is None:
        positions = [np.asarray(origin, float) + k * spacing[2] * normal for k in range(n_slices)]
    if len(positions) != n_slices:
        raise ValueError(f"{len(positions)} positions for {n_slices} slices")
    return positions


def _slice_dataset(
    pydicom: Any, spec: _SeriesSpec, k: int, number: int, position: Sequence[float]
) -> Any:
    """The CT Image Storage dataset (with file meta) of slice ``k``, without pixel data."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[*spec.key, "sop", str(k)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = spec.patient_id
    ds.PatientName = f"Test^{spec.patient_id}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = spec.study_uid
    ds.StudyID = "1"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.series_description
    ds.Modality = "CT"
    ds.Manufacturer = "ichseg"
    ds.FrameOfReferenceUID = spec.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in spec.iop]
    ds.PixelSpacing = [_ds(spec.spacing[1]), _ds(spec.spacing[0])]
    ds.SliceThickness = _ds(spec.spacing[2])
    ds.KVP = "120"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.RescaleSlope = _ds(spec.slope)
    ds.RescaleIntercept = _ds(spec.intercept)
    ds.RescaleType = "HU"
    return ds


def write_series(
    hu: np.ndarray,
    folder: str | os.PathLike[str],
    *,
    spacing: Sequence[float] = (0.5, 0.5, 5.0),
    iop: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    positions: Sequence[Sequence[float]] | None = None,
    patient_id: str = "TEST",
    series_number: int = 1,
    series_description: str = "HEAD CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    shuffle: bool = True,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    overrides: Mapping[int, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write ``hu`` as an uncompressed CT Image Storage series in ``folder`` (for tests and
    examples); returns the files in slice order (k = 0 first).

    ``hu`` is in :func:`~ichseg.io.dicom.read_series`' layout: ``hu[i, j, k]``, i the column, j
    the row, k the slice. ``spacing`` is (along a row, between rows, between slices) in mm, so
    PixelSpacing is ``[spacing[1], spacing[0]]``. ``iop`` is ImageOrientationPatient (row then
    column direction, LPS); slice k lies at ``origin + k * spacing[2] * normal`` (LPS mm) unless
    ``positions`` gives every slice's ImagePositionPatient. Stored values are
    ``(hu - intercept) / slope``, rounded, as uint16 when none is negative, else int16. With
    ``shuffle``, files are written in a random order under random names and InstanceNumber is
    scrambled (the reader must sort by position). ``overrides`` sets attributes of single slices
    ({k: {keyword: value}}), to build broken series. UIDs are derived from ``seed``,
    ``patient_id`` and ``series_number`` unless given.
    """
    pydicom = _require("pydicom", "writing DICOM")
    from pydicom.uid import generate_uid

    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D (column, row, slice) volume, got shape {hu.shape}")
    n_cols, n_rows, n_slices = hu.shape
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iop_arr = np.asarray(iop, dtype=np.float64)
    positions = _slice_positions(n_slices, iop_arr, spacing, origin, positions)
    stored = _stored_values(hu, slope, intercept)

    key = (str(seed), patient_id, str(series_number))
    spec = _SeriesSpec(
        key=key,
        study_uid=study_uid or generate_uid(entropy_srcs=[*key, "study"]),
        series_uid=series_uid or generate_uid(entropy_srcs=[*key, "series"]),
        frame_uid=generate_uid(entropy_srcs=[*key, "frame"]),
        patient_id=patient_id,
        series_number=series_number,
        series_description=series_description,
        iop=iop_arr,
        spacing=spacing,
        slope=slope,
        intercept=intercept,
        signed=stored.dtype == np.int16,
        rows=n_rows,
        columns=n_cols,
    )
    rng = random.Random(seed)
    order = list(range(n_slices))
    numbers = list(range(1, n_slices + 1))
    if shuffle:
        rng.shuffle(order)
        rng.shuffle(numbers)
    paths: list[Path | None] = [None] * n_slices
    for k in order:
        ds = _slice_dataset(pydicom, spec, k, numbers[k], positions[k])
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        for keyword, value in (overrides or {}).get(k, {}).items():
            setattr(ds, keyword, value)
        path = folder / (f"{rng.getrandbits(48):012x}" if shuffle else f"slice{k:04d}.dcm")
        _save(pydicom, ds, path)
        paths[k] = path
    return [p for p in paths if p is not None]
