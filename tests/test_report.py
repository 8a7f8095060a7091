"""Report tables on hand-made counts, the report files, the fold merge and the ichseg.report CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ichseg.errors import ReportError
from ichseg.eval import report as rep
from ichseg.eval.metrics import SliceCounts, evaluation_tables, patient_metrics
from ichseg.eval.report import FoldResult, PatientInfo
from ichseg.report import main

SETTINGS = {
    "threshold": 0.5, "thresholds": [0.5, 0.9], "min_area": 0.0, "reference_size": 640,
    "postprocess": {"closing_size": 10, "opening_size": 5, "order": "close-open",
                    "convention": "opencv"},
    "mode": "windowed", "window": 160, "stride": 80, "working_size": 640, "blend_mode": "constant",
}  # fmt: skip


def hand_counts(patients: list[int], shift: int = 0) -> SliceCounts:
    """Two slices per patient: slice 1 ICH (gt 100, predicted 100 / 40, overlap 50 / 40),
    slice 2 clean except for odd patients (predicted 30 / 0 there)."""
    n = len(patients)
    patient = np.repeat(patients, 2)
    slice_index = np.tile([1, 2], n)
    gt = np.tile([100, 0], n)
    odd = np.repeat(np.asarray(patients) % 2 == 1, 2) & (slice_index == 2)
    pred = np.where(slice_index[:, None] == 1, [[100 + shift, 40]], 0) + odd[:, None] * [[30, 0]]
    inter = np.where(slice_index[:, None] == 1, [[50, 40]], 0)
    return SliceCounts(patient, slice_index, (0.5, 0.9), gt, pred, inter, voxel_ml=0.001)


def info(patients: list[int]) -> dict[int, PatientInfo]:
    return {
        p: PatientInfo(p, age=10.0 if p % 3 == 0 else 40.0, subtypes=("EDH", "SDH")[p % 2 :][:1])
        for p in patients
    }


# --------------------------------------------------------------------------- tables


def test_tables_on_hand_made_counts():
    counts = hand_counts([49, 50, 51])
    tables = rep.compute_tables(counts, info([49, 50, 51]), threshold=0.5, min_area=0)
    t5 = {row["metric"]: row for row in rep.table5_rows(tables)}
    assert t5["dice"]["mean"] == pytest.approx(2 * 50 / 200)  # every ICH slice: 2I/(G+P) = 0.5
    assert t5["jaccard"]["mean"] == pytest.approx(50 / 150)
    assert t5["dice"]["paper_mean"] == 0.315 and t5["dice"]["paper_max"] == 0.677
    assert t5["sensitivity"]["mean"] == 1.0
    assert t5["specificity"]["mean"] == pytest.approx(1 / 3)  # 49 and 51 predict on slice 2

    t6 = rep.table6_rows(tables)
    assert [row["threshold"] for row in t6] == [0.5, 0.9]
    assert (t6[0]["tp"], t6[0]["fp"], t6[0]["tn"], t6[0]["fn"]) == (3, 2, 1, 0)
    assert t6[1]["specificity"] == 1.0 and t6[1]["paper_sensitivity"] == 0.631

    subtypes = {row["group"]: row for row in rep.subtype_rows(tables)}
    assert subtypes["SDH"]["n"] == 2 and subtypes["EDH"]["n"] == 1 and subtypes["SAH"]["n"] == 0
    assert subtypes["SDH"]["paper_mean"] == 0.52
    ages = {row["group"]: row for row in rep.age_rows(tables)}
    assert ages["<18"]["n"] == 1 and ages[">=18"]["n"] == 2 and ages["<18"]["paper_mean"] == 0.321

    volumes = {row["metric"]: row for row in rep.volume_rows(tables)}
    assert volumes["dice_3d"]["mean"] == pytest.approx(
        np.nanmean(patient_metrics(counts, 0.5, 0).dice_3d)
    )
    assert volumes["abs_error_ml"]["mean"] == pytest.approx(np.mean([0.0, 0.03, 0.03]))
    rows = rep.patient_rows(tables, info([49, 50, 51]))
    assert [r["patient"] for r in rows] == [49, 50, 51] and rows[0]["subtypes"] == ["SDH"]

    markdown = rep.tables_markdown(tables, "Fold 0", SETTINGS, info([49, 50, 51]))
    for text in ("Table 5", "Table 6", "0.315", "97.3", "0.500", "Dice by subtype", "Dice by age",
                 "closing 10x10", "exceeds 0 pixels at 640x640", "3D Dice"):  # fmt: skip
        assert text in markdown, text


def test_json_is_strict_and_nan_becomes_null():
    tables = evaluation_tables(hand_counts([50]), min_area=0)  # no ICH-free patient: fp volume NaN
    assert math.isnan(tables.volume.false_positive_ml.mean)
    text = rep.dumps_json({"tables": tables.to_dict(), "x": np.float32("nan"), "n": np.int64(3)})
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["tables"]["volume"]["false_positive_ml"]["mean"] is None and data["n"] == 3


# --------------------------------------------------------------------------- files


def write_fold(directory: Path, patients: list[int], fold: int, k: int = 5, **settings) -> Path:
    result = FoldResult(
        hand_counts(patients), info(patients), {**SETTINGS, **settings}, "test", fold, k
    )
    flags = np.zeros((len(result.counts), 6), dtype=bool)
    flags[::2, 4] = True  # slice 1 of each patient: SDH
    rep.write_report(directory, result, flags)
    return directory


def test_report_files_round_trip(tmp_path):
    write_fold(tmp_path, [49, 50, 51], fold=2)
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "slices.csv",
                                                    "counts.npz"}  # fmt: skip
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["fold"] == 2 and document["patients"] == [49, 50, 51]
    assert document["settings"]["min_area"] == 0.0 and document["paper"]["table6"]["0.5"]
    lines = (tmp_path / "slices.csv").read_text().splitlines()
    assert len(lines) == 1 + 6
    header = lines[0].split(",")
    assert header[:4] == ["patient", "slice", "gt_pixels", "gt_ml"]
    expected = {"pred_pixels@0.5", "pred_pixels@0.9", "dice@0.5", "jaccard@0.5", "SDH", "fracture"}
    assert expected <= set(header)
    row = dict(zip(header, lines[2].split(","), strict=True))  # patient 49, slice 2: no ICH
    assert row["dice@0.5"] == "" and row["SDH"] == "0" and row["detected@0.5"] == "1"
    loaded = rep.load_fold(tmp_path)
    np.testing.assert_array_equal(loaded.counts.pred_pixels, hand_counts([49, 50, 51]).pred_pixels)
    assert loaded.patients == info([49, 50, 51]) and loaded.fold == 2


def test_merge_folds_recomputes_over_all_test_patients(tmp_path):
    folds = [[49, 50], [51, 52, 53], [54]]
    dirs = [write_fold(tmp_path / str(i), p, fold=i) for i, p in enumerate(folds)]
    merged = rep.merge_folds(dirs)
    everyone = [p for fold in folds for p in fold]
    assert sorted(merged.patients) == everyone and len(merged.counts) == 2 * len(everyone)
    direct = rep.compute_tables(hand_counts(everyone), info(everyone), 0.5, 0.0)
    assert merged.tables.segmentation.dice == direct.segmentation.dice
    assert merged.tables.detection == direct.detection
    assert merged.tables.subtype_dice == direct.subtype_dice
    assert [f.fold for f in merged.folds] == [0, 1, 2] and merged.folds[1].patients == 3
    assert merged.missing_folds == [3, 4]
    markdown = merged.to_markdown()
    assert "Per fold" in markdown and "fold(s) 3, 4 missing" in markdown
    assert json.loads(rep.dumps_json(merged.to_dict()))["folds"][2]["patients"] == 1


def test_merge_rejects_a_patient_tested_twice_and_mixed_settings(tmp_path):
    a = write_fold(tmp_path / "a", [49, 50], fold=0)
    b = write_fold(tmp_path / "b", [50, 51], fold=1)
    with pytest.raises(ReportError, match=r"patient 50 is tested in both .*a and .*b"):
        rep.merge_folds([a, b])
    c = write_fold(tmp_path / "c", [52], fold=1, min_area=400.0)
    with pytest.raises(ReportError, match="different min_area"):
        rep.merge_folds([a, c])


def tuned(threshold: float, postprocess: bool) -> dict:
    """Settings of a fold whose operating point was chosen on its validation split."""
    closing = 10 if postprocess else 0
    return {
        "threshold": threshold,
        "postprocess": {**SETTINGS["postprocess"], "closing_size": closing,
                        "opening_size": 5 if postprocess else 0},
        "tuned_on_val": {"threshold": threshold, "postprocess": postprocess, "val_dice": 0.7},
    }  # fmt: skip


def test_folds_tuned_on_val_merge_each_at_its_own_operating_point(tmp_path):
    a = write_fold(tmp_path / "a", [49, 50], fold=0, **tuned(0.5, True))
    b = write_fold(tmp_path / "b", [51, 52, 53], fold=1, **tuned(0.9, False))
    merged = rep.merge_folds([a, b])
    per_patient = np.concatenate([
        patient_metrics(hand_counts([49, 50]), 0.5, 0.0).dice,
        patient_metrics(hand_counts([51, 52, 53]), 0.9, 0.0).dice,
    ])  # fmt: skip
    assert merged.tables.segmentation.dice.mean == pytest.approx(np.nanmean(per_patient))
    assert math.isnan(merged.tables.segmentation.threshold)
    assert merged.tables.patients.patient.tolist() == [49, 50, 51, 52, 53]
    # Table 6 still covers every scored threshold over all folds
    assert [row.threshold for row in merged.tables.detection] == [0.5, 0.9]
    assert merged.settings["threshold"] is None
    assert [c["threshold"] for c in merged.settings["tuned_on_val"]["per_fold"]] == [0.5, 0.9]
    markdown = merged.to_markdown()
    assert "each fold's own threshold" in markdown
    assert "fold 1: 0.9, post-processing off" in markdown
    json.loads(rep.dumps_json(merged.to_dict()), parse_constant=lambda c: pytest.fail(c))
    # the same choice in every fold: an ordinary merge at that threshold
    c = write_fold(tmp_path / "c", [51, 52, 53], fold=1, **tuned(0.5, True))
    same = rep.merge_folds([a, c])
    assert same.tables.segmentation.threshold == 0.5
    # tuned and untuned folds do not mix
    d = write_fold(tmp_path / "d", [54], fold=2)
    with pytest.raises(ReportError, match="only some folds"):
        rep.merge_folds([a, d])


def test_calibrated_folds_each_with_a_column_of_its_own_merge(tmp_path):
    """A calibrated fold scores its tuned threshold mapped to the calibrated scale (0.43, 0.61):
    a column only it has. The merge keeps the shared columns for Table 6 and scores each fold at
    its own."""

    def calibrated_fold(directory: Path, patients: list[int], fold: int, own: float,
                        like: float) -> Path:  # fmt: skip
        base = hand_counts(patients)
        column = base.column(like)
        counts = SliceCounts(
            base.patient, base.slice_index, (*base.thresholds, own), base.gt_pixels,
            np.c_[base.pred_pixels, base.pred_pixels[:, column]],
            np.c_[base.intersection, base.intersection[:, column]], base.voxel_ml,
        )  # fmt: skip
        settings = {**SETTINGS, **tuned(own, True), "thresholds": sorted([0.5, 0.9, own]),
                    "temperature": 1.5 + fold}  # fmt: skip
        rep.write_report(directory, FoldResult(counts, info(patients), settings, "test", fold, 5))
        return directory

    a = calibrated_fold(tmp_path / "a", [49, 50], 0, 0.43, 0.5)
    b = calibrated_fold(tmp_path / "b", [51, 52, 53], 1, 0.61, 0.9)
    merged = rep.merge_folds([a, b])
    per_patient = np.concatenate([
        patient_metrics(hand_counts([49, 50]), 0.5, 0.0).dice,
        patient_metrics(hand_counts([51, 52, 53]), 0.9, 0.0).dice,
    ])  # fmt: skip
    assert merged.tables.segmentation.dice.mean == pytest.approx(np.nanmean(per_patient))
    assert [row.threshold for row in merged.tables.detection] == [0.5, 0.9]
    assert merged.counts.thresholds.tolist() == [0.5, 0.9]
    assert merged.settings["thresholds"] == [0.5, 0.9] and merged.settings["temperature"] is None
    assert [c["threshold"] for c in merged.settings["tuned_on_val"]["per_fold"]] == [0.43, 0.61]
    # other thresholds still have to agree
    c = write_fold(tmp_path / "c", [54], fold=2, **tuned(0.5, True), thresholds=[0.5, 0.7])
    with pytest.raises(ReportError, match="different thresholds"):
        rep.merge_folds([a, c])


# --------------------------------------------------------------------------- the CLI


def fake_multirun(root: Path) -> Path:
    for fold, patients in enumerate([[49, 50], [51, 52], [53, 54, 55]]):
        write_fold(root / str(fold), patients, fold=fold, k=3)
        (root / str(fold) / "checkpoints").mkdir()
    # a val evaluation in a sub-folder is not a test fold and must be ignored
    write_fold(root / "0" / "val", [60, 61], fold=0, k=3)
    val = json.loads((root / "0" / "val" / "report.json").read_text())
    val["split"] = "val"
    (root / "0" / "val" / "report.json").write_text(json.dumps(val))
    return root


def test_cli_on_a_multirun_folder(tmp_path, capsys):
    root = fake_multirun(tmp_path / "multiruns" / "2025-01-01_00-00-00")
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "Cross-validation report" in out and "7 test patients" in out
    document = json.loads((root / "cv_report.json").read_text())
    assert document["patients"] == [49, 50, 51, 52, 53, 54, 55] and document["missing_folds"] == []
    assert (root / "cv_report.md").read_text() == out
    assert main([str(root / "0"), str(root / "1"), "--out", str(tmp_path / "cv")]) == 0
    two = json.loads((tmp_path / "cv" / "cv_report.json").read_text())
    assert two["patients"] == [49, 50, 51, 52]


def test_cli_runs_as_a_module(tmp_path):
    root = fake_multirun(tmp_path / "m")
    done = subprocess.run(
        [sys.executable, "-m", "ichseg.report", str(root), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "cv_report.md").is_file()


def cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ichseg.report: error: ") and "Traceback" not in err
    return err


def test_cli_bad_inputs_exit_2_naming_the_path(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in cli_error([str(empty)], capsys)
    assert "no such file" in cli_error([str(tmp_path / "missing")], capsys)

    root = fake_multirun(tmp_path / "runs")
    shutil.copytree(root / "1", root / "3")  # fold 1 run twice
    err = cli_error([str(root)], capsys)
    assert "patient 51" in err and str(root / "1") in err and str(root / "3") in err
    assert not (root / "cv_report.json").exists()

    shutil.rmtree(root / "3")
    (root / "2" / "counts.npz").write_bytes(b"not an npz file")
    err = cli_error([str(root)], capsys)
    assert str(root / "2" / "counts.npz") in err and "cannot read" in err

    (root / "2" / "report.json").write_text("{not json")
    assert str(root / "2" / "report.json") in cli_error([str(root)], capsys)
