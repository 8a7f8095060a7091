"""Bad input to every command: one sentence naming the file or option, exit status 2, no traceback,
nothing written or changed.

One parametrised matrix per command (``ichseg.data.check``, ``ichseg.data.phantom``,
``ichseg.report``, ``ichseg.predict``, ``ichseg.train``). Each case builds its bad input under
``tmp_path``, runs the command in-process and :func:`assert_refused` checks the outcome: the exit
status, the one line (on stderr; for the dataset check, whose report lists problems on stdout, the
problem line), the file or option named in it, no traceback, and a byte-for-byte unchanged
``tmp_path`` apart from what the case allows.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import NET, _save_dict, make_meta, save_lightning_checkpoint, scan_paths
from test_report import fake_multirun, write_fold

from ichseg.data.phantom import PhantomManifest, generate_phantom

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: A builder makes the bad input under tmp_path and returns the arguments and the text the one line
#: must contain (a list: every item must be in it).
Builder = Callable[..., tuple[list[str], list[str]]]


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its size, mtime and mode: what "nothing changed" compares."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        found[str(path.relative_to(root))] = (
            info.st_size if path.is_file() else -1,
            info.st_mtime_ns if path.is_file() else 0,
            info.st_mode,
        )
    return found


def run_in_process(main: Callable[..., int], argv: list[str]) -> int:
    """The exit status of ``main(argv)``: its return value, or the code of its SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return 0 if code is None else int(code)


def assert_refused(
    main: Callable[..., int],
    argv: list[str],
    expected: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    prog: str,
    on_stdout: bool = False,
) -> str:
    """Run ``main(argv)``; assert exit 2, one line ``[python -m ]<prog>: error: ...`` naming what is
    wrong, no traceback, and ``tmp_path`` unchanged. Returns the line."""
    before = snapshot(tmp_path)
    code = run_in_process(main, argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit status {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err, err
    if on_stdout:  # the dataset check's report: one problem line names the file and the problem
        lines = [line for line in out.splitlines() if all(text in line for text in expected)]
        assert len(lines) == 1, f"no single line with {expected} in:\n{out}"
        line = lines[0]
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
        line = lines[0]
        assert ": error: " in line and line.split(": error: ")[0].endswith(prog), line
        for text in expected:
            assert text in line, f"{text!r} not in {line!r}"
    assert snapshot(tmp_path) == before, "the command wrote or changed files"
    return line


# --------------------------------------------------------------------------- ichseg.data.check


def _nifti(path: Path, data: np.ndarray, zooms=(0.5, 0.5, 5.0)) -> None:
    image = nib.Nifti1Image(data, np.diag([*zooms, *(1.0,) * (4 - len(zooms))]))
    image.header.set_zooms(zooms)
    nib.save(image, path)


def _set_raw_pixdim(path: Path, values: tuple[float, float, float]) -> None:
    """Write pixdim[1:4] into the raw header of an uncompressed .nii (bytes 80-91), as a broken
    converter would; nibabel's loaders would otherwise repair it on save."""
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.asarray(values, dtype="<f4").tobytes()
    path.write_bytes(bytes(raw))


def _scan(root: Path, number: int = 50) -> Path:
    return root / "ct_scans" / f"{number:03d}.nii"


def check_missing_root(tmp, root):
    return [str(tmp / "nope")], ["nope", "does not exist"]


def check_root_is_a_file(tmp, root):
    (tmp / "file.txt").write_text("x")
    return [str(tmp / "file.txt")], ["file.txt", "not a folder"]


def check_empty_root(tmp, root):
    (tmp / "empty").mkdir()
    return [str(tmp / "empty")], ["empty", "is empty"]


def check_not_a_release(tmp, root):
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("x")
    return [str(tmp / "other")], ["other", "not a CT-ICH release"]


def check_no_arguments(tmp, root):
    return [], ["required", "root"]


def check_unknown_option(tmp, root):
    return [str(root), "--colour"], ["unrecognized arguments", "--colour"]


def check_truncated_scan(tmp, root):
    path = _scan(root)
    path.write_bytes(path.read_bytes()[:5000])
    return [str(root)], ["050.nii"]


def check_scan_is_text(tmp, root):
    _scan(root).write_text("not a nifti file")
    return [str(root)], ["050.nii"]


def check_nan_in_scan(tmp, root):
    image = nib.load(_scan(root, 51))
    data = np.asarray(image.dataobj).astype(np.float32)
    data[3, 3, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), _scan(root, 51))
    return [str(root)], ["051.nii", "NaN"]


def check_mask_shape_differs(tmp, root):
    mask = root / "masks" / "052.nii"
    shape = nib.load(mask).shape
    _nifti(mask, np.zeros((shape[0] - 1, shape[1], shape[2]), np.uint8))
    return [str(root)], ["052.nii", "shape"]


def check_scan_without_mask(tmp, root):
    (root / "masks" / "053.nii").unlink()
    return [str(root)], ["053.nii", "no mask"]


def check_mask_without_scan(tmp, root):
    _scan(root, 54).unlink()
    return [str(root)], ["054.nii", "no scan"]


def check_label_csv_missing(tmp, root):
    (root / "hemorrhage_diagnosis_raw_ct.csv").unlink()
    return [str(root)], ["hemorrhage_diagnosis_raw_ct.csv", "missing"]


def check_label_csv_empty(tmp, root):
    (root / "hemorrhage_diagnosis_raw_ct.csv").write_text("")
    return [str(root)], ["hemorrhage_diagnosis_raw_ct.csv", "empty"]


def check_label_csv_column_missing(tmp, root):
    path = root / "hemorrhage_diagnosis_raw_ct.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name.strip() != "No_Hemorrhage"]
    rows = [",".join(line.split(",")[i] for i in keep) for line in lines]
    path.write_text("\n".join(rows) + "\n")
    return [str(root)], ["hemorrhage_diagnosis_raw_ct.csv", "No_Hemorrhage"]


def check_zero_voxel_size(tmp, root):
    _set_raw_pixdim(_scan(root, 55), (0.0, 0.0, 0.0))
    return [str(root)], ["055.nii", "voxel size"]


def check_negative_voxel_size(tmp, root):
    _set_raw_pixdim(_scan(root, 56), (-0.5, 0.5, 5.0))
    return [str(root)], ["056.nii", "voxel size"]


def check_infinite_voxel_size(tmp, root):
    _set_raw_pixdim(_scan(root, 57), (0.5, np.inf, 5.0))
    return [str(root)], ["057.nii", "voxel size"]


def check_two_dimensional_scan(tmp, root):
    _nifti(_scan(root, 58), np.zeros((96, 96), np.int16), zooms=(0.5, 0.5))
    return [str(root)], ["058.nii"]


#: Usage errors: one error line; in the other cases the report lists the problem (the root's too).
CHECK_ERRORS = {"no_arguments", "unknown_option"}
CHECK_CASES: dict[str, Builder] = {
    name.removeprefix("check_"): builder
    for name, builder in dict(globals()).items()
    if name.startswith("check_") and callable(builder)
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_check(case, nifti_phantom: PhantomManifest, tmp_path, capsys):
    from ichseg.cli.check import main

    root = Path(shutil.copytree(nifti_phantom.root, tmp_path / "ct-ich"))
    argv, expected = CHECK_CASES[case](tmp_path, root)
    argv = [*argv, "--no-progress"] if argv else argv
    problem_in_report = case not in CHECK_ERRORS
    assert_refused(main, argv, expected, tmp_path, capsys, "ichseg.data.check", problem_in_report)


# --------------------------------------------------------------------------- ichseg.data.phantom


def _tiny_phantom(out: Path) -> Path:
    generate_phantom(out, "nifti", n_patients=2, n_slices=3, size=64, seed=0, progress=False)
    return out


def phantom_no_arguments(tmp):
    return [], ["required", "OUT"]


def phantom_unknown_option(tmp):
    return [str(tmp / "out"), "--colour", "red"], ["unrecognized arguments", "--colour"]


def phantom_zero_patients(tmp):
    return [str(tmp / "out"), "--patients", "0"], ["--patients", "'0'"]


def phantom_patients_not_a_number(tmp):
    return [str(tmp / "out"), "--patients", "many"], ["--patients", "'many'"]


def phantom_slices_reversed(tmp):
    return [str(tmp / "out"), "--slices", "40-30"], ["--slices", "40-30"]


def phantom_slices_not_a_number(tmp):
    return [str(tmp / "out"), "--slices", "abc"], ["--slices", "abc"]


def phantom_zero_size(tmp):
    return [str(tmp / "out"), "--size", "0"], ["--size", "'0'"]


def phantom_unknown_release(tmp):
    return [str(tmp / "out"), "--release", "dicom"], ["--release", "dicom"]


def phantom_seed_not_a_number(tmp):
    return [str(tmp / "out"), "--seed", "x"], ["--seed", "'x'"]


def phantom_out_holds_user_files(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("years of work")
    return [str(tmp / "out")], [str(tmp / "out")]


def phantom_out_is_a_file(tmp):
    (tmp / "out").write_text("x")
    return [str(tmp / "out")], [str(tmp / "out")]


def phantom_overwrite_a_user_folder(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("years of work")
    return [str(tmp / "out"), "--overwrite"], [str(tmp / "out")]


def phantom_overwrite_with_user_scans_inside(tmp):
    out = _tiny_phantom(tmp / "out")
    (out / "ct_scans" / "my_scan.nii.gz").write_bytes(b"a user's own scan")
    return [str(out), "--overwrite"], ["my_scan.nii.gz"]


def phantom_overwrite_with_user_masks_inside(tmp):
    out = _tiny_phantom(tmp / "out")
    (out / "masks" / "notes.txt").write_text("mine")
    return [str(out), "--overwrite"], ["notes.txt"]


def phantom_unwritable_parent(tmp):
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return [str(locked / "out")], [str(locked)]


PHANTOM_CASES: dict[str, Builder] = {
    name.removeprefix("phantom_"): builder
    for name, builder in dict(globals()).items()
    if name.startswith("phantom_") and callable(builder)
}


@pytest.mark.parametrize("case", sorted(PHANTOM_CASES))
def test_phantom(case, tmp_path, capsys):
    from ichseg.cli.phantom import main

    if case == "unwritable_parent" and IS_ROOT:
        pytest.skip("permissions do not bind root")
    argv, expected = PHANTOM_CASES[case](tmp_path)
    argv = [*argv, "--no-progress"] if argv else argv
    try:
        assert_refused(main, argv, expected, tmp_path, capsys, "ichseg.data.phantom")
    finally:
        for path in tmp_path.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)


# --------------------------------------------------------------------------- ichseg.report


def report_no_arguments(tmp):
    return [], ["required", "PATH"]


def report_missing_folder(tmp):
    return [str(tmp / "missing")], ["missing", "no such file"]


def report_empty_folder(tmp):
    (tmp / "empty").mkdir()
    return [str(tmp / "empty")], [str(tmp / "empty")]


def report_json_is_not_json(tmp):
    root = fake_multirun(tmp / "runs")
    (root / "2" / "report.json").write_text("{not json")
    return [str(root)], [str(root / "2" / "report.json")]


def report_json_has_another_schema(tmp):
    root = fake_multirun(tmp / "runs")
    (root / "2" / "report.json").write_text('{"accuracy": 0.9}')
    return [str(root)], [str(root / "2" / "report.json")]


def report_json_is_a_list(tmp):
    root = fake_multirun(tmp / "runs")
    (root / "1" / "report.json").write_text("[1, 2, 3]")
    return [str(root)], [str(root / "1" / "report.json")]


def report_counts_unreadable(tmp):
    root = fake_multirun(tmp / "runs")
    (root / "2" / "counts.npz").write_bytes(b"not an npz file")
    return [str(root)], [str(root / "2" / "counts.npz"), "cannot read"]


def report_counts_missing(tmp):
    root = fake_multirun(tmp / "runs")
    (root / "0" / "counts.npz").unlink()
    return [str(root)], [str(root / "0")]


def report_patient_tested_twice(tmp):
    root = fake_multirun(tmp / "runs")
    shutil.copytree(root / "1", root / "3")
    return [str(root)], ["patient 51", str(root / "1"), str(root / "3")]


def report_folds_with_different_settings(tmp):
    write_fold(tmp / "runs" / "0", [49, 50], fold=0, k=2)
    write_fold(tmp / "runs" / "1", [51, 52], fold=1, k=2, min_area=400.0)
    return [str(tmp / "runs")], ["min_area"]


def report_out_is_a_file(tmp):
    root = fake_multirun(tmp / "runs")
    (tmp / "blocker").write_text("x")
    return [str(root), "--out", str(tmp / "blocker")], [str(tmp / "blocker")]


def report_unknown_option(tmp):
    return [str(tmp), "--format", "pdf"], ["unrecognized arguments", "--format"]


REPORT_CASES: dict[str, Builder] = {
    name.removeprefix("report_"): builder
    for name, builder in dict(globals()).items()
    if name.startswith("report_") and callable(builder)
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report(case, tmp_path, capsys):
    from ichseg.cli.report import main

    argv, expected = REPORT_CASES[case](tmp_path)
    assert_refused(main, argv, expected, tmp_path, capsys, "ichseg.report")


# --------------------------------------------------------------------------- ichseg.predict


@pytest.fixture(scope="module")
def predict_phantom(tmp_path_factory) -> PhantomManifest:
    root = tmp_path_factory.mktemp("bad-predict-phantom") / "ct-ich"
    return generate_phantom(root, "nifti", n_patients=2, n_slices=4, size=64, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad-predict-ckpt") / "tiny.ckpt"
    save_lightning_checkpoint(path, make_meta())
    return path


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _scan_copy(tmp: Path, phantom: PhantomManifest) -> Path:
    return Path(shutil.copy(scan_paths(phantom)[0], tmp / "scan.nii"))


def predict_missing_input(tmp, ctx):
    return ctx.args(input=tmp / "nope.nii.gz"), ["nope.nii.gz", "input not found"]


def predict_two_dimensional_scan(tmp, ctx):
    _nifti(tmp / "flat.nii", np.zeros((8, 8), np.int16), zooms=(1.0, 1.0))
    return ctx.args(input=tmp / "flat.nii"), ["flat.nii", "3D"]


def predict_scan_is_text(tmp, ctx):
    (tmp / "scan.nii.gz").write_text("not a scan")
    return ctx.args(input=tmp / "scan.nii.gz"), ["scan.nii.gz"]


def predict_truncated_scan(tmp, ctx):
    path = _scan_copy(tmp, ctx.phantom)
    path.write_bytes(path.read_bytes()[:2000])
    return ctx.args(input=path), ["scan.nii"]


def predict_zero_voxel_size(tmp, ctx):
    path = _scan_copy(tmp, ctx.phantom)
    _set_raw_pixdim(path, (0.0, 0.0, 0.0))
    return ctx.args(input=path), ["scan.nii", "voxel size"]


def predict_negative_voxel_size(tmp, ctx):
    path = _scan_copy(tmp, ctx.phantom)
    _set_raw_pixdim(path, (0.5, -0.5, 5.0))
    return ctx.args(input=path), ["scan.nii", "voxel size"]


def predict_folder_without_scans(tmp, ctx):
    (tmp / "scans").mkdir()
    (tmp / "scans" / "notes.txt").write_text("x")
    return ctx.args(input=tmp / "scans"), [str(tmp / "scans")]


def predict_folder_of_unreadable_scans(tmp, ctx):
    (tmp / "scans").mkdir()
    (tmp / "scans" / "a.nii.gz").write_bytes(b"\x1f\x8b broken gzip")
    (tmp / "scans" / "notes.txt").write_text("x")
    return ctx.args(input=tmp / "scans"), ["a.nii.gz"]


def predict_missing_checkpoint(tmp, ctx):
    return ctx.args(ckpt=tmp / "nope.ckpt"), ["nope.ckpt"]


def predict_checkpoint_is_a_folder(tmp, ctx):
    (tmp / "ckpts").mkdir()
    return ctx.args(ckpt=tmp / "ckpts"), ["ckpts"]


def predict_checkpoint_of_random_bytes(tmp, ctx):
    (tmp / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    return ctx.args(ckpt=tmp / "random.ckpt"), ["random.ckpt", "not a PyTorch checkpoint"]


def predict_checkpoint_with_a_malicious_pickle(tmp, ctx):
    (tmp / "evil.ckpt").write_bytes(pickle.dumps({"ichseg": _Payload()}))
    return ctx.args(ckpt=tmp / "evil.ckpt"), ["evil.ckpt"]


def predict_checkpoint_with_a_malicious_torch_pickle(tmp, ctx):
    torch.save({"ichseg": make_meta(), "state_dict": {}, "payload": _Payload()}, tmp / "evil.ckpt")
    return ctx.args(ckpt=tmp / "evil.ckpt"), ["evil.ckpt"]


def predict_checkpoint_without_metadata(tmp, ctx):
    ckpt = _save_dict(tmp / "plain.ckpt", None, {"net.w": torch.zeros(1)})
    return ctx.args(ckpt=ckpt), ["plain.ckpt", "no 'ichseg' metadata"]


def predict_checkpoint_building_a_forbidden_class(tmp, ctx):
    meta = make_meta(net=dict(NET, _target_="os.system"))
    ckpt = _save_dict(tmp / "evil.ckpt", meta, {"net.w": torch.zeros(1)})
    return ctx.args(ckpt=ckpt), ["evil.ckpt", "may not be built"]


def predict_checkpoint_without_state_dict(tmp, ctx):
    ckpt = _save_dict(tmp / "empty.ckpt", make_meta())
    return ctx.args(ckpt=ckpt), ["empty.ckpt", "no state_dict"]


def predict_checkpoint_with_nan_weights(tmp, ctx):
    state = torch.load(ctx.checkpoint, weights_only=True)
    state["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                           for k, v in state["state_dict"].items()}  # fmt: skip
    torch.save(state, tmp / "nan.ckpt")
    return ctx.args(ckpt=tmp / "nan.ckpt"), ["nan.ckpt", "finite"]


def predict_output_is_a_file(tmp, ctx):
    (tmp / "blocker").write_text("x")
    return ctx.args(output=tmp / "blocker" / "out"), ["cannot create the output folder"]


def predict_unknown_option(tmp, ctx):
    return [*ctx.args(), "colour=red"], ["colour"]


def predict_unknown_inference_field(tmp, ctx):
    return [*ctx.args(), "inference.thresold=0.5"], ["thresold"]


def predict_option_of_an_earlier_release(tmp, ctx):
    return [*ctx.args(), "threshold=0.6"], ["threshold", "inference.threshold"]


def predict_threshold_not_a_number(tmp, ctx):
    return [*ctx.args(), "inference.threshold=high"], ["inference.threshold", "high"]


def predict_threshold_out_of_range(tmp, ctx):
    return [*ctx.args(), "inference.threshold=1.5"], ["threshold", "1.5"]


def predict_unknown_blend(tmp, ctx):
    return [*ctx.args(), "inference.blend=triangle"], ["blend", "triangle"]


def predict_zero_tile_batch(tmp, ctx):
    return [*ctx.args(), "inference.tile_batch_size=0"], ["tile_batch_size"]


def predict_unknown_device(tmp, ctx):
    return [*ctx.args(), "device=tpu"], ["device", "tpu"]


def predict_save_probabilities_not_a_bool(tmp, ctx):
    return [*ctx.args(), "save_probabilities=maybe"], ["save_probabilities", "maybe"]


def predict_missing_checkpoint_option(tmp, ctx):
    return [a for a in ctx.args() if not a.startswith("ckpt=")], ["missing ckpt="]


def predict_argument_without_a_value(tmp, ctx):
    return [*ctx.args(), "scan.nii"], ["key=value", "scan.nii"]


def predict_empty_output_option(tmp, ctx):
    return ctx.args(output=""), ["output"]


PREDICT_CASES: dict[str, Builder] = {
    name.removeprefix("predict_"): builder
    for name, builder in dict(globals()).items()
    if name.startswith("predict_") and callable(builder) and name != "predict_phantom"
}
if not torch.cuda.is_available():

    def _predict_cuda_without_gpu(tmp, ctx):
        return [*ctx.args(), "device=cuda"], ["no CUDA GPU"]

    PREDICT_CASES["cuda_without_gpu"] = _predict_cuda_without_gpu


class PredictContext:
    """The good arguments of a prediction, for a case to replace one of them."""

    def __init__(self, tmp: Path, phantom: PhantomManifest, checkpoint: Path) -> None:
        self.phantom, self.checkpoint = phantom, checkpoint
        self.good = {
            "ckpt": checkpoint,
            "input": scan_paths(phantom)[0],
            "output": tmp / "out",
        }

    def args(self, **replace) -> list[str]:
        values = {**self.good, **replace}
        return [f"{key}={value}" for key, value in values.items()] + ["progress=false"]


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict(case, predict_phantom, checkpoint, tmp_path, capsys, monkeypatch):
    from ichseg.cli.predict import main

    monkeypatch.chdir(tmp_path)  # a payload that ran would leave PWNED here
    monkeypatch.setattr(sys, "argv", ["python -m ichseg.predict"])
    argv, expected = PREDICT_CASES[case](tmp_path, PredictContext(tmp_path, predict_phantom,
                                                                   checkpoint))  # fmt: skip
    assert_refused(main, argv, expected, tmp_path, capsys, "ichseg.predict")
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- ichseg.train


def _fake_run_folder(run: Path) -> None:
    """What an earlier run leaves in its folder."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's weights")
    (run / "report.md").write_text("an earlier run's report")


def train_fold_not_a_number(tmp, ctx):
    return ["data.fold=abc"], ["data.fold", "abc"]


def train_fold_out_of_range(tmp, ctx):
    return ["data.fold=7"], ["data.fold", "7"]


def train_max_epochs_not_a_number(tmp, ctx):
    return ["trainer.max_epochs=abc"], ["trainer.max_epochs", "abc"]


def train_learning_rate_not_a_number(tmp, ctx):
    return ["model.optimizer.lr=abc"], ["model.optimizer.lr", "abc"]


def train_seed_not_a_number(tmp, ctx):
    return ["seed=abc"], ["seed", "abc"]


def train_zero_batch_size(tmp, ctx):
    return ["data.batch_size=0"], ["batch_size", "0"]


def train_tile_larger_than_the_slice(tmp, ctx):
    return ["data.tile_size=512"], ["512"]


def train_unknown_key(tmp, ctx):
    return ["foo=1"], ["foo"]


def train_unknown_data_key(tmp, ctx):
    return ["data.foo=1"], ["data.foo"]


def train_added_key_the_constructor_does_not_take(tmp, ctx):
    return ["+data.windw=32"], ["data.windw"]


def train_unknown_model_option(tmp, ctx):
    return ["model=nope"], ["model", "nope"]


def train_unknown_experiment(tmp, ctx):
    return ["experiment=nope"], ["experiment", "nope"]


def train_missing_checkpoint(tmp, ctx):
    return [f"ckpt_path={tmp / 'nope.ckpt'}"], ["nope.ckpt"]


def train_checkpoint_of_random_bytes(tmp, ctx):
    (tmp / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    return [f"ckpt_path={tmp / 'random.ckpt'}"], ["random.ckpt"]


def train_checkpoint_with_a_malicious_pickle(tmp, ctx):
    torch.save({"ichseg": make_meta(), "state_dict": {}, "payload": _Payload()}, tmp / "evil.ckpt")
    return [f"ckpt_path={tmp / 'evil.ckpt'}"], ["evil.ckpt"]


def train_resume_without_last_checkpoint(tmp, ctx):
    return ["ckpt_path=last"], ["last.ckpt"]


def train_missing_splits_file(tmp, ctx):
    return [f"data.splits_file={tmp / 'splts.json'}"], ["splts.json"]


def train_missing_data_root(tmp, ctx):
    return ["data=ctich", f"data.root={tmp / 'ct-ihc'}"], ["ct-ihc"]


def train_demo_with_a_mistyped_root(tmp, ctx):
    return [f"data.root={tmp / 'phantm'}"], ["phantm"]


def train_unwritable_log_folder(tmp, ctx):
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o500)
    return [f"paths.log_dir={tmp / 'locked' / 'logs'}"], [str(tmp / "locked")]


def train_gpu_without_a_gpu(tmp, ctx):
    return ["trainer.accelerator=gpu"], ["gpu"]


def train_earlier_run_in_the_folder(tmp, ctx):
    _fake_run_folder(ctx.run)
    return [], ["ckpt_path=last", str(ctx.run)]


TRAIN_CASES: dict[str, Builder] = {
    name.removeprefix("train_"): builder
    for name, builder in dict(globals()).items()
    if name.startswith("train_") and callable(builder)
}
if torch.cuda.is_available():
    del TRAIN_CASES["gpu_without_a_gpu"]


class TrainContext:
    """A tiny demo run into ``tmp/run`` on the session's phantom."""

    def __init__(self, tmp: Path, phantom: PhantomManifest) -> None:
        self.run = tmp / "run"
        self.base = [
            "experiment=demo",
            f"data.root={phantom.root}",
            f"hydra.run.dir={self.run}",
            f"paths.log_dir={tmp / 'logs'}",
            "data.working_size=96",
            "data.tile_size=32",
            "data.tile_stride=16",
            "data.k=3",
            "model.net.base_filters=4",
            "model.net.depth=2",
            "trainer.max_epochs=1",
        ]


@pytest.fixture
def restore_logging():
    """Hydra points the root logger at this test's captured streams: undo it afterwards, so that
    later log records do not go to closed streams."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
@pytest.mark.usefixtures("restore_logging")
def test_train(case, nifti_phantom, tmp_path, capsys, monkeypatch):
    from ichseg.cli.train import main

    if case == "unwritable_log_folder" and IS_ROOT:
        pytest.skip("permissions do not bind root")
    monkeypatch.chdir(tmp_path)
    context = TrainContext(tmp_path, nifti_phantom)
    extra, expected = TRAIN_CASES[case](tmp_path, context)
    argv = [*context.base, *extra]

    def run(arguments: list[str]) -> int:
        monkeypatch.setattr(sys, "argv", ["ichseg.train", *arguments])
        return main()

    try:
        assert_refused(run, argv, expected, tmp_path, capsys, "ichseg.train")
    finally:
        for path in tmp_path.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
    assert not (tmp_path / "PWNED").exists()


def test_the_matrix_covers_every_command_with_sixty_cases():
    counts = {
        "check": len(CHECK_CASES),
        "phantom": len(PHANTOM_CASES),
        "report": len(REPORT_CASES),
        "predict": len(PREDICT_CASES),
        "train": len(TRAIN_CASES),
    }
    assert all(count >= 10 for count in counts.values()), counts
    assert sum(counts.values()) >= 60, counts
