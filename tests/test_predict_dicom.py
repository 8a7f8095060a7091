"""ichseg.predict on DICOM series (ichseg[dicom]) and its visual QA report.

The series are built from phantom scans in code (ichseg.io.dicom.write_series): the same anatomy
as the phantom's NIfTI file, stored as DICOM stores it (L, P, S), so the masks must be the NIfTI
masks in the series' layout.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_predict import files_in, read_rows, scan_paths

from ichseg.data.phantom import generate_phantom
from ichseg.predict import main

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
from ichseg.io.dicom import write_series  # noqa: E402


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom-phantom") / "ct-ich"
    return generate_phantom(root, "nifti", n_patients=2, n_slices=6, size=64, seed=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from test_predict import make_meta, save_lightning_checkpoint

    path = tmp_path_factory.mktemp("dicom-ckpt") / "tiny.ckpt"
    save_lightning_checkpoint(path, make_meta(threshold=0.45))
    return path


def as_series(scan: Path, folder: Path, patient: str, number: int, **kwargs) -> np.ndarray:
    """Write a phantom NIfTI scan (L, A, S) as a DICOM series (L, P, S); its HU as stored."""
    image = nib.load(scan)
    hu = np.asanyarray(image.dataobj).astype(np.int16)
    stored = np.ascontiguousarray(hu[:, ::-1, :])  # rows run to the patient's back in DICOM
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    write_series(stored, folder, spacing=zooms, patient_id=patient, series_number=number, **kwargs)
    return stored


class Rows(HTMLParser):
    """The data-name of every table row of a QA index."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "tr" and "data-name" in values:
            self.names.append(values["data-name"])


def index_rows(path: Path) -> list[str]:
    parser = Rows()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.names


def test_each_dicom_series_is_predicted_in_its_own_space(phantom, checkpoint, tmp_path, capsys):
    scans = scan_paths(phantom)
    source = tmp_path / "dicom"
    as_series(scans[0], source / "study" / "a", "P1", 3)
    as_series(scans[1], source / "study" / "b", "P2", 7)
    (source / "notes.txt").write_text("not DICOM\n")
    # the same scans as NIfTI, predicted the usual way
    reference = tmp_path / "nifti-out"
    assert (
        main(
            [
                f"ckpt={checkpoint}",
                f"input={phantom.root}",
                f"output={reference}",
                "save_probabilities=true",
            ]
        )
        == 0
    )
    output = tmp_path / "out"
    args = [f"ckpt={checkpoint}", f"input={source}", f"output={output}", "progress=false"]
    assert main([*args, "dicom_seg=true", "save_probabilities=true"]) == 0
    out = capsys.readouterr().out
    assert "DICOM series 3" in out and "of patient P1" in out
    names = ["P1_3", "P2_7"]
    for name, scan in zip(names, scans, strict=True):
        mask_image = nib.load(output / f"{name}_ich_seg.nii.gz")
        assert nib.aff2axcodes(mask_image.affine) == ("L", "P", "S")
        mask = np.asanyarray(mask_image.dataobj)
        expected = np.asanyarray(nib.load(reference / f"{scan.name[:3]}_ich_seg.nii.gz").dataobj)
        assert expected.any()
        np.testing.assert_array_equal(mask[:, ::-1, :], expected)
        probabilities = np.asanyarray(nib.load(output / f"{name}_prob.nii.gz").dataobj)
        expected_p = np.asanyarray(nib.load(reference / f"{scan.name[:3]}_prob.nii.gz").dataobj)
        np.testing.assert_allclose(probabilities[:, ::-1, :], expected_p, atol=1e-6)
        # the DICOM SEG: one frame per slice, the mask's voxels
        seg = pydicom.dcmread(output / f"{name}_ich_seg.dcm")
        assert seg.Modality == "SEG" and seg.Manufacturer == "ichseg"
        assert int(seg.NumberOfFrames) == mask.shape[2]
        assert int(np.count_nonzero(seg.pixel_array)) == int(np.count_nonzero(mask))
    rows = {row["mask"]: row for row in read_rows(output / "volumes.csv")}
    assert set(rows) == {f"{n}_ich_seg.nii.gz" for n in names}
    assert all(row["orientation"] == "LPS" for row in rows.values())
    nifti_rows = read_rows(reference / "volumes.csv")
    for name, nifti_row in zip(names, nifti_rows, strict=True):
        assert rows[f"{name}_ich_seg.nii.gz"]["ich_volume_ml"] == nifti_row["ich_volume_ml"]
    provenance = json.loads((output / "predict.json").read_text())
    assert [s["dicom_seg"] for s in provenance["scans"]] == [f"{n}_ich_seg.dcm" for n in names]
    assert sorted(index_rows(output / "qa" / "index.html")) == names


def test_a_broken_series_fails_alone_naming_it(phantom, checkpoint, tmp_path, capsys):
    scans = scan_paths(phantom)
    source = tmp_path / "dicom"
    as_series(scans[0], source / "good", "P1", 1)
    positions = [(0.0, 0.0, 5.0 * k) for k in (0, 1, 2, 4, 5, 6)]  # slice 3 missing
    as_series(scans[1], source / "gap", "P2", 2, positions=positions)
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main([f"ckpt={checkpoint}", f"input={source}", f"output={output}", "progress=false"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "1 of 2 scan(s) failed" in err
    assert "DICOM series 2" in err and "of patient P2" in err and "slices are missing" in err
    assert (output / "P1_1_ich_seg.nii.gz").is_file()
    assert not list(output.glob("P2_2*"))


def test_the_qa_report_lists_every_scan_with_its_sheet(phantom, checkpoint, tmp_path):
    from PIL import Image

    output = tmp_path / "out"
    assert main([f"ckpt={checkpoint}", f"input={phantom.root}", f"output={output}"]) == 0
    stems = [p.name[:3] for p in scan_paths(phantom)]
    assert files_in(output / "qa") == sorted([*(f"{s}.png" for s in stems), "index.html"])
    assert sorted(index_rows(output / "qa" / "index.html")) == stems
    with Image.open(output / "qa" / f"{stems[0]}.png") as sheet:
        assert sheet.format == "PNG" and sheet.width >= 256
    html = (output / "qa" / "index.html").read_text()
    assert "../049_ich_seg.nii.gz" in html and "http" not in html
    # a run without the report writes none
    bare = tmp_path / "bare"
    assert main([f"ckpt={checkpoint}", f"input={phantom.root}", f"output={bare}", "qa=false"]) == 0
    assert "qa" not in files_in(bare)


def test_a_users_dcm_named_like_a_seg_is_not_replaced(phantom, checkpoint, tmp_path, capsys):
    source = tmp_path / "dicom"
    as_series(scan_paths(phantom)[0], source / "a", "P1", 3)
    output = tmp_path / "out"
    output.mkdir()
    mine = output / "P1_3_ich_seg.dcm"
    mine.write_bytes(b"my own file")
    args = [f"ckpt={checkpoint}", f"input={source}", f"output={output}", "dicom_seg=true"]
    with pytest.raises(SystemExit) as info:
        main([*args, "progress=false"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{mine}: exists and was not written by ichseg.predict" in err
    assert mine.read_bytes() == b"my own file"
    assert not (output / "P1_3_ich_seg.nii.gz").exists()


def test_dicom_input_without_the_extra_is_one_line(phantom, checkpoint, tmp_path, capsys):
    import importlib

    source = tmp_path / "dicom"
    as_series(scan_paths(phantom)[0], source / "a", "P1", 3)
    real = importlib.import_module

    def no_pydicom(name, *args, **kwargs):
        if name.split(".")[0] in ("pydicom", "highdicom"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importlib, "import_module", no_pydicom)
        with pytest.raises(SystemExit) as info:
            main([f"ckpt={checkpoint}", f"input={source}", f"output={tmp_path / 'out'}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install 'ichseg[dicom]'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
