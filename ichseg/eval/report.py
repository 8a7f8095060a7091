"""The report files of one evaluation (:func:`write_report`: ``report.json``, ``report.md``,
``slices.csv``, ``counts.npz``, each written atomically) and reading them back
(:func:`load_fold`, :class:`FoldResult`). See docs/evaluation.md.

The tables are in :mod:`ichseg.eval.tables`, their rows and markdown in
:mod:`ichseg.eval.markdown`, the cross-validation merge in :mod:`ichseg.eval.cv`; their names stay
importable from here.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import ConfigError, ReportError
from ichseg.eval.counts import SliceCounts
from ichseg.eval.markdown import (
    DASH,
    VOLUME_ROWS,
    age_rows,
    markdown_table,
    patient_rows,
    settings_lines,
    subtype_rows,
    table5_rows,
    table6_rows,
    tables_markdown,
    volume_rows,
)
from ichseg.eval.metrics import (
    PAPER_MIN_AREA,
    SUBTYPE_NAMES,
    EvaluationTables,
    predicted_positive,
    slice_dice,
    slice_jaccard,
)
from ichseg.eval.tables import (
    PAPER_AGE_DICE,
    PAPER_SUBTYPE_DICE,
    PAPER_TABLE5,
    PAPER_TABLE6,
    PatientInfo,
    compute_operating_point_tables,
    compute_tables,
    subtypes_and_ages,
)
from ichseg.utils.atomic import atomic_write_text

__all__ = [
    "DASH", "PAPER_AGE_DICE", "PAPER_SUBTYPE_DICE", "PAPER_TABLE5", "PAPER_TABLE6", "VOLUME_ROWS",
    "PatientInfo", "age_rows", "compute_operating_point_tables", "compute_tables",
    "markdown_table", "patient_rows", "settings_lines", "subtype_rows", "subtypes_and_ages",
    "table5_rows", "table6_rows", "tables_markdown", "volume_rows",
]  # fmt: skip

#: ``format`` of a one-evaluation ``report.json``.
REPORT_FORMAT = "ichseg-evaluation-report"
REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SLICES_CSV = "slices.csv"
COUNTS_NPZ = "counts.npz"


# --------------------------------------------------------------------------- JSON and CSV


def json_safe(value: Any) -> Any:
    """Plain JSON data: numpy scalars and arrays to Python, NaN / infinity to None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def dumps_json(data: Any) -> str:
    """Strict JSON text (``NaN`` never appears) with a final newline."""
    return json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n"


def slice_table(
    counts: SliceCounts,
    threshold: float = 0.5,
    min_area: float = PAPER_MIN_AREA,
    slice_flags: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Columns of ``slices.csv``, one row per slice of ``counts`` (in its order).

    ``patient``, ``slice`` (1-based), ``gt_pixels``, ``gt_ml``, ``pred_pixels@t`` and
    ``intersection@t`` per threshold, then at ``threshold``: ``dice@t``, ``jaccard@t`` (empty on
    slices without ICH), ``detected@t`` (area above the minimum); ``voxel_ml``, ``area_scale`` and,
    with ``slice_flags`` ``(N, 6)`` (the five subtypes then fracture), one 0/1 column each.
    """
    columns: dict[str, np.ndarray] = {
        "patient": counts.patient,
        "slice": counts.slice_index,
        "gt_pixels": counts.gt_pixels,
        "gt_ml": counts.gt_pixels * counts.voxel_ml,
    }
    for t, level in enumerate(counts.thresholds):
        columns[f"pred_pixels@{level:g}"] = counts.pred_pixels[:, t]
    for t, level in enumerate(counts.thresholds):
        columns[f"intersection@{level:g}"] = counts.intersection[:, t]
    columns[f"dice@{threshold:g}"] = slice_dice(counts, threshold)
    columns[f"jaccard@{threshold:g}"] = slice_jaccard(counts, threshold)
    columns[f"detected@{threshold:g}"] = predicted_positive(counts, threshold, min_area).astype(int)
    columns["voxel_ml"] = counts.voxel_ml
    columns["area_scale"] = counts.area_scale
    if slice_flags is not None:
        flags = np.asarray(slice_flags, dtype=bool).reshape(len(counts), -1)
        for name, column in zip((*SUBTYPE_NAMES, "fracture"), flags.T, strict=False):
            columns[name] = column.astype(int)
    return columns


def _csv_cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(value) else f"{float(value):.6g}"
    return str(value)


def slices_csv(columns: Mapping[str, np.ndarray]) -> str:
    """CSV text of :func:`slice_table` columns (undefined values are empty cells)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns.keys())
    arrays = [np.asarray(v).tolist() for v in columns.values()]
    writer.writerows([_csv_cell(v) for v in row] for row in zip(*arrays, strict=True))
    return buffer.getvalue()


# --------------------------------------------------------------------------- one evaluation


@dataclass
class FoldResult:
    """One evaluation read back from disk (or about to be written)."""

    counts: SliceCounts
    patients: dict[int, PatientInfo]
    settings: dict[str, Any]
    split: str = "test"
    fold: int | None = None
    k: int | None = None
    directory: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: ECE before / after calibration and the reliability diagram's file (``report.json``'s
    #: ``calibration``), or None.
    calibration: dict[str, Any] | None = None

    @property
    def threshold(self) -> float:
        return float(self.settings.get("threshold", 0.5))

    @property
    def min_area(self) -> float:
        return float(self.settings.get("min_area", PAPER_MIN_AREA))

    def tables(self) -> EvaluationTables:
        return compute_tables(self.counts, self.patients, self.threshold, self.min_area)


def write_report(
    directory: str | os.PathLike[str],
    result: FoldResult,
    slice_flags: np.ndarray | None = None,
    tables: EvaluationTables | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``slices.csv`` and ``counts.npz`` into ``directory``.

    Each file is written atomically. Returns their paths by name (``json``, ``md``, ``csv``,
    ``counts``).
    """
    directory = Path(directory)
    tables = tables or result.tables()
    fold = "" if result.fold is None else f" fold {result.fold},"
    title = title or f"Stitched evaluation:{fold} {result.split} split"
    patients = sorted(result.patients)
    document = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "split": result.split,
        "fold": result.fold,
        "k": result.k,
        "settings": result.settings,
        "patients": patients,
        "patient_info": {str(p): result.patients[p].to_dict() for p in patients},
        "n_slices": len(result.counts),
        **result.extra,
        **({} if result.calibration is None else {"calibration": result.calibration}),
        "tables": tables.to_dict(),
        "paper": {
            "table5": PAPER_TABLE5,
            "table6": {f"{t:g}": v for t, v in PAPER_TABLE6.items()},
            "subtype_dice": PAPER_SUBTYPE_DICE,
            "age_dice": PAPER_AGE_DICE,
        },
    }
    preamble = [f"- patients ({len(patients)}): {', '.join(str(p) for p in patients)}",
                f"- slices: {len(result.counts)}"]  # fmt: skip
    paths = {
        "json": directory / REPORT_JSON,
        "md": directory / REPORT_MD,
        "csv": directory / SLICES_CSV,
        "counts": directory / COUNTS_NPZ,
    }
    result.counts.save(paths["counts"])
    columns = slice_table(result.counts, result.threshold, result.min_area, slice_flags)
    atomic_write_text(paths["csv"], slices_csv(columns))
    markdown = tables_markdown(
        tables, title, result.settings, result.patients, preamble, calibration=result.calibration
    )
    atomic_write_text(paths["md"], markdown)
    atomic_write_text(paths["json"], dumps_json(document))  # last: marks the set complete
    return paths


def load_fold(directory: str | os.PathLike[str]) -> FoldResult:
    """Read an evaluation written by :func:`write_report` (``report.json`` + ``counts.npz``)."""
    directory = Path(directory)
    report_path = directory / REPORT_JSON
    try:
        document = json.loads(report_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ReportError(
            f"{report_path}: cannot read the report ({err.strerror})", report_path
        ) from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{report_path}: not valid JSON ({err.msg}, line {err.lineno})",
                          report_path) from None  # fmt: skip
    if not isinstance(document, dict) or document.get("format") != REPORT_FORMAT:
        raise ReportError(f"{report_path}: not an ichseg evaluation report", report_path)
    counts_path = directory / COUNTS_NPZ
    try:
        counts = SliceCounts.load(counts_path)
    except FileNotFoundError:
        raise ReportError(f"{counts_path}: slice counts are missing", counts_path) from None
    except (OSError, ValueError, KeyError, ConfigError) as err:
        raise ReportError(f"{counts_path}: cannot read the slice counts ({err})",
                          counts_path) from None  # fmt: skip
    info = document.get("patient_info") or {}
    patients = {int(p): PatientInfo.from_dict(int(p), v) for p, v in info.items()}
    for p in np.unique(counts.patient).tolist():
        patients.setdefault(int(p), PatientInfo(int(p)))
    return FoldResult(
        counts=counts,
        patients=patients,
        settings=dict(document.get("settings") or {}),
        split=str(document.get("split", "test")),
        fold=document.get("fold"),
        k=document.get("k"),
        directory=directory,
        calibration=document.get("calibration"),
    )


#: Names of :mod:`ichseg.eval.cv` kept here from before it had its own module.
_CV_NAMES = frozenset({
    "CV_REPORT_FORMAT", "CV_REPORT_JSON", "CV_REPORT_MD", "MERGE_KEYS", "CrossValidationReport",
    "FoldSummary", "find_fold_dirs", "fold_summary", "merge_folds", "write_cv_report",
})  # fmt: skip


def __getattr__(name: str) -> Any:
    """The cross-validation names, from :mod:`ichseg.eval.cv` (which imports this module)."""
    if name in _CV_NAMES:
        return getattr(importlib.import_module("ichseg.eval.cv"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
