"""Files on disk: voxel sizes from the raw header, what --overwrite may delete, unwritable
folders, permissions under the umask, per-file failures of prediction, skipped file names, wrong
report schemas and rerunning prediction into the same folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_predict import files_in, make_meta, read_rows, save_lightning_checkpoint

from ichseg.data.check import check_dataset
from ichseg.data.check import main as check_main
from ichseg.data.ctich import open_dataset
from ichseg.data.phantom import generate_phantom
from ichseg.data.phantom import main as phantom_main
from ichseg.errors import DatasetError, DatasetWarning
from ichseg.io.nifti import read_ct, voxel_spacing_mm
from ichseg.predict import main as predict_main
from ichseg.utils.atomic import atomic_write_text

SMALL = ["--patients", "2", "--slices", "3", "--size", "64", "--no-progress"]
BAD_PIXDIMS = {
    "zero": (0.0, 0.0, 0.0),
    "one zero": (0.5, 0.0, 5.0),
    "negative": (-0.5, 0.5, 5.0),
    "nan": (0.5, float("nan"), 5.0),
    "infinite": (0.5, 0.5, float("inf")),
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("files-phantom") / "ct-ich"
    return generate_phantom(root, "nifti", n_patients=3, n_slices=4, size=64, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("files-ckpt") / "tiny.ckpt"
    save_lightning_checkpoint(path, make_meta())
    return path


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def scans_of(phantom) -> list[Path]:
    return sorted((phantom.root / "ct_scans").glob("*.nii"))


def with_pixdim(source: Path, target: Path, pixdim) -> Path:
    """``source`` written to ``target`` with ``pixdim[1:4]`` set in the stored header."""
    image = nib.load(source, mmap=False)
    data = np.asanyarray(image.dataobj).copy()
    header = image.header.copy()
    out = nib.Nifti1Image(data, image.affine, header)
    nib.save(out, target)
    raw = bytearray(target.read_bytes())
    values = np.array(pixdim, dtype="<f4" if header.endianness == "<" else ">f4")
    raw[80:92] = values.tobytes()  # pixdim[1..3] (pixdim starts at byte 76)
    target.write_bytes(bytes(raw))
    return target


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (hidden names) left anywhere below ``folder``."""
    return sorted(str(p) for p in folder.rglob(".*"))


# --------------------------------------------------------------------------- 1. raw voxel sizes


@pytest.mark.parametrize("case", sorted(BAD_PIXDIMS))
def test_bad_voxel_sizes_are_refused_not_read_as_1mm(phantom, tmp_path, case):
    scan = with_pixdim(scans_of(phantom)[0], tmp_path / "bad.nii", BAD_PIXDIMS[case])
    if case in ("zero", "one zero", "negative"):  # nibabel repairs these on reading
        assert np.all(np.asarray(nib.load(scan).header.get_zooms()[:3]) > 0)
    with pytest.raises(DatasetError, match="voxel sizes") as info:
        voxel_spacing_mm(scan)
    assert str(scan) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DatasetError, match="voxel sizes"):
        read_ct(scan, header_only=True)


def test_voxel_spacing_from_the_raw_header_in_mm(phantom, tmp_path):
    scan = with_pixdim(scans_of(phantom)[0], tmp_path / "ok.nii", (0.25, 0.5, 4.0))
    assert voxel_spacing_mm(scan) == pytest.approx((0.25, 0.5, 4.0))
    image = nib.load(scan)
    image.header.set_xyzt_units("micron")
    nib.save(image, tmp_path / "micron.nii.gz")
    assert voxel_spacing_mm(tmp_path / "micron.nii.gz") == pytest.approx((0.25e-3, 0.5e-3, 4e-3))


def test_check_names_a_scan_without_voxel_sizes(nifti_copy, capsys):
    scan = nifti_copy / "ct_scans" / "050.nii"
    with_pixdim(scan, scan, (0.0, 0.0, 0.0))
    assert check_main([str(nifti_copy), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "OK: no problems found" not in out
    lines = [line for line in out.splitlines() if str(scan) in line]
    assert len(lines) == 1 and "voxel sizes" in lines[0] and "0 x 0 x 0" in lines[0]
    with pytest.raises(DatasetError, match="voxel sizes"):
        open_dataset(nifti_copy).load(50)
    assert open_dataset(nifti_copy).load(49).spacing == pytest.approx(
        tuple(float(z) for z in nib.load(nifti_copy / "ct_scans" / "049.nii").header.get_zooms())
    )


def test_predict_fails_a_scan_without_voxel_sizes_and_predicts_the_others(
    phantom, checkpoint, tmp_path, capsys
):
    folder = tmp_path / "scans"
    folder.mkdir()
    good = scans_of(phantom)[0]
    shutil.copy(good, folder / good.name)
    bad = with_pixdim(scans_of(phantom)[1], folder / "zero.nii", (0.0, 0.0, 0.0))
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        predict_main(
            [f"ckpt={checkpoint}", f"input={folder}", f"output={output}", "progress=false"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "1 of 2 scan(s) failed" in err
    assert f"{bad}: the header's voxel sizes (pixdim 1-3) are 0 x 0 x 0" in err
    assert files_in(output) == ["049_ich_seg.nii.gz", "predict.json", "qa", "volumes.csv"]
    assert [row["mask"] for row in read_rows(output / "volumes.csv")] == ["049_ich_seg.nii.gz"]


def test_predict_one_scan_without_voxel_sizes_fails_before_the_model_loads(
    phantom, tmp_path, capsys
):
    bad = with_pixdim(scans_of(phantom)[0], tmp_path / "zero.nii", (0.0, 0.0, 0.0))
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as info:  # the checkpoint does not exist: never reached
        predict_main([f"ckpt={tmp_path / 'none.ckpt'}", f"input={bad}", f"output={output}"])
    assert info.value.code == 2
    err = one_error_line(capsys)
    assert str(bad) in err and "voxel sizes" in err
    assert not output.exists()


# --------------------------------------------------------------------------- 5. unreadable headers


def test_unreadable_headers_fail_per_file_all_listed(phantom, checkpoint, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for scan in scans_of(phantom)[:2]:
        shutil.copy(scan, folder / scan.name)
    (folder / "a_garbage.nii").write_bytes(b"not a nifti file at all" * 20)
    (folder / "b_empty.nii.gz").write_bytes(b"")
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        predict_main(
            [f"ckpt={checkpoint}", f"input={folder}", f"output={output}", "progress=false"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "2 of 4 scan(s) failed" in err
    assert str(folder / "a_garbage.nii") in err and str(folder / "b_empty.nii.gz") in err
    assert files_in(output) == [
        "049_ich_seg.nii.gz", "050_ich_seg.nii.gz", "predict.json", "qa", "volumes.csv"
    ]  # fmt: skip


def test_no_readable_scan_fails_before_the_model_loads(tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.nii").write_bytes(b"garbage" * 50)
    (folder / "b.nii").write_bytes(b"more garbage" * 50)
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as info:  # a missing checkpoint would be another error
        predict_main([f"ckpt={tmp_path / 'none.ckpt'}", f"input={folder}", f"output={output}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "2 of 2 scan(s) failed" in err
    assert str(folder / "a.nii") in err and str(folder / "b.nii") in err
    assert "checkpoint" not in err and not output.exists()


# --------------------------------------------------------------------------- 8. rerunning predict


def test_rerun_keeps_the_rows_of_earlier_scans(phantom, checkpoint, tmp_path):
    first, second, third = scans_of(phantom)
    output = tmp_path / "out"
    base = [f"ckpt={checkpoint}", f"output={output}", "progress=false"]
    assert predict_main([*base, f"input={first}"]) == 0
    assert predict_main([*base, f"input={second}"]) == 0
    rows = read_rows(output / "volumes.csv")
    assert [row["mask"] for row in rows] == ["049_ich_seg.nii.gz", "050_ich_seg.nii.gz"]
    before = {row["mask"]: row for row in rows}
    folder = tmp_path / "again"
    folder.mkdir()
    shutil.copy(third, folder / third.name)
    shutil.copy(first, folder / first.name)
    assert predict_main([*base, f"input={folder}"]) == 0
    rows = read_rows(output / "volumes.csv")
    assert [row["mask"] for row in rows] == [
        "049_ich_seg.nii.gz", "050_ich_seg.nii.gz", "051_ich_seg.nii.gz"
    ]  # fmt: skip
    assert rows[0]["file"] == str(folder / first.name)  # replaced by the new prediction
    assert rows[1] == before["050_ich_seg.nii.gz"]  # kept as it was
    assert leftovers(output) == []


def test_foreign_volumes_csv_is_not_overwritten(phantom, checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "volumes.csv").write_text("patient,volume\n49,12\n")
    scan = scans_of(phantom)[0]
    with pytest.raises(SystemExit) as info:
        predict_main([f"ckpt={checkpoint}", f"input={scan}", f"output={output}"])
    assert info.value.code == 2
    err = one_error_line(capsys)
    assert str(output / "volumes.csv") in err and "not a volumes.csv written by" in err
    assert (output / "volumes.csv").read_text() == "patient,volume\n49,12\n"
    assert files_in(output) == ["volumes.csv"]


def test_a_users_file_named_like_a_mask_is_not_replaced(phantom, checkpoint, tmp_path, capsys):
    first, second = scans_of(phantom)[:2]
    output = tmp_path / "out"
    output.mkdir()
    mine = output / "049_ich_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), mine)
    mine_bytes = mine.read_bytes()
    folder = tmp_path / "scans"
    folder.mkdir()
    for scan in (first, second):
        shutil.copy(scan, folder / scan.name)
    args = [f"ckpt={checkpoint}", f"input={folder}", f"output={output}", "progress=false"]
    with pytest.raises(SystemExit) as info:
        predict_main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{mine}: exists and was not written by ichseg.predict" in err
    assert mine.read_bytes() == mine_bytes
    assert files_in(output) == [
        "049_ich_seg.nii.gz", "050_ich_seg.nii.gz", "predict.json", "qa", "volumes.csv"
    ]  # fmt: skip
    # its own earlier prediction is replaced without a word
    mine.unlink()
    assert predict_main(args) == 0
    assert predict_main(args) == 0


# --------------------------------------------------------------------------- 4. umask


@pytest.mark.parametrize(("mask", "file_mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_honour_the_umask(tmp_path, mask, file_mode):
    with umask(mask):
        atomic_write_text(tmp_path / "report.json", "{}")
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == file_mode


def test_predicted_masks_and_volumes_honour_the_umask(phantom, checkpoint, tmp_path):
    output = tmp_path / "out"
    with umask(0o002):
        args = [f"ckpt={checkpoint}", f"input={scans_of(phantom)[0]}", f"output={output}"]
        assert predict_main([*args, "progress=false"]) == 0
    for name in ("049_ich_seg.nii.gz", "volumes.csv"):
        assert stat.S_IMODE((output / name).stat().st_mode) == 0o664, name


def test_phantom_folders_and_files_honour_the_umask(tmp_path):
    with umask(0o022):
        generate_phantom(tmp_path / "p", "nifti", n_patients=2, n_slices=3, size=64)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "p" / "ct_scans").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "p" / "ct_scans" / "049.nii").stat().st_mode) == 0o644


# --------------------------------------------------------------------------- 2. --overwrite


def small_phantom(out: Path, release: str = "nifti", *extra: str) -> None:
    assert phantom_main([str(out), "--release", release, "--patients", "2", "--slices", "3",
                         "--size", "64", "--no-progress", *extra]) == 0  # fmt: skip


def tree(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize(
    "foreign",
    ["ct_scans/my_notes.txt", "masks/abc.nii", "ct_scans/049.nii.gz", "notes.txt",
     "Patients_CT/049/brain/Thumbs.db", "Patients_CT/049/readme.txt", "Patients_CT/x1/a.jpg"],
)  # fmt: skip
def test_overwrite_refuses_any_file_the_phantom_did_not_write(tmp_path, capsys, foreign):
    out = tmp_path / "out"
    small_phantom(out, "jpg" if foreign.startswith("Patients_CT") else "nifti")
    capsys.readouterr()
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("mine")
    before = tree(out)
    with pytest.raises(SystemExit) as info:
        phantom_main([str(out), "--overwrite", *SMALL])
    assert info.value.code == 2
    err = one_error_line(capsys)
    named = out / (foreign if "x1" not in foreign else "Patients_CT/x1")
    assert f"{out} holds {named}, which is not a file of an ichseg phantom" in err
    assert "nothing is overwritten" in err
    assert tree(out) == before  # nothing deleted, nothing written
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_a_phantom_of_either_release(tmp_path):
    out = tmp_path / "out"
    small_phantom(out, "jpg")
    small_phantom(out, "nifti", "--overwrite")
    assert (out / "ct_scans").is_dir() and not (out / "Patients_CT").exists()
    small_phantom(out, "jpg", "--overwrite")
    assert (out / "Patients_CT").is_dir() and not (out / "ct_scans").exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- 3. unwritable OUT


def test_phantom_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as info:
        phantom_main([str(blocker / "out"), *SMALL])
    assert info.value.code == 2
    err = one_error_line(capsys)
    assert str(blocker) in err and "cannot write the phantom" in err
    assert blocker.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file"]


def test_phantom_in_an_unwritable_folder_is_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(SystemExit) as info:
        phantom_main([str(folder / "out"), *SMALL])
    assert info.value.code == 2
    err = one_error_line(capsys)
    assert f"{folder}: cannot write the phantom into this folder (Permission denied)" in err
    assert os.listdir(folder) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_phantom_in_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as info:
            phantom_main([str(folder / "out"), *SMALL])
    finally:
        folder.chmod(0o700)
    assert info.value.code == 2
    assert str(folder) in one_error_line(capsys) and os.listdir(folder) == []


def test_phantom_write_failure_leaves_nothing(tmp_path, capsys, monkeypatch):
    import ichseg.data.phantom.write as write

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "_write_label_csv", full)
    with pytest.raises(SystemExit) as info:
        phantom_main([str(tmp_path / "out"), *SMALL])
    assert info.value.code == 2
    err = one_error_line(capsys)
    assert str(tmp_path / "out") in err and "No space left" in err
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- 6. skipped names


def test_a_file_that_is_not_a_patient_number_is_a_warning(nifti_copy, capsys):
    stray = nifti_copy / "ct_scans" / "abc.nii"
    shutil.copy(nifti_copy / "ct_scans" / "049.nii", stray)
    (nifti_copy / "masks" / ".DS_Store").write_bytes(b"")  # hidden: silent
    report = check_dataset(nifti_copy)
    assert report.ok
    assert [w for w in report.warnings if "skipped" in w] == [
        f"{stray}: skipped, the name is not a patient number (NNN.nii or NNN.nii.gz)"
    ]
    assert check_main([str(nifti_copy), "--no-progress"]) == 0
    assert f"warning: {stray}: skipped" in capsys.readouterr().out
    with pytest.warns(DatasetWarning, match="abc.nii: skipped"):
        open_dataset(nifti_copy)


def test_jpg_reader_warns_of_stray_files(jpg_copy):
    stray = jpg_copy / "Patients_CT" / "049" / "brain" / "notes.txt"
    stray.write_text("x")
    (jpg_copy / "Patients_CT" / "scratch").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_dataset(jpg_copy)
    messages = [str(w.message) for w in caught if w.category is DatasetWarning]
    assert any(m.startswith(f"{stray}: skipped") for m in messages)
    assert any("scratch: skipped" in m for m in messages)


# --------------------------------------------------------------------------- 7. report schema


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"format": "something-else", "split": "test"}', "format 'something-else'"),
        ("[1, 2, 3]", "a JSON list"),
        ('{"format": "ichseg-evaluation-report", "settings": [1]}', "'settings' is a JSON list"),
    ],
)
def test_report_with_the_wrong_schema_names_the_file(tmp_path, capsys, text, reason):
    from ichseg.report import main as report_main

    run = tmp_path / "runs" / "0"
    run.mkdir(parents=True)
    (run / "report.json").write_text(text)
    with pytest.raises(SystemExit) as info:
        report_main([str(tmp_path / "runs")])
    assert info.value.code == 2
    err = one_error_line(capsys)
    assert f"{run / 'report.json'}: " in err and reason in err
    assert "no fold results found" not in err
