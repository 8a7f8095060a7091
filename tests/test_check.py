"""The dataset check: a clean summary on good data, every problem listed with its file, exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ichseg.data.check import check_dataset, main


def run_check(root):
    return subprocess.run(
        [sys.executable, "-m", "ichseg.data.check", str(root), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_clean_nifti_phantom_summary(nifti_phantom):
    report = check_dataset(nifti_phantom.root)
    assert report.ok, report.format()
    expected_slices = sum(p.shape[2] for p in nifti_phantom.patients)
    expected_ich = sum(int(p.subtypes.any(axis=1).sum()) for p in nifti_phantom.patients)
    assert report.release == "nifti"
    assert report.n_patients == 12 and report.n_slices == expected_slices
    assert report.n_ich_slices == expected_ich
    assert report.patients_with_ich == sum(p.subtypes.any() for p in nifti_phantom.patients)
    assert report.ich_slices_by_subtype["EDH"] == sum(
        int(p.subtypes[:, 3].sum()) for p in nifti_phantom.patients
    )
    assert report.image_sizes == {(96, 96): 12}
    text = report.format()
    assert "NIfTI release 1.3.x" in text and "OK: no problems found" in text


def test_cli_exit_0_and_summary(jpg_phantom):
    result = run_check(jpg_phantom.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "JPG release 1.0-1.2" in result.stdout
    assert "patients            6" in result.stdout
    assert "warning:" in result.stdout and "no bone image for slice" in result.stdout


def corrupt_truncate(root):
    path = root / "ct_scans" / "050.nii"
    path.write_bytes(path.read_bytes()[:5000])


def corrupt_nan(root):
    path = root / "ct_scans" / "051.nii"
    img = nib.load(path, mmap=False)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[3, 3, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)


def corrupt_shape(root):
    path = root / "masks" / "052.nii"
    img = nib.load(path, mmap=False)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), path)


def corrupt_column(root):
    path = root / "hemorrhage_diagnosis_raw_ct.csv"
    path.write_text(path.read_text().replace("Epidural", "Epi"))


def add_orphan_rows(root):
    path = root / "hemorrhage_diagnosis_raw_ct.csv"
    path.write_text(path.read_text() + "60,1,0,0,0,0,0,1,0\n")


def remove_rows(root):
    path = root / "hemorrhage_diagnosis_raw_ct.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.startswith("53,")))


@pytest.mark.parametrize(
    "damage,expected",
    [
        (corrupt_truncate, "ct_scans/050.nii: unreadable NIfTI"),
        (corrupt_nan, "ct_scans/051.nii: scan contains NaN or infinite values"),
        (corrupt_shape, "masks/052.nii: mask shape (96, 96, "),
        (lambda root: (root / "masks" / "054.nii").unlink(), "ct_scans/054.nii: scan has no mask"),
        (lambda root: shutil.rmtree(root / "ct_scans"), "ct_scans: folder missing"),
        (corrupt_column, "hemorrhage_diagnosis_raw_ct.csv: missing column(s) Epidural"),
        (add_orphan_rows, "hemorrhage_diagnosis_raw_ct.csv: rows for patient 60 but no images"),
        (
            remove_rows,
            "ct_scans/053.nii: images of patient 53 "
            "have no rows in hemorrhage_diagnosis_raw_ct.csv",
        ),
    ],
    ids=[
        "truncated",
        "nan",
        "mask-shape",
        "no-mask",
        "no-ct_scans",
        "csv-column",
        "orphan-rows",
        "no-rows",
    ],
)
def test_each_nifti_problem_is_named_and_exits_2(nifti_copy, damage, expected):
    damage(nifti_copy)
    result = run_check(nifti_copy)
    assert result.returncode == 2
    problem_lines = [line for line in result.stdout.splitlines() if expected in line]
    assert len(problem_lines) == 1, result.stdout
    assert problem_lines[0].startswith(str(nifti_copy))
    assert "Traceback" not in result.stderr


def test_all_problems_are_listed_at_once(nifti_copy):
    corrupt_truncate(nifti_copy)
    corrupt_nan(nifti_copy)
    (nifti_copy / "masks" / "054.nii").unlink()
    report = check_dataset(nifti_copy)
    assert len(report.problems) == 3
    assert "3 problem(s) found:" in report.format()


def test_jpg_problems(jpg_copy):
    patients = jpg_copy / "Patients_CT"
    shutil.rmtree(patients / "050" / "brain" / "3.jpg", ignore_errors=True)
    (patients / "050" / "brain" / "3.jpg").unlink(missing_ok=True)
    for k in range(1, 9):  # patient 051 at another size
        Image.new("L", (120, 120)).save(patients / "051" / "brain" / f"{k}.jpg")
        Image.new("L", (120, 120)).save(patients / "051" / "bone" / f"{k}.jpg")
    for mask in (patients / "051" / "brain").glob("*_HGE_Seg.jpg"):
        Image.new("L", (120, 120)).save(mask)
    Image.new("L", (100, 110)).save(patients / "052" / "brain" / "2.jpg")
    report = check_dataset(jpg_copy)
    text = "\n".join(str(p) for p in report.problems)
    assert "050/brain: slice images are not numbered 1..N (missing 3)" in text
    assert "051/brain: slice images are 120x120 pixels, expected 110x110" in text
    assert "052/brain/2.jpg: image is 100x110 pixels, expected 110x110" in text
    assert len(report.problems) == 3


def test_jpg_without_patients_folder(tmp_path, jpg_copy):
    shutil.rmtree(jpg_copy / "Patients_CT")
    (jpg_copy / "masks").mkdir()  # looks like nothing in particular
    assert run_check(jpg_copy).returncode == 2


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_root(tmp_path, capsys, make):
    root = tmp_path / "ct-ich"
    if make == "empty":
        root.mkdir()
    assert main([str(root), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert f"{root}: dataset root {'does not exist' if make == 'missing' else 'is empty'}" in out
