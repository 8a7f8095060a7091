"""One inference recipe: for every experiment, the masks ``ichseg.predict`` writes with the best
checkpoint are, voxel for voxel, the masks the stitched evaluation scored, its volumes are the
report's, and ``ichseg.evaluate`` on that checkpoint writes the identical report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_train import TINY

from ichseg.checkpoint import load_model
from ichseg.evaluate import evaluate
from ichseg.predict import main as predict_main
from ichseg.train import compose_config, train

#: 64x64 phantom scans at a 96x96 working size: every mask goes through the resampling back.
SMALL = [
    *[o for o in TINY if not o.startswith(("data.phantom.size", "data.working_size"))],
    "data=phantom",
    "data.phantom.size=64",
    "data.working_size=96",
    "data.num_workers=0",
    "trainer=cpu",
    "callbacks.stitched_eval.save_masks=true",
    "callbacks.stitched_eval.n_overlays=0",
]
EXPERIMENTS: dict[str, list[str]] = {
    "windowed": [],
    "windowed_plus": ["data.batch_size=6"],
    "full_slice": ["data.batch_size=2"],
    "full_slice_plus": ["data.batch_size=2"],
    "threshold": ["data.batch_size=4"],
}


def train_run(experiment: str, root: Path) -> Path:
    """Train the experiment on the small phantom; returns its run folder."""
    overrides = [f"experiment={experiment}", *SMALL, *EXPERIMENTS[experiment]]
    if experiment == "threshold":  # no network to shrink
        overrides = [o for o in overrides if not o.startswith("model.net.")]
    run = root / "run"
    train(compose_config([*overrides, f"paths.log_dir={root}"], run))
    return run


def best_checkpoint(run: Path) -> Path:
    return next((run / "checkpoints").glob("best-*.ckpt"))


def volumes(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {Path(row["file"]).name: float(row["ich_volume_ml"]) for row in csv.DictReader(f)}


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_predict_writes_the_masks_the_evaluation_scored(experiment, tmp_path, capsys):
    run = train_run(experiment, tmp_path)
    report = json.loads((run / "report.json").read_text())
    ckpt = best_checkpoint(run)
    model = load_model(ckpt)
    settings = report["settings"]
    stored = model.inference_spec.to_dict()
    assert stored["autocast"] == "auto" and settings["inference"]["autocast"] == "none"  # 32-bit
    assert settings["inference"] == {**stored, "autocast": "none"}  # the spec the report used
    assert settings["input"] == model.input_spec.to_dict()
    if experiment.endswith("_plus"):
        # the tuned threshold, on the scale of the temperature fitted with it
        assert settings["tuned_on_val"]["threshold_calibrated"] == model.inference_spec.threshold
        assert settings["threshold"] == model.inference_spec.threshold
        assert settings["temperature"] == model.inference_spec.temperature != 1.0
        assert model.operating_point["source"] == "tuned on val"
        assert settings["operating_point_file"] == str(ckpt)
        assert model.inference_spec.blend == (
            "gaussian" if experiment == "windowed_plus" else "constant"
        )

    test_patients = report["patients"]
    scans = tmp_path / "scans"
    scans.mkdir()
    root = Path(json.loads((run / "splits.json").read_text())["root"])
    for patient in test_patients:
        source = root / "ct_scans" / f"{patient:03d}.nii"
        (scans / source.name).symlink_to(source)
    output = tmp_path / "predicted"
    capsys.readouterr()
    assert (
        predict_main([f"ckpt={ckpt}", f"input={scans}", f"output={output}", "progress=false"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"threshold {model.inference_spec.threshold:g}" in printed
    tuned = experiment.endswith("_plus")
    expected_source = "tuned on val" if tuned else "configured"
    assert expected_source in printed

    predicted_ml = volumes(output / "volumes.csv")
    table = report["tables"]["patients"]
    report_ml = dict(zip(table["patient"], table["predicted_ml"], strict=True))
    assert sorted(report_ml) == sorted(test_patients)
    any_voxel = False
    for patient in test_patients:
        evaluated = np.asanyarray(nib.load(run / "masks" / f"{patient:03d}_ich_seg.nii.gz").dataobj)
        written = np.asanyarray(nib.load(output / f"{patient:03d}_ich_seg.nii.gz").dataobj)
        assert written.shape == evaluated.shape
        np.testing.assert_array_equal(written, evaluated, err_msg=f"patient {patient}")
        assert predicted_ml[f"{patient:03d}.nii"] == pytest.approx(report_ml[patient], abs=1e-6)
        any_voxel |= bool(written.any())
    if experiment in ("windowed_plus", "threshold"):
        assert any_voxel  # a mask with something in it was compared, not only empty ones


def test_evaluate_reproduces_the_training_report(tmp_path):
    run = train_run("windowed_plus", tmp_path)
    ckpt = best_checkpoint(run)
    stored = torch.load(ckpt, weights_only=True, map_location="cpu")["ichseg"]
    metrics = evaluate(ckpt, output_dir=tmp_path / "evaluated")
    assert "test/stitched_dice" in metrics
    original = json.loads((run / "report.json").read_text())
    again = json.loads((tmp_path / "evaluated" / "report.json").read_text())
    assert again["checkpoint"] == str(ckpt) and again["epoch"] == stored_epoch(ckpt)
    assert again == original
    assert (tmp_path / "evaluated" / "report.md").read_text() == (run / "report.md").read_text()
    assert stored["operating_point"]["source"] == "tuned on val"


def stored_epoch(ckpt: Path) -> int:
    return int(torch.load(ckpt, weights_only=True, map_location="cpu")["epoch"])


def test_train_false_tests_the_given_checkpoint_and_checks_its_input_spec(tmp_path):
    from ichseg.errors import ConfigError

    run = train_run("windowed", tmp_path)
    ckpt = best_checkpoint(run)
    overrides = [
        "experiment=windowed", *SMALL, f"paths.log_dir={tmp_path}", "train=false",
        f"ckpt_path={ckpt}",
    ]  # fmt: skip
    again = tmp_path / "again"
    train(compose_config(overrides, again))
    first = json.loads((run / "report.json").read_text())
    second = json.loads((again / "report.json").read_text())
    assert second["checkpoint"] == str(ckpt) and second["tables"] == first["tables"]
    with pytest.raises(ConfigError, match="input spec.*channels"):
        train(compose_config([*overrides, "data.channels=[brain,bone]"], tmp_path / "other"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "missing ckpt="),
        (["ckpt=/nonexistent/best.ckpt"], "checkpoint file not found"),
        (["ckpt=/nonexistent/best.ckpt", "train=true"], "set by python -m ichseg.evaluate"),
    ],
)
def test_evaluate_command_line_errors_are_one_line_and_exit_2(arguments, message, capsys):
    from ichseg.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_configs_mirror_the_inference_spec_key_for_key():
    """Every field of InferenceSpec is a key of the evaluation's and of prediction's config."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from ichseg.specs import InferenceSpec

    conf = Path(__file__).resolve().parents[1] / "conf"
    names = [f.name for f in fields(InferenceSpec)]
    evaluation = OmegaConf.load(conf / "callbacks" / "stitched_eval.yaml").stitched_eval.inference
    assert list(evaluation) == names
    assert InferenceSpec(**evaluation) == InferenceSpec()  # the yaml's values are the defaults
    prediction = OmegaConf.load(conf / "predict.yaml").inference
    assert list(prediction) == names and all(v is None for v in prediction.values())
