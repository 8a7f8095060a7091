"""The paper's tables for one evaluation and across cross-validation folds; the report files.

Everything here only READS :class:`~ichseg.eval.metrics.SliceCounts` and the aggregates of
:mod:`ichseg.eval.metrics` (:func:`~ichseg.eval.metrics.evaluation_tables`); no metric is computed
twice. It turns them into

* plain rows (lists of dicts) per table, each with the paper's number beside ours
  (:func:`table5_rows`, :func:`table6_rows`, :func:`subtype_rows`, :func:`age_rows`,
  :func:`volume_rows`, :func:`patient_rows`),
* markdown (:func:`tables_markdown`),
* the files of one evaluation (:func:`write_report`): ``report.json`` (valid JSON, NaN -> null),
  ``report.md``, ``slices.csv`` (one row per slice) and ``counts.npz`` (the raw counts), all written
  atomically,
* and the cross-validation report (:func:`merge_folds`, :func:`find_fold_dirs`,
  :func:`write_cv_report`): the tables recomputed over the union of the test folds' patients, as
  the paper reports them, plus one summary row per fold.

Paper reference numbers (Hssayeni et al. 2020, windowed U-Net, 5 test folds): :data:`PAPER_TABLE5`,
:data:`PAPER_TABLE6`, :data:`PAPER_SUBTYPE_DICE`, :data:`PAPER_AGE_DICE`.

This module knows nothing of Hydra or Lightning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import ConfigError, ReportError
from ichseg.eval.metrics import (
    PAPER_MIN_AREA,
    SUBTYPE_NAMES,
    EvaluationTables,
    SliceCounts,
    Summary,
    evaluation_tables,
    operating_point_tables,
    predicted_positive,
    slice_dice,
    slice_jaccard,
)
from ichseg.utils.atomic import atomic_write_text

#: ``format`` of a one-evaluation ``report.json`` and of ``cv_report.json``.
REPORT_FORMAT = "ichseg-evaluation-report"
CV_REPORT_FORMAT = "ichseg-cv-report"
REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SLICES_CSV = "slices.csv"
COUNTS_NPZ = "counts.npz"
CV_REPORT_JSON, CV_REPORT_MD = "cv_report.json", "cv_report.md"

#: Paper, Table 5 (test folds): per-patient Jaccard / Dice and slice sensitivity / specificity
#: (fractions, not percent), summarised over patients.
PAPER_TABLE5: dict[str, dict[str, float]] = {
    "jaccard": {"mean": 0.218, "std": 0.163, "min": 0.0, "max": 0.528},
    "dice": {"mean": 0.315, "std": 0.211, "min": 0.0, "max": 0.677},
    "sensitivity": {"mean": 0.9728, "std": 0.099, "min": 0.50, "max": 1.0},
    "specificity": {"mean": 0.504, "std": 0.299, "min": 0.0, "max": 1.0},
}
#: Paper, Table 6: threshold -> pooled slice sensitivity, specificity, accuracy (fractions).
PAPER_TABLE6: dict[float, dict[str, float]] = {
    0.5: {"sensitivity": 0.972, "specificity": 0.504, "accuracy": 0.566},
    0.6: {"sensitivity": 0.887, "specificity": 0.622, "accuracy": 0.659},
    0.7: {"sensitivity": 0.776, "specificity": 0.745, "accuracy": 0.760},
    0.8: {"sensitivity": 0.737, "specificity": 0.824, "accuracy": 0.825},
    0.9: {"sensitivity": 0.631, "specificity": 0.886, "accuracy": 0.870},
}
#: Paper: mean per-patient Dice of the patients with each subtype.
PAPER_SUBTYPE_DICE: dict[str, float] = {
    "SDH": 0.52, "EDH": 0.35, "IVH": 0.30, "IPH": 0.28, "SAH": 0.23,
}  # fmt: skip
#: Paper: mean per-patient Dice by age group.
PAPER_AGE_DICE: dict[str, float] = {"<18": 0.321, ">=18": 0.309}

DASH = "–"


# --------------------------------------------------------------------------- patients


@dataclass(frozen=True)
class PatientInfo:
    """What the tables need to know of a patient besides its counts: age and subtypes."""

    patient: int
    age: float | None = None
    gender: str | None = None
    subtypes: tuple[str, ...] = ()  # ICH subtypes present on any of its slices

    def to_dict(self) -> dict[str, Any]:
        return {
            "age": self.age, "gender": self.gender, "subtypes": list(self.subtypes),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, patient: int, data: Mapping[str, Any]) -> PatientInfo:
        age = data.get("age")
        return cls(
            patient=int(patient),
            age=None if age is None else float(age),
            gender=data.get("gender"),
            subtypes=tuple(str(s) for s in data.get("subtypes") or ()),
        )


def compute_tables(
    counts: SliceCounts,
    patients: Mapping[int, PatientInfo] | None = None,
    threshold: float = 0.5,
    min_area: float = PAPER_MIN_AREA,
) -> EvaluationTables:
    """:func:`~ichseg.eval.metrics.evaluation_tables` with subtypes and ages from ``patients``."""
    return evaluation_tables(
        counts, threshold=threshold, min_area=min_area, **subtypes_and_ages(patients)
    )


def compute_operating_point_tables(
    parts: Sequence[tuple[SliceCounts, float]],
    patients: Mapping[int, PatientInfo] | None = None,
    min_area: float = PAPER_MIN_AREA,
) -> EvaluationTables:
    """:func:`~ichseg.eval.metrics.operating_point_tables` (each part at its own threshold) with
    subtypes and ages from ``patients``."""
    return operating_point_tables(parts, min_area=min_area, **subtypes_and_ages(patients))


def subtypes_and_ages(patients: Mapping[int, PatientInfo] | None) -> dict[str, Any]:
    """``patient_subtypes`` and ``ages`` keyword arguments of the table functions (None where
    ``patients`` has none)."""
    patients = patients or {}
    subtypes = {p: list(info.subtypes) for p, info in patients.items()}
    ages = {p: info.age for p, info in patients.items()}
    return {
        "patient_subtypes": subtypes if subtypes else None,
        "ages": ages if any(a is not None for a in ages.values()) else None,
    }


# --------------------------------------------------------------------------- plain rows


def _summary_row(name: str, summary: Summary, paper: Mapping[str, float] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"metric": name, **summary.to_dict()}
    for key in ("mean", "std", "min", "max"):
        row[f"paper_{key}"] = None if paper is None else paper.get(key)
    return row


def table5_rows(tables: EvaluationTables) -> list[dict[str, Any]]:
    """Table 5: Jaccard, Dice, slice sensitivity, slice specificity over patients (fractions),
    with the paper's values in ``paper_mean`` / ``paper_std`` / ``paper_min`` / ``paper_max``."""
    seg = tables.segmentation
    return [
        _summary_row(name, getattr(seg, name), PAPER_TABLE5[name])
        for name in ("jaccard", "dice", "sensitivity", "specificity")
    ]


def table6_rows(tables: EvaluationTables) -> list[dict[str, Any]]:
    """Table 6: pooled slice detection per threshold, with the paper's values where it has any."""
    rows = []
    for scores in tables.detection:
        paper = _paper_table6(scores.threshold)
        row = scores.to_dict()
        for key in ("sensitivity", "specificity", "accuracy"):
            row[f"paper_{key}"] = None if paper is None else paper[key]
        rows.append(row)
    return rows


def _paper_table6(threshold: float) -> dict[str, float] | None:
    for level, values in PAPER_TABLE6.items():
        if math.isclose(level, threshold, abs_tol=1e-9):
            return values
    return None


def subtype_rows(tables: EvaluationTables) -> list[dict[str, Any]]:
    """Dice of the patients with each subtype (a patient with several counts in each)."""
    return [
        {"group": name, **summary.to_dict(), "paper_mean": PAPER_SUBTYPE_DICE.get(name)}
        for name, summary in tables.subtype_dice.items()
    ]


def age_rows(tables: EvaluationTables) -> list[dict[str, Any]]:
    """Dice under 18 and at 18 and over."""
    return [
        {"group": name, **summary.to_dict(), "paper_mean": PAPER_AGE_DICE.get(name)}
        for name, summary in tables.age_dice.items()
    ]


#: Volume table rows: (field of VolumeTable, label, unit).
VOLUME_ROWS: tuple[tuple[str, str, str], ...] = (
    ("dice_3d", "3D Dice (per patient, nnU-Net empty rule)", "ratio"),
    ("abs_error_ml", "absolute volume error, patients with ICH (mL)", "ml"),
    ("false_positive_ml", "false-positive volume, patients without ICH (mL)", "ml"),
    ("outside_ml", "predicted volume outside the bleed, all patients (mL)", "ml"),
    ("true_ml", "true bleed volume, patients with ICH (mL)", "ml"),
    ("predicted_ml", "predicted bleed volume, patients with ICH (mL)", "ml"),
)


def volume_rows(tables: EvaluationTables) -> list[dict[str, Any]]:
    """Beyond the paper: 3D Dice, volume error and false-positive volume over patients."""
    return [
        {"metric": name, "label": label, **getattr(tables.volume, name).to_dict()}
        for name, label, _ in VOLUME_ROWS
    ]


def patient_rows(
    tables: EvaluationTables, patients: Mapping[int, PatientInfo] | None = None
) -> list[dict[str, Any]]:
    """One row per patient: slices, ICH slices, Dice, Jaccard, 3D Dice, volumes, detection."""
    per = tables.patients.to_dict()
    patients = patients or {}
    rows = []
    for i, patient in enumerate(per["patient"]):
        info = patients.get(int(patient))
        row = {key: values[i] for key, values in per.items() if isinstance(values, list)}
        row["subtypes"] = list(info.subtypes) if info else []
        row["age"] = info.age if info else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- markdown


def _number(value: Any, unit: str = "ratio") -> str:
    """A table cell: ratio 3 decimals, percent 1 decimal, mL 2 decimals; a dash when undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if unit == "percent":
        return f"{100 * float(value):.1f}"
    if unit == "ml":
        return f"{float(value):.2f}"
    if unit == "age":
        return f"{float(value):.1f}"
    if unit == "int":
        return str(int(value))
    return f"{float(value):.3f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table (first column left-aligned, the others right-aligned)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _table5_markdown(tables: EvaluationTables) -> str:
    labels = {
        "jaccard": ("Jaccard", "ratio"),
        "dice": ("Dice", "ratio"),
        "sensitivity": ("slice sensitivity (%)", "percent"),
        "specificity": ("slice specificity (%)", "percent"),
    }
    cells = []
    for row in table5_rows(tables):
        label, unit = labels[row["metric"]]
        ours = [_number(row[k], unit) for k in ("mean", "std", "min", "max")]
        paper = [_number(row[f"paper_{k}"], unit) for k in ("mean", "std", "min", "max")]
        cells.append([label, *ours, str(row["n"]), *paper])
    header = ["", "mean", "std", "min", "max", "patients",
              "paper mean", "paper std", "paper min", "paper max"]  # fmt: skip
    pooled = tables.segmentation.pooled
    note = (
        f"Pooled over all {pooled.n} slices at {_threshold_text(pooled.threshold)}: sensitivity "
        f"{_number(pooled.sensitivity, 'percent')} %, specificity "
        f"{_number(pooled.specificity, 'percent')} %, accuracy "
        f"{_number(pooled.accuracy, 'percent')} % (TP {pooled.tp}, FP {pooled.fp}, "
        f"TN {pooled.tn}, FN {pooled.fn})."
    )
    return markdown_table(header, cells) + "\n\n" + note


def _threshold_text(threshold: float) -> str:
    """ "threshold 0.5", or, for folds each at its own val-tuned threshold, saying so."""
    if threshold is None or not math.isfinite(threshold):
        return "each fold's own threshold (chosen on its validation split)"
    return f"threshold {threshold:g}"


def _table6_markdown(tables: EvaluationTables) -> str:
    cells = []
    for row in table6_rows(tables):
        cells.append(
            [
                f"{row['threshold']:g}",
                *(_number(row[k], "percent") for k in ("sensitivity", "specificity", "accuracy")),
                *(str(row[k]) for k in ("tp", "fp", "tn", "fn")),
                *(
                    _number(row[f"paper_{k}"], "percent")
                    for k in ("sensitivity", "specificity", "accuracy")
                ),
            ]
        )
    header = ["threshold", "sensitivity (%)", "specificity (%)", "accuracy (%)", "TP", "FP", "TN",
              "FN", "paper sensitivity", "paper specificity", "paper accuracy"]  # fmt: skip
    return markdown_table(header, cells)


def _group_markdown(rows: list[dict[str, Any]], title: str) -> str:
    cells = [
        [row["group"], str(row["n"]),
         *(_number(row[k]) for k in ("mean", "std", "min", "max")), _number(row["paper_mean"])]
        for row in rows
    ]  # fmt: skip
    header = [title, "patients", "Dice mean", "std", "min", "max", "paper Dice"]
    return markdown_table(header, cells)


def _volume_markdown(tables: EvaluationTables) -> str:
    units = {name: unit for name, _, unit in VOLUME_ROWS}
    cells = [
        [row["label"], *(_number(row[k], units[row["metric"]]) for k in ("mean", "std", "min",
         "max")), str(row["n"])]
        for row in volume_rows(tables)
    ]  # fmt: skip
    return markdown_table(["", "mean", "std", "min", "max", "patients"], cells)


def _patients_markdown(tables: EvaluationTables, patients: Mapping[int, PatientInfo] | None) -> str:
    cells = []
    for row in patient_rows(tables, patients):
        cells.append(
            [
                str(row["patient"]), str(row["n_slices"]), str(row["n_positive_slices"]),
                _number(row["dice"]), _number(row["jaccard"]), _number(row["dice_3d"]),
                _number(row["true_ml"], "ml"), _number(row["predicted_ml"], "ml"),
                _number(row["sensitivity"], "percent"), _number(row["specificity"], "percent"),
                " ".join(row["subtypes"]) or DASH, _number(row["age"], "age"),
            ]
        )  # fmt: skip
    header = ["patient", "slices", "ICH slices", "Dice", "Jaccard", "3D Dice", "true mL",
              "predicted mL", "sensitivity (%)", "specificity (%)", "subtypes", "age"]  # fmt: skip
    return markdown_table(header, cells)


def settings_lines(settings: Mapping[str, Any]) -> list[str]:
    """Bullet lines stating how the numbers were obtained (threshold, area minimum, morphology)."""
    lines = []
    if settings.get("threshold") is not None:
        lines.append(f"- probability threshold (Tables 5, subtype, age, volume): "
                     f"{settings['threshold']:g}")  # fmt: skip
    if "thresholds" in settings:
        levels = ", ".join(f"{t:g}" for t in settings["thresholds"])
        lines.append(f"- thresholds (Table 6): {levels}")
    if "min_area" in settings:
        reference = settings.get("reference_size", 640)
        lines.append(
            f"- slice detection: predicted positive when its post-processed area exceeds "
            f"{settings['min_area']:g} pixels at {reference}x{reference}, scaled by area to the "
            "scored grid (the paper: 400)"
        )
    post = settings.get("postprocess")
    if isinstance(post, Mapping):
        if post.get("closing_size", 0) > 1 or post.get("opening_size", 0) > 1:
            lines.append(
                f"- post-processing: {post.get('order', 'close-open')}, closing "
                f"{post.get('closing_size')}x{post.get('closing_size')}, opening "
                f"{post.get('opening_size')}x{post.get('opening_size')} (sizes at "
                f"{settings.get('reference_size', 640)} pixels, {post.get('convention')} "
                "convention)"
            )
        else:
            lines.append("- post-processing: threshold only (no morphology)")
    if "mode" in settings:
        if settings["mode"] == "full_slice":
            lines.append("- inference: whole slices (no stitching)")
        else:
            lines.append(
                f"- inference: {settings.get('window')}x{settings.get('window')} windows, stride "
                f"{settings.get('stride')}, {settings.get('blend_mode', 'constant')} averaging, "
                f"working size {settings.get('working_size')}"
            )
    if settings.get("context_slices"):
        k = int(settings["context_slices"])
        lines.append(f"- 2.5D input: {k} neighbouring slice(s) on each side stacked as channels")
    tuned = settings.get("tuned_on_val")
    if isinstance(tuned, Mapping) and "per_fold" in tuned:
        choices = "; ".join(
            f"fold {c.get('fold')}: {c.get('threshold'):g}, post-processing "
            f"{'on' if c.get('postprocess') else 'off'}"
            for c in tuned["per_fold"]
        )
        lines.append(f"- threshold and post-processing chosen on each fold's validation split, "
                     f"each fold scored at its own ({choices})")  # fmt: skip
    elif isinstance(tuned, Mapping):
        dice = tuned.get("val_dice")
        if tuned.get("fallback"):
            lines.append("- threshold and post-processing tuned on the validation split: no val "
                         "patient with ICH, the configured ones were kept")  # fmt: skip
        else:
            lines.append(
                f"- threshold and post-processing tuned on the validation split: "
                f"{tuned.get('threshold'):g}, post-processing "
                f"{'on' if tuned.get('postprocess') else 'off'} (val Dice {_number(dice)}, "
                f"{len(tuned.get('grid') or [])} settings tried); the test split played no part"
            )
    lines.append("- scored on each scan's original grid; Dice / Jaccard only on slices with ICH, "
                 "averaged per patient, then over patients (population std)")  # fmt: skip
    return lines


def tables_markdown(
    tables: EvaluationTables,
    title: str = "Evaluation",
    settings: Mapping[str, Any] | None = None,
    patients: Mapping[int, PatientInfo] | None = None,
    preamble: Sequence[str] = (),
    per_patient: bool = True,
) -> str:
    """Every table as markdown, each with the paper's numbers as a reference column."""
    parts = [f"# {title}", ""]
    parts += list(preamble)
    if settings:
        parts += settings_lines(settings)
    parts += [
        "",
        "Paper: Hssayeni et al. 2020, windowed U-Net, union of the 5 test folds.",
        "",
        f"## Table 5: segmentation at {_threshold_text(tables.segmentation.threshold)}",
        "",
        _table5_markdown(tables),
        "",
        "## Table 6: slice detection by threshold (pooled over slices)",
        "",
        _table6_markdown(tables),
    ]
    if tables.subtype_dice:
        parts += ["", "## Dice by subtype", "", _group_markdown(subtype_rows(tables), "subtype")]
    if tables.age_dice:
        parts += ["", "## Dice by age", "", _group_markdown(age_rows(tables), "age (years)")]
    parts += ["", "## Beyond the paper: volumes", "", _volume_markdown(tables)]
    if per_patient:
        parts += ["", "## Per patient", "", _patients_markdown(tables, patients)]
    return "\n".join(parts) + "\n"


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
    markdown = tables_markdown(tables, title, result.settings, result.patients, preamble)
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
    )


# --------------------------------------------------------------------------- across folds


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_fold_dirs(path: str | os.PathLike[str], split: str = "test") -> list[Path]:
    """Folders at or below ``path`` holding a ``report.json`` of a ``split`` evaluation and its
    ``counts.npz``, in natural order (``2`` before ``10``)."""
    root = Path(path)
    if not root.exists():
        raise ReportError(f"{root}: no such file or directory", root)
    if root.is_file():
        raise ReportError(f"{root}: expected a run or multirun folder, not a file", root)
    found = []
    candidates = [root / REPORT_JSON] if (root / REPORT_JSON).is_file() else []
    candidates += [p for p in root.rglob(REPORT_JSON) if p.parent != root]
    for report_path in candidates:
        try:
            document = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ReportError(f"{report_path}: cannot read the report (not valid JSON)",
                              report_path) from None  # fmt: skip
        if isinstance(document, dict) and document.get("format") == REPORT_FORMAT:
            if document.get("split", "test") == split:
                found.append(report_path.parent)
    return sorted(found, key=_natural_key)


@dataclass(frozen=True)
class FoldSummary:
    """One fold's own numbers, for the per-fold lines of the cross-validation report."""

    directory: str
    fold: int | None
    patients: int
    patients_with_ich: int
    slices: int
    dice: float
    jaccard: float
    sensitivity: float
    specificity: float
    dice_3d: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fold_summary(result: FoldResult) -> FoldSummary:
    tables = result.tables()
    pooled = tables.segmentation.pooled
    return FoldSummary(
        directory=str(result.directory),
        fold=result.fold,
        patients=len(tables.patients),
        patients_with_ich=int(tables.patients.has_ich.sum()),
        slices=len(result.counts),
        dice=tables.segmentation.dice.mean,
        jaccard=tables.segmentation.jaccard.mean,
        sensitivity=pooled.sensitivity,
        specificity=pooled.specificity,
        dice_3d=tables.volume.dice_3d.mean,
    )


#: Settings that must agree between folds for their counts to be merged.
MERGE_KEYS: tuple[str, ...] = (
    "threshold", "thresholds", "min_area", "reference_size", "postprocess",
)  # fmt: skip


@dataclass
class CrossValidationReport:
    """The tables over the union of all folds' test patients, and each fold's own summary."""

    tables: EvaluationTables
    folds: list[FoldSummary]
    counts: SliceCounts
    patients: dict[int, PatientInfo]
    settings: dict[str, Any]
    missing_folds: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CV_REPORT_FORMAT,
            "version": REPORT_VERSION,
            "settings": self.settings,
            "folds": [f.to_dict() for f in self.folds],
            "missing_folds": self.missing_folds,
            "patients": sorted(self.patients),
            "patient_info": {str(p): self.patients[p].to_dict() for p in sorted(self.patients)},
            "n_slices": len(self.counts),
            "tables": self.tables.to_dict(),
        }

    def to_markdown(self) -> str:
        cells = [
            [DASH if f.fold is None else str(f.fold), f.directory, str(f.patients),
             str(f.patients_with_ich), str(f.slices), _number(f.dice), _number(f.jaccard),
             _number(f.sensitivity, "percent"), _number(f.specificity, "percent"),
             _number(f.dice_3d)]
            for f in self.folds
        ]  # fmt: skip
        header = ["fold", "run", "patients", "with ICH", "slices", "Dice", "Jaccard",
                  "sensitivity (%)", "specificity (%)", "3D Dice"]  # fmt: skip
        preamble = [
            f"- {len(self.folds)} fold(s), {len(self.patients)} test patients, "
            f"{len(self.counts)} slices; every test patient scored exactly once",
        ]
        if self.missing_folds:
            missing = ", ".join(str(f) for f in self.missing_folds)
            preamble.append(f"- WARNING: fold(s) {missing} missing: not the whole dataset")
        body = tables_markdown(
            self.tables, "Cross-validation report", self.settings, self.patients, preamble
        )
        return (
            body
            + "\n## Per fold (each fold's own numbers)\n\n"
            + markdown_table(header, cells)
            + "\n"
        )


def merge_folds(run_dirs: Sequence[str | os.PathLike[str]]) -> CrossValidationReport:
    """Load each fold's evaluation and recompute every table over all their test patients.

    Raises :class:`ReportError` when a folder holds no readable evaluation, when a patient is
    tested in two folders (e.g. two runs of the same fold) or when the folds were scored with
    different thresholds, area minimum or post-processing.

    Folds whose threshold and post-processing were chosen on their own validation split
    (``settings.tuned_on_val``, all folds or none) may differ in both: every table is then
    computed with each fold at its own operating point (:func:`operating_point_tables`; Table 6
    over every scored threshold, each fold with its own post-processing) and the settings list the
    choice of each fold.
    """
    if not run_dirs:
        raise ReportError("no fold results to merge")
    results = [load_fold(d) for d in run_dirs]
    first = results[0]
    tuned = [bool(r.settings.get("tuned_on_val")) for r in results]
    if any(tuned) and not all(tuned):
        odd = results[tuned.index(not tuned[0])]
        raise ReportError(
            f"{odd.directory} and {first.directory}: only some folds chose their threshold and "
            "post-processing on the validation split; evaluate all folds alike",
            odd.directory,
        )
    keys = MERGE_KEYS
    if all(tuned):  # each fold's own threshold and post-processing
        keys = tuple(k for k in MERGE_KEYS if k not in ("threshold", "postprocess"))
    for result in results[1:]:
        for key in keys:
            if json_safe(result.settings.get(key)) != json_safe(first.settings.get(key)):
                raise ReportError(
                    f"{result.directory} and {first.directory} were evaluated with different "
                    f"{key} ({result.settings.get(key)} vs {first.settings.get(key)}); "
                    "re-evaluate them alike",
                    result.directory,
                )
    owner: dict[int, Path | None] = {}
    for result in results:
        for patient in np.unique(result.counts.patient).tolist():
            if patient in owner:
                raise ReportError(
                    f"patient {patient} is tested in both {owner[patient]} and "
                    f"{result.directory}: give each fold's run folder only once",
                    result.directory,
                )
            owner[patient] = result.directory
    try:
        counts = SliceCounts.concatenate([r.counts for r in results]).sorted()
    except ConfigError as err:
        raise ReportError(f"{first.directory}: {err}", first.directory) from None
    patients: dict[int, PatientInfo] = {}
    for result in results:
        patients.update(result.patients)
    patients = {p: patients[p] for p in owner}
    settings = {key: first.settings[key] for key in first.settings if key != "fold"}
    points = {(r.threshold, json.dumps(json_safe(r.settings.get("postprocess")))) for r in results}
    if all(tuned) and len(points) > 1:
        tables = compute_operating_point_tables(
            [(r.counts, r.threshold) for r in results], patients, first.min_area
        )
        settings["threshold"] = None
        settings["postprocess"] = None
        settings["tuned_on_val"] = {
            "per_fold": [
                {"fold": r.fold, **{k: r.settings["tuned_on_val"].get(k)
                                    for k in ("threshold", "postprocess", "val_dice")}}
                for r in results
            ]
        }  # fmt: skip
    else:
        tables = compute_tables(counts, patients, first.threshold, first.min_area)
    folds = {r.fold for r in results if r.fold is not None}
    ks = {r.k for r in results if r.k is not None}
    missing = sorted(set(range(ks.pop())) - folds) if len(ks) == 1 and folds else []
    return CrossValidationReport(
        tables=tables,
        folds=[fold_summary(r) for r in results],
        counts=counts,
        patients=patients,
        settings=settings,
        missing_folds=missing,
    )


def write_cv_report(report: CrossValidationReport, out_dir: str | os.PathLike[str]) -> str:
    """Write ``cv_report.json`` and ``cv_report.md`` atomically; returns the markdown."""
    out = Path(out_dir)
    markdown = report.to_markdown()
    atomic_write_text(out / CV_REPORT_MD, markdown)
    atomic_write_text(out / CV_REPORT_JSON, dumps_json(report.to_dict()))
    return markdown
