"""The tables of an evaluation as plain rows (lists of dicts, the paper's number beside ours) and
as markdown (:func:`tables_markdown`); only formatting of what :mod:`ichseg.eval.tables` holds.
See docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ichseg.eval.metrics import Summary
from ichseg.eval.tables import (
    PAPER_AGE_DICE,
    PAPER_SUBTYPE_DICE,
    PAPER_TABLE5,
    PAPER_TABLE6,
    EvaluationTables,
    PatientInfo,
)

DASH = "–"


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
    temperature = settings.get("temperature")
    if temperature is not None and float(temperature) != 1.0:
        lines.append(
            f"- probabilities calibrated by temperature T = {float(temperature):.4g}: every "
            "threshold (Tables 5 and 6) is on the calibrated scale"
        )
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


def _ece(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return f"{float(value):.5f}"


def calibration_lines(calibration: Mapping[str, Any]) -> list[str]:
    """The "Calibration" section: the temperature and where it was fitted, the expected
    calibration error before -> after on the scored split (and on val), the reliability diagram."""
    temperature = float(calibration.get("temperature", 1.0))
    split = calibration.get("split", "test")
    bins = calibration.get("bins", 15)
    fit = calibration.get("fit")
    lines = []
    if isinstance(fit, Mapping) and fit.get("calibrated", True):
        lines.append(
            f"- temperature T = {temperature:.4g}, fitted on {int(fit.get('pixels', 0)):,} val "
            "pixels (a seeded sample) by minimising the BCE of sigmoid(logit(p) / T); every "
            "probability and threshold of this report is on the calibrated scale (the threshold "
            f"tuned on val, {fit.get('threshold_uncalibrated', 0.5):g} uncalibrated, is "
            f"{fit.get('threshold', 0.5):.4g}): the masks are those of the uncalibrated model"
        )
    elif temperature != 1.0:
        lines.append(f"- temperature T = {temperature:.4g}, as configured (not fitted here)")
    else:
        lines.append("- not calibrated (T = 1): the network's own probabilities")
    lines.append(
        f"- expected calibration error ({bins} bins, pixels), before -> after: {split} "
        f"{_ece(calibration.get('ece_before'))} -> {_ece(calibration.get('ece_after'))} "
        f"({int(calibration.get('pixels', 0)):,} pixels, a seeded sample)"
    )
    if isinstance(fit, Mapping) and split != "val":
        lines.append(
            f"- on val (where T was fitted): {_ece(fit.get('ece_before'))} -> "
            f"{_ece(fit.get('ece_after'))} ({int(fit.get('pixels', 0)):,} pixels)"
        )
    diagram = calibration.get("diagram")
    if diagram:
        lines += [
            "",
            f"![reliability diagram: fraction of ICH pixels by probability bin]({diagram})",
        ]
    return lines


#: The first line under the title of every report on a phantom (``settings["synthetic"]``).
SYNTHETIC_BANNER = (
    "> **Synthetic data.** These numbers come from a generated phantom (ichseg.data.phantom), not "
    "from patients' CT scans: they show that the pipeline works end to end, not how well a model "
    "segments real ICH."
)


def tables_markdown(
    tables: EvaluationTables,
    title: str = "Evaluation",
    settings: Mapping[str, Any] | None = None,
    patients: Mapping[int, PatientInfo] | None = None,
    preamble: Sequence[str] = (),
    per_patient: bool = True,
    calibration: Mapping[str, Any] | None = None,
) -> str:
    """Every table as markdown, each with the paper's numbers as a reference column; a report on
    synthetic data (``settings["synthetic"]``) opens with :data:`SYNTHETIC_BANNER`; with
    ``calibration`` (``report.json``'s) a "Calibration" section (:func:`calibration_lines`)."""
    parts = [f"# {title}", ""]
    if settings and settings.get("synthetic"):
        parts += [SYNTHETIC_BANNER, ""]
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
    if calibration:
        parts += ["", "## Calibration", "", *calibration_lines(calibration)]
    if per_patient:
        parts += ["", "## Per patient", "", _patients_markdown(tables, patients)]
    return "\n".join(parts) + "\n"
