"""The CT-ICH label and demographics CSVs: per-slice subtype labels and per-patient age / sex.

Both releases ship a label CSV (``hemorrhage_diagnosis_raw_ct.csv`` or ``hemorrhage_diagnosis.csv``)
and a demographics CSV; :func:`read_slice_labels` and :func:`read_demographics` read them into
:class:`SliceLabels` and :class:`Demographics`, one problem one sentence naming the file
(docs/data.md). The subtype names and their order are :data:`SUBTYPES`.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ichseg.errors import DatasetError

#: Subtype abbreviations, in the column order of the label CSVs.
SUBTYPES: tuple[str, ...] = ("IVH", "IPH", "SAH", "EDH", "SDH")
#: Subtype column names of the label CSVs, same order as :data:`SUBTYPES`.
SUBTYPE_COLUMNS: tuple[str, ...] = (
    "Intraventricular",
    "Intraparenchymal",
    "Subarachnoid",
    "Epidural",
    "Subdural",
)
LABEL_COLUMNS: tuple[str, ...] = (
    "PatientNumber",
    "SliceNumber",
    *SUBTYPE_COLUMNS,
    "No_Hemorrhage",
    "Fracture_Yes_No",
)
LABEL_FILES: dict[str, str] = {
    "nifti": "hemorrhage_diagnosis_raw_ct.csv",
    "jpg": "hemorrhage_diagnosis.csv",
}
DEMOGRAPHICS_FILE = "patient_demographics.csv"  # matched case-insensitively


@dataclass(frozen=True)
class SliceLabels:
    """Per-slice labels of one scan from the label CSV (index k is slice number k + 1)."""

    subtypes: np.ndarray  # (N, 5) bool, order of SUBTYPES
    no_hemorrhage: np.ndarray  # (N,) bool
    fracture: np.ndarray  # (N,) bool

    @property
    def n_slices(self) -> int:
        return int(self.subtypes.shape[0])

    @property
    def has_ich(self) -> np.ndarray:
        """(N,) bool: the slice has any subtype."""
        return self.subtypes.any(axis=1)

    def patient_subtypes(self) -> np.ndarray:
        """(5,) bool: subtypes present on any slice."""
        return self.subtypes.any(axis=0)


@dataclass(frozen=True)
class Demographics:
    """Patient-level facts from the demographics CSV (fields absent from the file are None)."""

    age: float | None
    gender: str | None
    note: str | None = None


def read_slice_labels(path: str | Path) -> dict[int, SliceLabels]:
    """Read a label CSV (``hemorrhage_diagnosis*.csv``) into per-patient :class:`SliceLabels`.

    Handles a UTF-8 byte-order mark and CRLF line endings. Slice numbers of each patient must run
    1..N without gaps or repeats.
    """
    path = Path(path)
    rows = _read_csv_rows(path)
    if not rows:
        raise DatasetError(f"{path}: the file is empty", path)
    header = [cell.strip() for cell in rows[0]]
    missing = [name for name in LABEL_COLUMNS if name not in header]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}", path)
    column = [header.index(name) for name in LABEL_COLUMNS]
    values: list[list[int]] = []
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            values.append([int(float(row[i])) for i in column])
        except (ValueError, IndexError):
            raise DatasetError(
                f"{path}: line {line_number} has a missing or non-numeric value", path
            ) from None
    table = np.asarray(values, dtype=np.int64).reshape(-1, len(LABEL_COLUMNS))
    flags = table[:, 2:] != 0
    result: dict[int, SliceLabels] = {}
    for patient in np.unique(table[:, 0]):
        rows_of_patient = np.flatnonzero(table[:, 0] == patient)
        slice_numbers = table[rows_of_patient, 1]
        order = np.argsort(slice_numbers, kind="stable")
        slice_numbers = slice_numbers[order]
        expected = np.arange(1, len(slice_numbers) + 1)
        if not np.array_equal(slice_numbers, expected):
            raise DatasetError(
                f"{path}: the slice numbers of patient {int(patient)} "
                f"are not 1..{len(slice_numbers)} without gaps or repeats",
                path,
            )
        patient_flags = flags[rows_of_patient[order]]
        result[int(patient)] = SliceLabels(
            subtypes=patient_flags[:, :5].copy(),
            no_hemorrhage=patient_flags[:, 5].copy(),
            fracture=patient_flags[:, 6].copy(),
        )
    return result


def read_demographics(path: str | Path) -> dict[int, Demographics]:
    """Read a demographics CSV of either release, matching columns by meaning.

    Accepts the 1.0.0 header (``"Age\\n(years)"`` with a newline inside the quotes) and the 1.3.x
    header (a merged subtype cell and a sub-header row). Rows without a patient number (sub-headers,
    blank lines) are skipped.
    """
    path = Path(path)
    rows = _read_csv_rows(path)
    if not rows:
        raise DatasetError(f"{path}: the file is empty", path)
    header = [" ".join(cell.lower().split()) for cell in rows[0]]

    def find(*keywords: str) -> int | None:
        for index, name in enumerate(header):
            if any(keyword in name for keyword in keywords):
                return index
        return None

    patient_col = find("patient")
    age_col = find("age")
    gender_col = find("gender", "sex")
    note_col = find("note")
    if patient_col is None:
        raise DatasetError(f"{path}: no patient-number column in the header", path)
    if age_col is None:
        raise DatasetError(f"{path}: no age column in the header", path)
    result: dict[int, Demographics] = {}
    for line_number, row in enumerate(rows[1:], start=2):
        cell = row[patient_col].strip() if patient_col < len(row) else ""
        if not cell:
            continue
        try:
            patient = int(float(cell))
        except ValueError:
            raise DatasetError(
                f"{path}: line {line_number} has patient number {cell!r}, not an integer", path
            ) from None
        result[patient] = Demographics(
            age=_parse_float(row, age_col),
            gender=_parse_text(row, gender_col),
            note=_parse_text(row, note_col),
        )
    return result


def _read_csv_rows(path: Path) -> list[list[str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found", path) from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a UTF-8 text file", path) from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror})", path) from None
    return list(csv.reader(io.StringIO(text, newline="")))


def _parse_float(row: list[str], column: int | None) -> float | None:
    if column is None or column >= len(row):
        return None
    try:
        value = float(row[column])
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _parse_text(row: list[str], column: int | None) -> str | None:
    if column is None or column >= len(row):
        return None
    return row[column].strip() or None
