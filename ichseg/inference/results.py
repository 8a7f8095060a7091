"""What prediction writes for each scan, and the run's tables: the output names, the volume
figures of a mask (:func:`volume_stats`), ``volumes.csv`` (:func:`read_volumes`,
:func:`write_volumes`) and the QA report's ``qa/index.html`` built from it (:func:`write_qa_index`).
See docs/predict.md, "Outputs".
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ichseg.errors import ConfigError, DatasetError, first_line
from ichseg.io.nifti import nifti_stem
from ichseg.io.orientation import CTICH_ORIENTATION
from ichseg.utils.atomic import atomic_write_text

#: ``<name>_ich_seg.nii.gz``: 3D Slicer loads a file named with ``_seg`` as a label map.
MASK_SUFFIX = "_ich_seg"
PROBABILITY_SUFFIX = "_prob"
UNCERTAINTY_SUFFIX = "_uncertainty"
#: The folder of the QA report (``qa/index.html`` and a ``<name>.png`` sheet per scan).
QA_FOLDER = "qa"
QA_INDEX = "index.html"
#: Name endings of files predictions write (this version's and earlier ones' ``_ich``): skipped
#: when such files are found in an input folder.
OUTPUT_SUFFIXES: tuple[str, ...] = ("_ich", MASK_SUFFIX, PROBABILITY_SUFFIX, UNCERTAINTY_SUFFIX)
VOLUMES_FILE = "volumes.csv"
#: The columns of ``volumes.csv`` written by earlier versions (still read and extended).
LEGACY_VOLUME_COLUMNS: tuple[str, ...] = (
    "file", "mask", "slices", "ich_slices", "ich_voxels", "voxel_volume_ml", "ich_volume_ml",
    "largest_component_ml", "seconds",
)  # fmt: skip
VOLUME_COLUMNS: tuple[str, ...] = (
    "file",
    "mask",
    "slices",
    "ich_slices",
    "ich_voxels",
    "voxel_volume_ml",
    "ich_volume_ml",
    "largest_component_ml",
    "components",
    "members",
    "member_min_ml",
    "member_max_ml",
    "orientation",
    "seconds",
)


@dataclass(frozen=True)
class VolumeStats:
    """ICH volume of one binary mask: counts, and volumes in mL from the voxel volume."""

    slices: int
    ich_slices: int
    ich_voxels: int
    largest_component_voxels: int
    voxel_volume_ml: float
    components: int = 0

    @property
    def ich_volume_ml(self) -> float:
        """Voxel count x voxel volume."""
        return self.ich_voxels * self.voxel_volume_ml

    @property
    def largest_component_ml(self) -> float:
        """Volume of the largest face-connected 3D component."""
        return self.largest_component_voxels * self.voxel_volume_ml


def volume_stats(mask: np.ndarray, voxel_volume_ml: float) -> VolumeStats:
    """Volume figures of an ``(H, W, N)`` mask (slices on the third axis).

    Components are face-connected in 3D (6 neighbours; ``scipy.ndimage.label``'s default).
    """
    mask = np.asarray(mask, dtype=bool)
    components, count = ndimage.label(mask)
    largest = int(np.bincount(components.ravel())[1:].max()) if count else 0
    return VolumeStats(
        slices=int(mask.shape[2]),
        ich_slices=int(mask.any(axis=(0, 1)).sum()),
        ich_voxels=int(np.count_nonzero(mask)),
        largest_component_voxels=largest,
        voxel_volume_ml=float(voxel_volume_ml),
        components=int(count),
    )


@dataclass(frozen=True)
class ScanInput:
    """One input scan: its file (a DICOM series: its folder) and the name its outputs are given
    (``<name>_ich_seg.nii.gz``); ``series`` is the :class:`~ichseg.io.dicom.DicomSeries` of a
    DICOM input, None for a NIfTI file."""

    path: Path
    name: str
    series: Any = None

    @property
    def label(self) -> str:
        """How messages name the scan: the file name, or the series."""
        return self.path.name if self.series is None else self.series.description


@dataclass(frozen=True)
class ScanResult:
    """What prediction wrote for one scan and the volume figures of its mask."""

    input: Path
    mask_path: Path
    probability_path: Path | None
    stats: VolumeStats
    seconds: float
    uncertainty_path: Path | None = None
    #: Each ensemble member's own ICH volume (one value for a single model).
    member_volumes_ml: tuple[float, ...] = ()
    #: The scan's array orientation (axis codes) and whether it was reoriented for the network.
    orientation: tuple[str, ...] = CTICH_ORIENTATION
    reoriented: bool = False
    seg_path: Path | None = None
    sheet_path: Path | None = None
    #: The input's name (``<name>_ich_seg.nii.gz``) and how messages call it.
    name: str = ""
    label: str = ""

    @property
    def interval_ml(self) -> tuple[float, float] | None:
        """The members' smallest and largest volume, None for a single model."""
        if len(self.member_volumes_ml) < 2:
            return None
        return min(self.member_volumes_ml), max(self.member_volumes_ml)

    def row(self) -> dict[str, str]:
        """The scan's ``volumes.csv`` row."""
        stats = self.stats
        interval = self.interval_ml
        return {
            "file": str(self.input),
            "mask": self.mask_path.name,
            "slices": str(stats.slices),
            "ich_slices": str(stats.ich_slices),
            "ich_voxels": str(stats.ich_voxels),
            "voxel_volume_ml": f"{stats.voxel_volume_ml:.6g}",
            "ich_volume_ml": f"{stats.ich_volume_ml:.6f}",
            "largest_component_ml": f"{stats.largest_component_ml:.6f}",
            "components": str(stats.components),
            "members": str(max(1, len(self.member_volumes_ml))),
            "member_min_ml": "" if interval is None else f"{interval[0]:.6f}",
            "member_max_ml": "" if interval is None else f"{interval[1]:.6f}",
            "orientation": "".join(self.orientation),
            "seconds": f"{self.seconds:.2f}",
        }


def read_volumes(target: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of an earlier ``volumes.csv`` (none when it does not exist).

    Raises :class:`~ichseg.errors.DatasetError` naming the file when it is unreadable or not a
    ``volumes.csv`` of ichseg.predict (other columns), so it is never overwritten.
    """
    target = Path(target)
    if not target.exists():
        return []
    try:
        with open(target, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = tuple(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        reason = getattr(err, "strerror", None) or first_line(err)
        raise DatasetError(
            f"{target}: cannot read the earlier volumes ({reason})", target
        ) from None
    known = columns in (VOLUME_COLUMNS, LEGACY_VOLUME_COLUMNS)
    if not known or any(None in row or not row.get("mask") for row in rows):
        raise DatasetError(
            f"{target}: not a {VOLUMES_FILE} written by ichseg.predict (expected the columns "
            f"{','.join(VOLUME_COLUMNS)}), so it is not replaced; move it or choose another "
            "output folder",
            target,
        )
    return rows


def write_volumes(
    results: Sequence[ScanResult], target: Path, earlier: Sequence[Mapping[str, str]] = ()
) -> None:
    """Write ``volumes.csv`` (one row per scan, :data:`VOLUME_COLUMNS`) atomically.

    ``earlier`` rows (:func:`read_volumes`, from an earlier run into the same folder) are kept, in
    their order, except those of a mask predicted again, which the new row replaces in place; rows
    of masks not there before follow.
    """
    new = {result.mask_path.name: result.row() for result in results}
    blank = dict.fromkeys(VOLUME_COLUMNS, "")
    rows = [new.pop(row["mask"], {**blank, **row}) for row in earlier]
    rows += list(new.values())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=VOLUME_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(target, buffer.getvalue())


def write_qa_index(output: Path, note: str | None = None) -> Path:
    """(Re)write ``qa/index.html``: every scan of ``volumes.csv`` that has a QA sheet in
    ``qa/``, with its volume, the members' interval, components and sheet, sorted by volume."""
    from ichseg.inference.qa import QARow
    from ichseg.inference.qa import write_qa_index as write_index

    def number(text: str, default: float = 0.0) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):
            return default

    rows = []
    for row in read_volumes(output / VOLUMES_FILE):
        mask = row["mask"]
        name = next(
            (
                mask[: -len(end)]
                for end in (f"{MASK_SUFFIX}.nii.gz", "_ich.nii.gz")
                if mask.endswith(end)
            ),
            mask,
        )
        if not (output / QA_FOLDER / f"{name}.png").is_file():
            continue
        low, high = row.get("member_min_ml", ""), row.get("member_max_ml", "")
        rows.append(
            QARow(
                name=name,
                volume_ml=number(row["ich_volume_ml"]),
                interval_ml=(number(low), number(high)) if low and high else None,
                largest_component_ml=number(row["largest_component_ml"]),
                components=int(number(row.get("components", ""))),
                ich_slices=int(number(row["ich_slices"])),
                slices=int(number(row["slices"])),
                sheet=f"{name}.png",
                mask=f"../{mask}",
            )
        )
    target = output / QA_FOLDER / QA_INDEX
    target.parent.mkdir(exist_ok=True)
    write_index(rows, target, title=f"ichseg predictions: {output.name}", note=note)
    return target


@dataclass(frozen=True)
class OutputOptions:
    """Which files :func:`predict_files` writes besides ``<name>_ich_seg.nii.gz``.

    Attributes:
        probabilities: ``<name>_prob.nii.gz``, float32 probabilities before threshold and
            morphology (an ensemble's mean).
        uncertainty: ``<name>_uncertainty.nii.gz``, the per-voxel standard deviation across an
            ensemble's members (and flips); written only when there are several passes.
        dicom_seg: for a DICOM series, also ``<name>_ich_seg.dcm``, the mask as a DICOM SEG that
            references the series (``ichseg[dicom]``; NIfTI inputs have no series to reference).
        qa: the visual QA report: ``qa/<name>.png`` per scan (:func:`ichseg.inference.qa.qa_sheet`)
            and ``qa/index.html`` listing every scan of ``volumes.csv`` with its sheet.
    """

    probabilities: bool = False
    uncertainty: bool = True
    dicom_seg: bool = False
    qa: bool = False


#: The start of the ``descrip`` field of every image ichseg.predict writes.
_OWN_DESCRIPTION = b"ichseg ICH"


def check_replaceable(target: Path) -> None:
    """Refuse to replace ``target`` unless it is missing or an image ichseg.predict wrote
    (its header's description starts with "ichseg ICH"): a user's own file of that name is kept.
    """
    if not target.exists() and not target.is_symlink():
        return
    import nibabel as nib

    try:
        description = bytes(nib.load(target).header["descrip"].item()) if target.is_file() else b""
    except Exception:  # not a NIfTI file at all: someone else's
        description = b""
    if not description.startswith(_OWN_DESCRIPTION):
        raise DatasetError(
            f"{target}: exists and was not written by ichseg.predict, so it is not replaced; "
            "move it or choose another output folder",
            target,
        )


def check_replaceable_seg(target: Path) -> None:
    """Refuse to replace a ``.dcm`` that is not a DICOM SEG ichseg.predict wrote."""
    if not target.exists() and not target.is_symlink():
        return
    try:
        import pydicom

        dataset = pydicom.dcmread(target, stop_before_pixels=True)
        ours = dataset.get("Modality") == "SEG" and dataset.get("Manufacturer") == "ichseg"
    except Exception:  # not DICOM, or no pydicom: not ours to replace
        ours = False
    if not ours:
        raise DatasetError(
            f"{target}: exists and was not written by ichseg.predict, so it is not replaced; "
            "move it or choose another output folder",
            target,
        )


def check_output(output: str | os.PathLike[str]) -> Path:
    """Refuse an output that cannot become the output folder, without creating anything: a NIfTI
    file name, an existing file, or a path below a file or in a folder that is not writable."""
    output = Path(output)
    if nifti_stem(output) is not None:
        raise ConfigError(
            f"{output}: output is the folder for the masks and volumes.csv, not a NIfTI file name"
        )
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: the output exists and is not a folder")
    ancestor = output.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{output}: cannot create the output folder ({ancestor} is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{output}: cannot create the output folder ({ancestor} is not writable)")
    return output


def prepare_output(output: str | os.PathLike[str]) -> Path:
    """Create the output folder if needed and check that files can be written into it."""
    output = check_output(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{output}: the output exists and is not a folder") from None
    except OSError as err:
        raise ConfigError(
            f"{output}: cannot create the output folder ({err.strerror or err})"
        ) from None
    if not output.is_dir():
        raise ConfigError(f"{output}: the output exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise ConfigError(
            f"{output}: the output folder is not writable ({err.strerror or err})"
        ) from None
    return output
