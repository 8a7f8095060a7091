"""Fold ensembles in ichseg.predict: averaged probabilities, the spread across members as an
uncertainty map, member volume intervals, checkpoint folders, and predict.json provenance."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import files_in, make_meta, read_rows, save_lightning_checkpoint, scan_paths

from ichseg.data.phantom import generate_phantom
from ichseg.errors import ConfigError
from ichseg.inference import Predictor
from ichseg.inference.ensemble import Ensemble, combined_spec
from ichseg.inference.scans import (
    find_inputs,
    load_predictor,
    predict_files,
    resolve_checkpoints,
)
from ichseg.predict import main
from ichseg.specs import InferenceSpec


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble-phantom") / "ct-ich"
    return generate_phantom(root, "nifti", n_patients=2, n_slices=6, size=64, seed=1)


def perturbed(source: Path, target: Path, seed: int, threshold: float | None = None) -> Path:
    """A copy of a checkpoint with other weights (and, optionally, another stored threshold)."""
    checkpoint = torch.load(source, weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in checkpoint["state_dict"].items():
        if tensor.is_floating_point():
            scale = 0.3 * (tensor.abs().mean() + 1e-3)
            noise = torch.randn(tensor.shape, generator=generator) * scale
            checkpoint["state_dict"][name] = tensor + noise
    if threshold is not None:
        checkpoint["ichseg"]["threshold"] = threshold
    torch.save(checkpoint, target)
    return target


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("ensemble-ckpts")
    first = folder / "a.ckpt"
    save_lightning_checkpoint(first, make_meta(threshold=0.4))
    return [
        first,
        perturbed(first, folder / "b.ckpt", 1, threshold=0.5),
        perturbed(first, folder / "c.ckpt", 2, threshold=0.6),
    ]


def probabilities(predictor, scan: Path) -> np.ndarray:
    hu = np.asanyarray(nib.load(scan).dataobj)
    return predictor.predict_hu(hu)[0]


def test_the_ensemble_averages_its_members_and_keeps_their_spread(phantom, members, tmp_path):
    scan = scan_paths(phantom)[0]
    predictors = [load_predictor(path, device="cpu") for path in members]
    each = np.stack([probabilities(p, scan) for p in predictors])
    assert np.abs(each[0] - each[1]).max() > 1e-3  # the members really differ
    ensemble = Ensemble(predictors)
    assert ensemble.inference_spec.threshold == 0.5  # the median of 0.4, 0.5, 0.6
    output = tmp_path / "out"
    (result,) = predict_files(
        ensemble, find_inputs(scan), output, save_probabilities=True, progress=False
    )
    mean = np.asanyarray(nib.load(result.probability_path).dataobj)
    np.testing.assert_allclose(mean, each.mean(axis=0), atol=1e-6)
    spread = np.asanyarray(nib.load(result.uncertainty_path).dataobj)
    np.testing.assert_allclose(spread, each.std(axis=0), atol=1e-5)
    mask = np.asanyarray(nib.load(result.mask_path).dataobj)
    judge = Predictor(predictors[0].net, predictors[0].input_spec, ensemble.inference_spec)
    expected = np.moveaxis(judge.mask(np.moveaxis(mean, 2, 0)), 0, 2)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(mask > 0, expected)
    # every member's own volume, as each alone would predict it
    alone = []
    for i, predictor in enumerate(predictors):
        (single,) = predict_files(predictor, find_inputs(scan), tmp_path / f"m{i}", progress=False)
        assert single.uncertainty_path is None and single.interval_ml is None
        alone.append(single.stats.ich_volume_ml)
    assert result.member_volumes_ml == pytest.approx(alone)
    row = read_rows(output / "volumes.csv")[0]
    assert row["members"] == "3"
    assert float(row["member_min_ml"]) == pytest.approx(min(alone), abs=1e-5)
    assert float(row["member_max_ml"]) == pytest.approx(max(alone), abs=1e-5)


def test_the_ensemble_mask_is_its_operating_point_on_the_mean(phantom, members):
    scan = scan_paths(phantom)[0]
    predictors = [load_predictor(path, device="cpu", postprocess=False) for path in members]
    hu = np.asanyarray(nib.load(scan).dataobj)
    prediction = Ensemble(predictors).predict_hu(hu)
    np.testing.assert_array_equal(prediction.mask, prediction.probabilities > 0.5)


def test_flip_averages_each_member_over_the_mirrored_scan(phantom, members):
    scan = scan_paths(phantom)[0]
    predictor = load_predictor(members[0], device="cpu")
    hu = np.asanyarray(nib.load(scan).dataobj)
    plain = probabilities(predictor, scan)
    mirrored = predictor.predict_hu(np.ascontiguousarray(hu[::-1]))[0][::-1]
    prediction = Ensemble([predictor], flip=True).predict_hu(hu)
    np.testing.assert_allclose(prediction.probabilities, (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(prediction.spread, np.abs(plain - mirrored) / 2, atol=1e-5)
    assert Ensemble([predictor]).single and not Ensemble([predictor], flip=True).single


def test_members_must_be_applied_alike(members, tmp_path):
    other = tmp_path / "other.ckpt"
    data = {"mode": "windowed", "window": 32, "stride": 32, "working_size": 64}
    save_lightning_checkpoint(other, make_meta(data=data))
    predictors = [load_predictor(p, device="cpu") for p in (members[0], other)]
    with pytest.raises(ConfigError, match=r"other.ckpt: its input spec differs .*tile_stride"):
        Ensemble(predictors, names=[str(members[0]), str(other)])
    specs = [InferenceSpec(), InferenceSpec(blend="gaussian")]
    with pytest.raises(ConfigError, match="b: its inference spec differs from a's .blend"):
        combined_spec(specs, ["a", "b"])
    combined = combined_spec(
        [InferenceSpec(threshold=0.3, postprocess=False), InferenceSpec(threshold=0.7)], ["a", "b"]
    )
    assert combined.threshold == pytest.approx(0.5) and combined.postprocess


def fake_multirun(members: list[Path], root: Path) -> Path:
    """A multirun folder: one run folder per fold, each with checkpoints/ (a best and a last)."""
    for fold, member in enumerate(members):
        checkpoints = root / str(fold) / "checkpoints"
        checkpoints.mkdir(parents=True)
        shutil.copy(member, checkpoints / "best-epoch001-jaccard0.5000.ckpt")
        shutil.copy(member, checkpoints / "last.ckpt")
    return root


def test_a_multirun_folder_gives_each_runs_tested_checkpoint(members, tmp_path):
    root = fake_multirun(members, tmp_path / "multirun")
    found = resolve_checkpoints(str(root))
    assert [p.parent.parent.name for p in found] == ["0", "1", "2"]
    assert all(p.name.startswith("best-") for p in found)
    # a report naming the tested checkpoint wins over the glob
    named = root / "1" / "checkpoints" / "best-epoch007-jaccard0.6000.ckpt"
    shutil.copy(members[1], named)
    (root / "1" / "test").mkdir()
    report = {"settings": {"operating_point_file": str(named)}}
    (root / "1" / "test" / "report.json").write_text(json.dumps(report))
    assert resolve_checkpoints(str(root))[1] == named
    shutil.copy(members[2], root / "2" / "checkpoints" / "best-epoch009-jaccard0.7000.ckpt")
    with pytest.raises(ConfigError, match="2: 2 best checkpoints and no report naming"):
        resolve_checkpoints(str(root))
    with pytest.raises(ConfigError, match="no training run with a checkpoints/best"):
        resolve_checkpoints(str(tmp_path / "multirun" / "0" / "checkpoints"))
    with pytest.raises(ConfigError, match="missing.ckpt: checkpoint not found"):
        resolve_checkpoints([str(members[0]), str(tmp_path / "missing.ckpt")])
    with pytest.raises(ConfigError, match="named twice"):
        resolve_checkpoints([str(members[0]), str(members[0])])


def test_cli_ensemble_writes_uncertainty_intervals_and_provenance(
    phantom, members, tmp_path, capsys
):
    root = fake_multirun(members, tmp_path / "multirun")
    output = tmp_path / "out"
    scan = scan_paths(phantom)[0]
    assert main([f"ckpt={root}", f"input={scan}", f"output={output}", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 3 models: median of their thresholds (0.4, 0.5, 0.6)" in out
    assert " [models " in out and "mL]" in out
    stem = scan.name.split(".")[0]
    assert files_in(output) == [
        f"{stem}_ich_seg.nii.gz", f"{stem}_uncertainty.nii.gz", "predict.json", "qa", "volumes.csv"
    ]  # fmt: skip
    provenance = json.loads((output / "predict.json").read_text())
    assert provenance["format"] == "ichseg-predict"
    assert provenance["ichseg_version"]
    assert provenance["ensemble"]["members"] == 3 and provenance["ensemble"]["flip"] is False
    for entry in provenance["checkpoints"]:
        digest = hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()
        assert entry["sha256"] == digest
    assert provenance["options"]["ckpt"] == str(root)
    assert provenance["options"]["inference"]["threshold"] is None
    assert provenance["inference"]["threshold"] == 0.5
    assert provenance["operating_point"].startswith("operating point: threshold 0.5")
    (scanned,) = provenance["scans"]
    assert scanned["mask"] == f"{stem}_ich_seg.nii.gz" and len(scanned["member_volumes_ml"]) == 3
    # a list of checkpoints works the same, with the command line's threshold
    again = tmp_path / "again"
    listed = "ckpt=[" + ",".join(str(p) for p in members[:2]) + "]"
    assert main([listed, f"input={scan}", f"output={again}", "inference.threshold=0.7"]) == 0
    assert json.loads((again / "predict.json").read_text())["inference"]["threshold"] == 0.7


def test_a_foreign_predict_json_is_not_replaced(phantom, members, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "predict.json").write_text('{"mine": 1}\n')
    scan = scan_paths(phantom)[0]
    with pytest.raises(SystemExit) as info:
        main([f"ckpt={members[0]}", f"input={scan}", f"output={output}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "predict.json: exists and was not written by ichseg.predict" in err
    assert (output / "predict.json").read_text() == '{"mine": 1}\n'
    assert files_in(output) == ["predict.json"]
