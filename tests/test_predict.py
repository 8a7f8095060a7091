"""Prediction: a real Lightning checkpoint applied to phantom NIfTI scans, oracle volumes, safe
checkpoint loading, and every bad input ending in one message and exit status 2."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ichseg.checkpoint import ALLOWED_NETS, CheckpointError, read_checkpoint
from ichseg.data.phantom import generate_phantom
from ichseg.errors import ConfigError, DatasetError
from ichseg.inference import Predictor
from ichseg.inference.stitch import stitch
from ichseg.io.nifti import as_hu, voxel_volume_ml
from ichseg.lit.segmentation import ICHSegmentationModule
from ichseg.models import UNet
from ichseg.predict import compose_predict_config, find_inputs, load_predictor, predict_files

ROOT = Path(__file__).resolve().parents[1]
NET = {
    "_target_": "ichseg.models.UNet",
    "in_channels": 1,
    "out_channels": 1,
    "base_filters": 4,
    "depth": 2,
    "dropout": 0.5,
    "norm": "none",
}
DATA = {"mode": "windowed", "window": 32, "stride": 16, "working_size": 64, "channels": ["brain"]}


def make_meta(**changes) -> dict:
    """A format-1 meta (``data`` and ``threshold``), for the tiny test network: version-1
    checkpoints still load."""
    meta = {
        "format": "ichseg-checkpoint",
        "version": 1,
        "net": dict(NET),
        "data": dict(DATA),
        "threshold": 0.5,
    }
    meta.update(changes)
    return meta


def save_lightning_checkpoint(path: Path, meta: dict) -> ICHSegmentationModule:
    """Fit a tiny UNet for one batch and save it with Lightning, as ichseg.train does."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in meta["net"].items() if k != "_target_"}
    module = ICHSegmentationModule(UNet(**kwargs), meta=meta)
    size = meta["data"]["window"]
    channels = meta["net"]["in_channels"]
    batch = [
        {"image": torch.rand(channels, size, size), "mask": torch.zeros(1, size, size)}
        for _ in range(2)
    ]
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(batch, batch_size=2))
    trainer.save_checkpoint(path)
    return module


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-phantom") / "ct-ich"
    return generate_phantom(root, "nifti", n_patients=2, n_slices=6, size=64, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("predict-ckpt") / "tiny.ckpt"
    save_lightning_checkpoint(path, make_meta())
    return path


def scan_paths(phantom) -> list[Path]:
    return sorted((phantom.root / "ct_scans").glob("*.nii*"))


def true_mask(phantom, scan: Path) -> np.ndarray:
    return np.asanyarray(nib.load(phantom.root / "masks" / scan.name).dataobj) > 0


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ichseg.predict", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


# --------------------------------------------------------------------------- outputs


def test_cli_writes_masks_in_the_input_space(phantom, checkpoint, tmp_path):
    from ichseg.predict import main

    output = tmp_path / "out"
    args = [f"ckpt={checkpoint}", f"input={phantom.root}", f"output={output}"]
    assert main([*args, "save_probabilities=true", "progress=false"]) == 0
    scans = scan_paths(phantom)
    expected = sorted(
        [f"{s.name.split('.')[0]}_ich_seg.nii.gz" for s in scans]
        + [f"{s.name.split('.')[0]}_prob.nii.gz" for s in scans]
        + ["predict.json", "qa", "volumes.csv"]
    )
    assert files_in(output) == expected
    rows = read_rows(output / "volumes.csv")
    assert [row["file"] for row in rows] == [str(s) for s in scans]
    for scan, row in zip(scans, rows, strict=True):
        source = nib.load(scan)
        mask_image = nib.load(output / row["mask"])
        mask = np.asanyarray(mask_image.dataobj)
        assert mask.shape == source.shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        np.testing.assert_allclose(mask_image.affine, source.affine, atol=1e-5)
        assert nib.aff2axcodes(mask_image.affine) == nib.aff2axcodes(source.affine)
        for code in ("qform_code", "sform_code"):
            assert mask_image.header[code] == source.header[code]
        assert mask_image.header.get_zooms() == source.header.get_zooms()
        assert mask_image.header.get_slope_inter() in ((None, None), (1.0, 0.0))
        stem = row["mask"].removesuffix("_ich_seg.nii.gz")
        probabilities = np.asanyarray(nib.load(output / f"{stem}_prob.nii.gz").dataobj)
        assert probabilities.dtype == np.float32 and probabilities.shape == source.shape
        assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0
        voxel_ml = float(np.prod(np.float64(source.header.get_zooms()[:3]))) / 1000.0
        assert float(row["ich_volume_ml"]) == pytest.approx(int(mask.sum()) * voxel_ml, abs=1e-4)
        assert int(row["ich_voxels"]) == int(mask.sum())
        assert int(row["ich_slices"]) == int(mask.any(axis=(0, 1)).sum())
        assert int(row["slices"]) == source.shape[2]


def test_mask_is_the_thresholded_probability_without_postprocessing(phantom, checkpoint):
    predictor = load_predictor(checkpoint, device="cpu", threshold=0.3, postprocess=False)
    scan = scan_paths(phantom)[0]
    hu = np.asanyarray(nib.load(scan).dataobj)
    probabilities, mask = predictor.predict_hu(hu)
    assert probabilities.shape == mask.shape == hu.shape
    np.testing.assert_array_equal(mask, probabilities > 0.3)


def test_checkpoint_weights_and_preprocessing_match_training(phantom, tmp_path):
    path = tmp_path / "model.ckpt"
    module = save_lightning_checkpoint(path, make_meta())
    predictor = load_predictor(path, device="cpu")
    for name, tensor in module.net.state_dict().items():
        torch.testing.assert_close(predictor.net.state_dict()[name], tensor)
    assert predictor.input_spec.tile_size == 32 and predictor.input_spec.working_size == 64

    hu = np.asanyarray(nib.load(scan_paths(phantom)[0]).dataobj)
    # the training store: uint8 brain window, scaled by 1/255 in the batch
    from ichseg.data.windowing import apply_window

    images = np.moveaxis(apply_window(hu, "brain", np.uint8), 2, 0)[:, None]
    expected = stitch(module.net.eval(), torch.from_numpy(images).float() / 255, 32, 16)
    got, _ = predictor.predict_hu(hu)
    np.testing.assert_allclose(got, np.moveaxis(expected.numpy(), 0, 2), atol=1e-6)


def test_oracle_model_gives_the_true_volume(phantom, checkpoint, tmp_path, monkeypatch):
    predictor = load_predictor(checkpoint, device="cpu", postprocess=False)
    truth = {}
    for scan in scan_paths(phantom):
        hu = np.asanyarray(nib.load(scan).dataobj)
        truth[predictor.working_slices(hu).tobytes()] = true_mask(phantom, scan)

    def oracle(slices, shape, progress=None):
        mask = truth[np.ascontiguousarray(slices).tobytes()]
        return np.moveaxis(mask, 2, 0).astype(np.float32)

    monkeypatch.setattr(predictor, "probabilities", oracle)
    scans = find_inputs(phantom.root)
    results = predict_files(predictor, scans, tmp_path / "out", progress=False)
    assert any(result.stats.ich_voxels for result in results)  # the phantom has ICH
    for scan, result in zip(scans, results, strict=True):
        mask = true_mask(phantom, scan.path)
        header = nib.load(scan.path).header
        voxel_ml = float(np.prod(np.float64(header.get_zooms()[:3]))) / 1000.0
        assert result.stats.ich_voxels == int(mask.sum())
        assert result.stats.ich_volume_ml == pytest.approx(int(mask.sum()) * voxel_ml, rel=1e-12)
        assert result.stats.ich_slices == int(mask.any(axis=(0, 1)).sum())
        assert 0 < result.stats.largest_component_ml <= result.stats.ich_volume_ml or not mask.any()
        written = np.asanyarray(nib.load(result.mask_path).dataobj)
        np.testing.assert_array_equal(written, mask.astype(np.uint8))
    rows = read_rows(tmp_path / "out" / "volumes.csv")
    assert [float(r["ich_volume_ml"]) for r in rows] == pytest.approx(
        [r.stats.ich_volume_ml for r in results], abs=1e-4
    )


def test_postprocessing_removes_specks_and_is_switchable(checkpoint, monkeypatch):
    probabilities = np.zeros((3, 640, 640), np.float32)  # the paper's scale: opening 5, closing 10
    probabilities[1, 10, 10] = 1.0  # one isolated pixel: the opening removes it
    probabilities[2, 30:50, 30:50] = 1.0  # a 20x20 square survives closing and opening
    hu = np.zeros((640, 640, 3), np.int16)
    masks = {}
    for postprocess in (True, False):
        predictor = load_predictor(checkpoint, device="cpu", postprocess=postprocess)
        monkeypatch.setattr(predictor, "probabilities", lambda s, shape, p=None: probabilities)
        masks[postprocess] = predictor.predict_hu(hu)[1]
    mask, raw = masks[True], masks[False]
    assert not mask[..., 1].any() and mask[..., 2].sum() == 400
    assert raw[10, 10, 1] and raw.sum() == 401


def test_largest_component_is_3d():
    from ichseg.predict import volume_stats

    mask = np.zeros((8, 8, 4), bool)
    mask[1:3, 1:3, 0:3] = True  # 12 voxels across three slices
    mask[6, 6, 3] = True
    stats = volume_stats(mask, voxel_volume_ml=0.5)
    assert (stats.ich_voxels, stats.ich_slices, stats.largest_component_voxels) == (13, 4, 12)
    assert stats.ich_volume_ml == 6.5 and stats.largest_component_ml == 6.0


def test_full_slice_checkpoint(phantom, tmp_path):
    path = tmp_path / "full.ckpt"
    save_lightning_checkpoint(path, make_meta(data=dict(DATA, mode="full_slice", window=64)))
    predictor = load_predictor(path, device="cpu")
    hu = np.asanyarray(nib.load(scan_paths(phantom)[0]).dataobj)
    probabilities, mask = predictor.predict_hu(hu)
    assert probabilities.shape == mask.shape == hu.shape


def test_float_scaled_input_keeps_header_codes(phantom, checkpoint, tmp_path):
    """A float-scaled scan (scl_slope 2), qform only: HU rounded, codes kept, scaling reset."""
    source = nib.load(scan_paths(phantom)[0])
    hu = np.asanyarray(source.dataobj).astype(np.float64) + 0.2
    image = nib.Nifti1Image((hu / 2).astype(np.int16), None, source.header.copy())
    image.header.set_slope_inter(2.0, 0.0)
    image.set_qform(source.affine, code=2)
    image.set_sform(None, code=0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, path)
    output = tmp_path / "out"
    predictor = load_predictor(checkpoint, device="cpu")
    (result,) = predict_files(predictor, find_inputs(path), output, progress=False)
    written = nib.load(result.mask_path)
    assert (written.header["qform_code"], written.header["sform_code"]) == (2, 0)
    np.testing.assert_allclose(written.affine, nib.load(path).affine, atol=1e-5)
    assert written.header.get_data_dtype() == np.uint8
    assert written.header.get_slope_inter() in ((None, None), (1.0, 0.0))


def test_as_hu_rounds_floats_and_rejects_nan():
    volume = np.array([[[1.4, -2.6]]])
    assert as_hu(volume).dtype == np.int16 and as_hu(volume).tolist() == [[[1, -3]]]
    with pytest.raises(DatasetError, match="NaN"):
        as_hu(np.array([[[np.nan]]]))
    with pytest.raises(DatasetError, match="3D"):
        as_hu(np.zeros((4, 4)))


def test_voxel_volume_follows_the_header_units():
    header = nib.Nifti1Header()
    header.set_data_shape((2, 2, 2))
    header.set_zooms((0.5, 0.5, 4.0))
    header.set_xyzt_units("mm")
    assert voxel_volume_ml(header) == pytest.approx(0.001)
    header.set_xyzt_units("micron")
    assert voxel_volume_ml(header) == pytest.approx(1e-12)
    header.set_zooms((0.0, 0.5, 4.0))
    assert np.isnan(voxel_volume_ml(header))


# --------------------------------------------------------------------------- inputs and options


def test_find_inputs(phantom, tmp_path):
    release = find_inputs(phantom.root)
    assert [s.name for s in release] == [f"{p.patient_id:03d}" for p in phantom.patients]
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("b.nii.gz", "a.nii", "a_ich_seg.nii.gz", "a_prob.nii.gz", "notes.txt"):
        (folder / name).write_bytes(b"")
    assert [s.name for s in find_inputs(folder)] == ["a", "b"]
    (folder / "a.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="same outputs"):
        find_inputs(folder)
    jpg = tmp_path / "jpg"
    (jpg / "Patients_CT").mkdir(parents=True)
    with pytest.raises(DatasetError, match="JPG release"):
        find_inputs(jpg)
    with pytest.raises(DatasetError, match="not a NIfTI file"):
        find_inputs(folder / "notes.txt")


def test_command_line_is_composed_by_hydra_with_a_schema():
    cfg = compose_predict_config(
        ["ckpt=m.ckpt", "input=a.nii", "output=out", "inference.threshold=0.7",
         "inference.postprocess=false"]
    )  # fmt: skip
    assert (cfg.ckpt, cfg.output, cfg.inference.threshold) == ("m.ckpt", "out", 0.7)
    assert cfg.inference.postprocess is False and cfg.inference.blend is None
    for bad, message in [
        (["input=a", "output=o"], "missing ckpt="),
        (["ckpt=m", "input=a", "output=o", "colour=red"], "Key 'colour' not in 'PredictConfig'"),
        (["ckpt=m", "input=a", "output=o", "progress=maybe"], "not a valid bool"),
        (["ckpt=m", "input=a", "output=o", "inference.threshold=abc"], "could not be converted"),
        (["ckpt=m", "input=a", "output=o", "threshold=0.6"], "now inference.threshold"),
        (["ckpt=m", "scan.nii"], "key=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            compose_predict_config(bad)


# --------------------------------------------------------------------------- checkpoints


def _save_dict(path: Path, meta: dict | None, state_dict: dict | None = None) -> Path:
    checkpoint = {}
    if meta is not None:
        checkpoint["ichseg"] = meta
    if state_dict is not None:
        checkpoint["state_dict"] = state_dict
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in NET.items() if k != "_target_"}
    return {f"net.{k}": v for k, v in UNet(**kwargs).state_dict().items()}


@pytest.mark.parametrize(
    ("meta_changes", "message"),
    [
        ({"format": "other"}, "not of format"),
        ({"version": 3}, "version 3 is not supported"),
        ({"net": dict(NET, _target_="os.system")}, "'os.system' may not be built"),
        ({"net": dict(NET, _target_="ichseg.module.ICHSegmentationModule")}, "may not be built"),
        ({"net": dict(NET, _partial_=True)}, "unsupported network option '_partial_'"),
        ({"net": dict(NET, colour="red")}, "do not fit"),
        ({"net": dict(NET, base_filters=8)}, "weights do not fit"),
        ({"net": dict(NET, in_channels=2)}, "2 input channel"),
        ({"data": dict(DATA, channels=["brain", "lung"])}, "unknown CT window"),
        ({"data": dict(DATA, mode="patches")}, "mode must be one of"),
        ({"data": dict(DATA, window=30)}, "not divisible"),
    ],
)
def test_bad_checkpoint_metadata(tmp_path, tiny_state_dict, meta_changes, message):
    path = _save_dict(tmp_path / "bad.ckpt", make_meta(**meta_changes), tiny_state_dict)
    with pytest.raises(CheckpointError, match=message):
        load_predictor(path, device="cpu")


def test_allow_list_never_imports(tmp_path, tiny_state_dict, monkeypatch):
    """An unknown target is refused by name: nothing is imported or called."""
    import importlib

    imported = []
    monkeypatch.setattr(importlib, "import_module", lambda *a, **k: imported.append(a))
    path = _save_dict(
        tmp_path / "evil.ckpt",
        make_meta(net={"_target_": "subprocess.call", "args": ["touch", "x"]}),
        tiny_state_dict,
    )
    with pytest.raises(CheckpointError, match="may not be built"):
        load_predictor(path, device="cpu")
    assert imported == [] and not (tmp_path / "x").exists()
    assert set(ALLOWED_NETS) == {
        "ichseg.models.UNet",
        "ichseg.models.unet.UNet",
        "ichseg.models.intensity_band.IntensityBand",
        "ichseg.models.threshold.IntensityBand",
    }


def test_threshold_baseline_checkpoint_predicts_its_band(tmp_path):
    """A checkpoint of experiment=threshold predicts exactly the brain-window band,
    in the scan's grid.
    """
    from ichseg.data.windowing import apply_window
    from ichseg.predict import load_predictor

    meta = make_meta(
        net={"_target_": "ichseg.models.threshold.IntensityBand", "channel": 0, "in_channels": 1},
        data={**DATA, "mode": "full_slice", "working_size": 48},
    )
    state = {"net.lower": torch.tensor(140), "net.upper": torch.tensor(230)}
    path = _save_dict(tmp_path / "band.ckpt", meta, state)
    predictor = load_predictor(path, device="cpu", postprocess=False)
    hu = np.random.default_rng(0).integers(-100, 200, size=(48, 48, 3)).astype(np.int16)
    _, mask = predictor.predict_hu(hu)
    brain = apply_window(hu, "brain", np.uint8)
    np.testing.assert_array_equal(mask.astype(bool), (brain >= 140) & (brain <= 230))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"ichseg": make_meta(), "state_dict": {}, "obj": Path("x")}, path)
    with pytest.raises(CheckpointError, match="safe"):
        read_checkpoint(path)


def test_missing_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="no state_dict"):
        read_checkpoint(_save_dict(tmp_path / "c.ckpt", make_meta()))


def test_gaussian_blending(phantom, checkpoint):
    hu = np.asanyarray(nib.load(scan_paths(phantom)[0]).dataobj)
    constant = load_predictor(checkpoint, device="cpu").predict_hu(hu)[0]
    gaussian = load_predictor(checkpoint, device="cpu", blend="gaussian").predict_hu(hu)[0]
    assert gaussian.shape == constant.shape and not np.allclose(gaussian, constant)
    with pytest.raises(ConfigError, match="blend"):
        load_predictor(checkpoint, device="cpu", blend="median")


def test_predictor_device_checks(checkpoint):
    with pytest.raises(ConfigError, match="device"):
        load_predictor(checkpoint, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            load_predictor(checkpoint, device="cuda")
    assert isinstance(load_predictor(checkpoint, device="auto"), Predictor)


# --------------------------------------------------------------------------- bad inputs: exit 2


def _bad_case(name: str, tmp_path: Path, phantom, checkpoint) -> tuple[list[str], str]:
    """(arguments, expected message) of one bad input; the output folder is tmp_path/out."""
    good_scan = scan_paths(phantom)[0]
    output = tmp_path / "out"
    if name == "missing input":
        return [f"ckpt={checkpoint}", f"input={tmp_path / 'nope.nii.gz'}", f"output={output}"], (
            "input not found"
        )
    if name == "2D image":
        flat = tmp_path / "flat.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), flat)
        return [f"ckpt={checkpoint}", f"input={flat}", f"output={output}"], "expected a 3D volume"
    if name == "torch file without meta":
        ckpt = _save_dict(tmp_path / "plain.ckpt", None, {"net.w": torch.zeros(1)})
        return [f"ckpt={ckpt}", f"input={good_scan}", f"output={output}"], "no 'ichseg' metadata"
    if name == "random bytes":
        ckpt = tmp_path / "random.ckpt"
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
        return [
            f"ckpt={ckpt}",
            f"input={good_scan}",
            f"output={output}",
        ], "not a PyTorch checkpoint"
    if name == "unwritable output":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        output = blocker / "out"
        return [f"ckpt={checkpoint}", f"input={good_scan}", f"output={output}"], (
            "cannot create the output folder"
        )
    if name == "net target not allowed":
        ckpt = _save_dict(
            tmp_path / "evil.ckpt",
            make_meta(net=dict(NET, _target_="os.system")),
            {"net.w": torch.zeros(1)},
        )
        return [f"ckpt={ckpt}", f"input={good_scan}", f"output={output}"], "may not be built"
    if name == "unknown option":
        return [f"ckpt={checkpoint}", f"input={good_scan}", f"output={output}", "colour=red"], (
            "not in 'PredictConfig'"
        )
    if name == "missing key":
        return [f"input={good_scan}", f"output={output}"], "missing ckpt="
    raise AssertionError(name)


BAD_CASES = [  # the last two are usage errors
    "missing input",
    "2D image",
    "torch file without meta",
    "random bytes",
    "unwritable output",
    "net target not allowed",
    "unknown option",
    "missing key",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_in_process(case, tmp_path, phantom, checkpoint, capsys):
    from ichseg.predict import main

    args, message = _bad_case(case, tmp_path, phantom, checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "progress=false"] if "missing key" not in case else args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize("case", BAD_CASES[:-2])
def test_bad_input_exits_2_through_the_module(case, tmp_path, phantom, checkpoint):
    args, message = _bad_case(case, tmp_path, phantom, checkpoint)
    process = run_module(*args)
    assert process.returncode == 2, process.stderr
    err = process.stderr.strip()
    assert err.startswith("python -m ichseg.predict: error:") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert files_in(tmp_path / "out") == []


def test_help(capsys):
    from ichseg.predict import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "ckpt=PATH input=PATH output=DIR" in out and "inference.tile_batch_size" in out


def test_one_bad_scan_among_good_ones(phantom, checkpoint, tmp_path, capsys):
    """A scan with NaN fails alone: the good one is written, nothing half-written, exit 2."""
    from ichseg.predict import main

    folder = tmp_path / "scans"
    folder.mkdir()
    good = scan_paths(phantom)[0]
    (folder / good.name).write_bytes(good.read_bytes())
    source = nib.load(good)
    data = np.asanyarray(source.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, source.affine), folder / "zz_nan.nii.gz")
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([f"ckpt={checkpoint}", f"input={folder}", f"output={output}", "progress=false"])
    assert exit_info.value.code == 2
    assert "NaN" in capsys.readouterr().err
    stem = good.name.split(".")[0]
    assert files_in(output) == [f"{stem}_ich_seg.nii.gz", "predict.json", "qa", "volumes.csv"]
    assert [row["mask"] for row in read_rows(output / "volumes.csv")] == [f"{stem}_ich_seg.nii.gz"]


def test_failed_write_leaves_nothing(phantom, checkpoint, tmp_path, monkeypatch):
    def broken_write(self, filename):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", broken_write)
    predictor = load_predictor(checkpoint, device="cpu")
    output = tmp_path / "out"
    with pytest.raises(DatasetError, match="No space left"):
        predict_files(predictor, find_inputs(scan_paths(phantom)[0]), output, progress=False)
    assert files_in(output) == []


# --------------------------------------------------------------------------- 2.5D checkpoints


def test_context_checkpoint_predicts_like_one_pass_over_the_stacked_volume(phantom, tmp_path):
    """3 CT windows x slices s-1..s+1 = 9 channels; chunks of one slice need their neighbours."""
    channels = ["brain", "subdural", "bone"]
    meta = make_meta(
        net=dict(NET, in_channels=9), data=dict(DATA, channels=channels, context_slices=1)
    )
    path = tmp_path / "context.ckpt"
    module = save_lightning_checkpoint(path, meta)
    predictor = load_predictor(path, device="cpu", tile_batch_size=2)  # one slice per chunk
    assert predictor.input_spec.context_slices == 1 and predictor.input_spec.in_channels == 9

    from ichseg.data.windowing import stack_windows

    hu = np.asanyarray(nib.load(scan_paths(phantom)[0]).dataobj)
    slices = np.moveaxis(stack_windows(np.moveaxis(hu, 2, 0), channels, np.uint8), 0, 1)
    n = slices.shape[0]
    neighbours = np.clip(np.arange(n)[:, None] + np.arange(-1, 2), 0, n - 1)
    stacked = slices[neighbours].reshape(n, 9, 64, 64)  # the naive 2.5D volume
    expected = stitch(module.net.eval(), torch.from_numpy(stacked).float() / 255, 32, 16)
    got, _ = predictor.predict_hu(hu)
    np.testing.assert_allclose(got, np.moveaxis(expected.numpy(), 0, 2), atol=1e-6)


def test_context_checkpoint_with_the_wrong_channel_count(tmp_path, tiny_state_dict):
    meta = make_meta(data=dict(DATA, context_slices=1))  # 1 window x 3 slices, but a 1-channel net
    path = _save_dict(tmp_path / "c.ckpt", meta, tiny_state_dict)
    with pytest.raises(CheckpointError, match=r"1 input channel.*context_slices=1"):
        load_predictor(path, device="cpu")
    bad_meta = make_meta(data=dict(DATA, context_slices=-1))
    bad = _save_dict(tmp_path / "d.ckpt", bad_meta, tiny_state_dict)
    with pytest.raises(CheckpointError, match="context_slices"):
        load_predictor(bad, device="cpu")
