"""The cross-validation report: the folds' test evaluations found below run folders
(:func:`find_fold_dirs`), merged into the tables over the union of their test patients, as the
paper reports them, plus one summary row per fold (:func:`merge_folds`), and written as
``cv_report.json`` / ``cv_report.md`` (:func:`write_cv_report`). See docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import ConfigError, ReportError
from ichseg.eval.counts import SliceCounts
from ichseg.eval.markdown import DASH, _number, markdown_table, tables_markdown
from ichseg.eval.report import (
    REPORT_FORMAT,
    REPORT_JSON,
    REPORT_VERSION,
    FoldResult,
    dumps_json,
    json_safe,
    load_fold,
)
from ichseg.eval.tables import (
    EvaluationTables,
    PatientInfo,
    compute_operating_point_tables,
    compute_tables,
)
from ichseg.utils.atomic import atomic_write_text

#: ``format`` of ``cv_report.json``.
CV_REPORT_FORMAT = "ichseg-cv-report"
CV_REPORT_JSON, CV_REPORT_MD = "cv_report.json", "cv_report.md"


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_fold_dirs(path: str | os.PathLike[str], split: str = "test") -> list[Path]:
    """Folders at or below ``path`` holding a ``report.json`` of a ``split`` evaluation and its
    ``counts.npz``, in natural order (``2`` before ``10``).

    A ``report.json`` that is not valid JSON or not an ichseg evaluation report (another format,
    the wrong types) is a :class:`ReportError` naming it and what is wrong, never silently
    skipped.
    """
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
        problem = _schema_problem(document)
        if problem is not None:
            raise ReportError(f"{report_path}: {problem}", report_path)
        if document.get("split", "test") == split:
            found.append(report_path.parent)
    return sorted(found, key=_natural_key)


def _schema_problem(document: Any) -> str | None:
    """What makes a parsed ``report.json`` not an evaluation report of ichseg (None if it is)."""
    if not isinstance(document, dict):
        return f"not an ichseg evaluation report (a JSON {type(document).__name__}, not an object)"
    if document.get("format") != REPORT_FORMAT:
        return (
            f"not an ichseg evaluation report (format {document.get('format')!r}, expected "
            f"{REPORT_FORMAT!r})"
        )
    split = document.get("split", "test")
    if not isinstance(split, str):
        return f"the report's split is {split!r}, not a name such as 'test'"
    for key, kind in (("settings", dict), ("patient_info", dict)):
        value = document.get(key)
        if value is not None and not isinstance(value, kind):
            return f"the report's {key!r} is a JSON {type(value).__name__}, not an object"
    return None


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
    tuned = check_alike(results)
    owner = patient_owners(results)
    shared = SliceCounts.shared_thresholds(r.counts for r in results)
    try:
        counts = SliceCounts.concatenate([r.counts.at_thresholds(shared) for r in results]).sorted()
    except ConfigError as err:
        raise ReportError(f"{first.directory}: {err}", first.directory) from None
    patients: dict[int, PatientInfo] = {}
    for result in results:
        patients.update(result.patients)
    patients = {p: patients[p] for p in owner}
    tables, settings = merged_tables(results, counts, patients, tuned)
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


def check_alike(results: Sequence[FoldResult]) -> bool:
    """Raise :class:`ReportError` unless the folds were scored alike (:data:`MERGE_KEYS`; with
    ``tuned_on_val`` in all folds, each may have its own threshold and post-processing); returns
    whether they were tuned on val."""
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

    own = [r.threshold for r in results] if all(tuned) else []

    def setting(result: FoldResult, key: str) -> Any:
        value = json_safe(result.settings.get(key))
        if own and key == "thresholds" and isinstance(value, list):
            # each fold's own (calibrated) operating point may add a column of its own
            value = [t for t in value if not any(math.isclose(t, o, abs_tol=1e-9) for o in own)]
        return value

    for result in results[1:]:
        for key in keys:
            if setting(result, key) != setting(first, key):
                raise ReportError(
                    f"{result.directory} and {first.directory} were evaluated with different "
                    f"{key} ({result.settings.get(key)} vs {first.settings.get(key)}); "
                    "re-evaluate them alike",
                    result.directory,
                )
    return all(tuned)


def patient_owners(results: Sequence[FoldResult]) -> dict[int, Path | None]:
    """``{patient: folder}`` in fold order; raises :class:`ReportError` when a patient is tested
    in two folders."""
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
    return owner


def merged_tables(
    results: Sequence[FoldResult],
    counts: SliceCounts,
    patients: dict[int, PatientInfo],
    tuned: bool,
) -> tuple[EvaluationTables, dict[str, Any]]:
    """The tables over all folds' ``counts`` and the merged settings: at the shared operating
    point, or, for folds tuned on val to different ones, each fold at its own."""
    first = results[0]
    settings = {key: first.settings[key] for key in first.settings if key != "fold"}
    points = {(r.threshold, json.dumps(json_safe(r.settings.get("postprocess")))) for r in results}
    if not (tuned and len(points) > 1):
        return compute_tables(counts, patients, first.threshold, first.min_area), settings
    tables = compute_operating_point_tables(
        [(r.counts, r.threshold) for r in results], patients, first.min_area
    )
    settings["threshold"] = None
    settings["postprocess"] = None
    settings["thresholds"] = [float(t) for t in counts.thresholds]
    if "temperature" in settings:
        settings["temperature"] = None  # each fold's own (report.json of each fold)
    settings["tuned_on_val"] = {
        "per_fold": [
            {"fold": r.fold, **{k: r.settings["tuned_on_val"].get(k)
                                for k in ("threshold", "postprocess", "val_dice")}}
            for r in results
        ]
    }  # fmt: skip
    return tables, settings


def write_cv_report(report: CrossValidationReport, out_dir: str | os.PathLike[str]) -> str:
    """Write ``cv_report.json`` and ``cv_report.md`` atomically; returns the markdown."""
    out = Path(out_dir)
    markdown = report.to_markdown()
    atomic_write_text(out / CV_REPORT_MD, markdown)
    atomic_write_text(out / CV_REPORT_JSON, dumps_json(report.to_dict()))
    return markdown


def collect_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The test-evaluation folders below every path (each path must hold at least one)."""
    runs: list[Path] = []
    for path in paths:
        found = find_fold_dirs(path)
        if not found:
            raise ReportError(
                f"{path}: no fold results found (no report.json with counts.npz of a test "
                "evaluation below it)",
                path,
            )
        runs += [run for run in found if run not in runs]
    return runs


def default_out_dir(paths: Sequence[str | os.PathLike[str]]) -> Path:
    """PATH for one path; the deepest folder the paths share for several."""
    if len(paths) == 1:
        return Path(paths[0])
    return Path(os.path.commonpath([os.path.abspath(p) for p in paths]))


def cross_validation_report(
    paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
) -> tuple[CrossValidationReport, str, Path]:
    """Find, merge and write: returns the report, its markdown and the output folder."""
    report = merge_folds(collect_runs(paths))
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    try:
        markdown = write_cv_report(report, out)
    except OSError as err:
        raise ReportError(f"{out}: cannot write the report ({err.strerror})", out) from None
    return report, markdown, out
