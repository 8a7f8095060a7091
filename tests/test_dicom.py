"""ichseg.io.dicom: series discovery, HU and geometry of read_series, refusals, DICOM SEG output.

Every series is built here with ichseg.io.dicom.write_series (tiny volumes, shuffled file names).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ichseg.errors import ConfigError, DatasetError
from ichseg.io import dicom

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

SHAPE = (32, 24, 6)  # columns, rows, slices


def _volume(seed: int = 0, low: int = -1024, high: int = 3000) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=SHAPE).astype(np.int16)


def _only_series(folder: Path) -> dicom.DicomSeries:
    found = dicom.find_series(folder)
    assert len(found) == 1
    return found[0]


def test_hu_and_affine_round_trip(tmp_path: Path) -> None:
    import nibabel as nib

    hu = _volume()
    paths = dicom.write_series(
        hu, tmp_path / "s", spacing=(0.5, 0.6, 5.0), origin=(-8.0, -7.0, 10.0)
    )
    # written shuffled: neither the file names nor InstanceNumber follow the slice order
    assert sorted(paths) != paths
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers != sorted(numbers)

    image = dicom.read_series(_only_series(tmp_path))
    data = np.asarray(image.dataobj)
    assert data.dtype == np.int16
    np.testing.assert_array_equal(data, hu)
    expected = np.array(
        [
            [-0.5, 0.0, 0.0, 8.0],
            [0.0, -0.6, 0.0, 7.0],
            [0.0, 0.0, 5.0, 10.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(image.affine, expected, atol=1e-5)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    assert int(image.header["qform_code"]) == 1
    assert int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.header.get_zooms(), (0.5, 0.6, 5.0), rtol=1e-6)
    assert image.header.get_xyzt_units()[0] == "mm"


def test_rescale_slope_and_signed_pixels(tmp_path: Path) -> None:
    hu = (_volume(1, -600, 1200) // 2 * 2).astype(np.int16)  # even: exact with slope 2
    dicom.write_series(hu, tmp_path / "a", slope=2.0, intercept=-1024.0)
    np.testing.assert_array_equal(
        np.asarray(dicom.read_series(_only_series(tmp_path / "a")).dataobj), hu
    )
    dicom.write_series(hu, tmp_path / "b", intercept=0.0)  # negative stored values: int16
    assert pydicom.dcmread(next((tmp_path / "b").iterdir())).PixelRepresentation == 1
    np.testing.assert_array_equal(
        np.asarray(dicom.read_series(_only_series(tmp_path / "b")).dataobj), hu
    )


def test_oblique_descending_series_is_sorted_along_the_normal(tmp_path: Path) -> None:
    angle = math.radians(20)
    iop = (1.0, 0.0, 0.0, 0.0, math.cos(angle), math.sin(angle))
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-5.0, 3.0, 40.0])
    hu = _volume(2)
    # slice k of the files lies *against* the normal, so the volume comes back reversed in k
    positions = [origin - k * 2.5 * normal for k in range(SHAPE[2])]
    dicom.write_series(hu, tmp_path, spacing=(0.7, 0.7, 2.5), iop=iop, positions=positions)
    image = dicom.read_series(_only_series(tmp_path))
    np.testing.assert_array_equal(np.asarray(image.dataobj), hu[:, :, ::-1])
    first = positions[-1]
    lps = np.eye(4)
    lps[:3, 0] = np.array(iop[:3]) * 0.7
    lps[:3, 1] = np.array(iop[3:]) * 0.7
    lps[:3, 2] = normal * 2.5
    lps[:3, 3] = first
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    np.testing.assert_allclose(image.affine, expected, atol=1e-4)


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    hu = _volume(3)[:, :, :1]
    dicom.write_series(hu, tmp_path, spacing=(0.5, 0.5, 3.0))
    image = dicom.read_series(_only_series(tmp_path))
    np.testing.assert_array_equal(np.asarray(image.dataobj), hu)
    np.testing.assert_allclose(image.affine[2, 2], 3.0)


def test_find_series_in_a_mixed_tree(tmp_path: Path) -> None:
    dicom.write_series(_volume(4), tmp_path, patient_id="P 1/x", series_number=2)
    dicom.write_series(_volume(5), tmp_path / "sub" / "deeper", patient_id="P2", series_number=5)
    # same patient and series number as the first, another study: a distinct name
    dicom.write_series(_volume(6), tmp_path / "again", patient_id="P 1/x", series_number=2, seed=9)
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 200)
    (tmp_path / "empty").mkdir()
    first = dicom.find_series(tmp_path)
    assert len(first) == 3
    names = [s.name for s in first]
    assert len(set(names)) == 3 and names == sorted(names)
    assert all(
        set(n) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
        for n in names
    )
    assert "P2_5" in names
    assert sum(n.startswith("P_1_x_2") for n in names) == 2
    by_name = {s.name: s for s in first}
    assert by_name["P2_5"].folder == tmp_path / "sub" / "deeper"
    assert len(by_name["P2_5"].files) == SHAPE[2]
    assert "5" in by_name["P2_5"].description and "P2" in by_name["P2_5"].description
    # a SEG written into the tree is not an image series
    dicom.write_seg(np.zeros(SHAPE, bool), by_name["P2_5"], tmp_path / "sub" / "seg.dcm")
    assert [s.name for s in dicom.find_series(tmp_path)] == names


def test_is_dicom_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("hello")
    assert not dicom.is_dicom_folder(tmp_path)
    dicom.write_series(_volume()[:, :, :1], tmp_path / "a" / "b")
    assert dicom.is_dicom_folder(tmp_path)


def _tilted(k: int) -> list[float]:
    return [0.0, 0.9 * k, 5.0 * k]  # 10 degrees of gantry tilt


def _damage(case: str, folder: Path) -> None:
    """Write series 7 of patient P9 in ``folder``, broken as ``case`` says."""
    kwargs: dict = {"patient_id": "P9", "series_number": 7}
    if case == "orientation":
        kwargs["overrides"] = {2: {"ImageOrientationPatient": [1, 0, 0, 0, 0.98, 0.199]}}
    elif case == "spacing":
        kwargs["overrides"] = {3: {"PixelSpacing": [0.6, 0.5]}}
    elif case == "size":
        kwargs["overrides"] = {1: {"Rows": SHAPE[1] - 2}}
    elif case == "tilt":
        kwargs["positions"] = [_tilted(k) for k in range(SHAPE[2])]
    elif case == "duplicate":
        kwargs["positions"] = [[0.0, 0.0, 5.0 * min(k, 4)] for k in range(SHAPE[2])]
    elif case == "uneven":
        kwargs["positions"] = [[0.0, 0.0, z] for z in (0, 5, 10, 16, 21, 26)]
    elif case == "multiframe":
        kwargs["overrides"] = {0: {"NumberOfFrames": 2}}
    paths = dicom.write_series(_volume(), folder, **kwargs)
    if case == "missing":
        paths[3].unlink()
    elif case == "geometry":
        ds = pydicom.dcmread(paths[2])
        del ds.ImagePositionPatient
        ds.save_as(paths[2])
    elif case == "codec":
        from pydicom.encaps import encapsulate
        from pydicom.uid import JPEG2000Lossless

        ds = pydicom.dcmread(paths[2])
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
        ds["PixelData"].VR = "OB"
        ds.save_as(paths[2])


REFUSALS = {
    "orientation": "differing ImageOrientationPatient",
    "spacing": "differing PixelSpacing",
    "size": "differing sizes",
    "tilt": "gantry/detector tilt of about 10.2 degrees",
    "missing": "slices are missing: a gap of 10.00 mm between the slice positions 10.00 and 20.00",
    "duplicate": "share the slice position 20.00 mm",
    "uneven": "slice spacing is not uniform",
    "multiframe": "multi-frame image (2 frames), which is not supported yet",
    "geometry": "lacks the geometry tag(s) ImagePositionPatient",
    "codec": "JPEG 2000 Image Compression (Lossless Only), 1.2.840.10008.1.2.4.90",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_series_and_the_problem(case: str, tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    _damage(case, folder)
    series = _only_series(tmp_path)
    with pytest.raises(DatasetError) as caught:
        dicom.read_series(series)
    message = str(caught.value)
    assert message.startswith(f"DICOM series 7 (HEAD CT) of patient P9 in {folder}: ")
    assert REFUSALS[case] in message
    assert "\n" not in message
    assert caught.value.path == str(folder)
    if case == "tilt":
        assert "dcm2niix" in message
    if case == "codec":
        assert "pip install pylibjpeg" in message


def _seg_frames_by_slice(seg_path: Path, series: dicom.DicomSeries) -> dict[int, np.ndarray]:
    """The SEG's frames keyed by the slice index k (of read_series) of their source image."""
    image_uids = {}
    for path in series.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        image_uids[str(ds.SOPInstanceUID)] = float(ds.ImagePositionPatient[2])
    order = sorted(image_uids, key=image_uids.get)
    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    out = {}
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        out[order.index(str(source.ReferencedSOPInstanceUID))] = frames[f]
    return out


def test_write_seg_round_trip(tmp_path: Path) -> None:
    import ichseg

    hu = _volume()
    dicom.write_series(hu, tmp_path / "ct", patient_id="P3", series_number=4)
    series = _only_series(tmp_path / "ct")
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[5:20, 3:9, 1:4] = 1
    mask[0, 0, 5] = 1
    target = tmp_path / "out" / "P3_4.seg.dcm"
    dicom.write_seg(mask, series, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["P3_4.seg.dcm"]  # no temp file

    seg = hd.seg.segread(target)
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == SHAPE[2]
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Intracranial hemorrhage"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ichseg", ichseg.__version__)
    assert seg.SeriesDescription == "ICH"
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series.files
    }
    frames = _seg_frames_by_slice(target, series)
    assert sorted(frames) == list(range(SHAPE[2]))
    for k, frame in frames.items():
        np.testing.assert_array_equal(frame, mask[:, :, k].T)


def test_write_seg_of_an_empty_mask_and_bad_masks(tmp_path: Path) -> None:
    dicom.write_series(_volume(), tmp_path / "ct")
    series = _only_series(tmp_path / "ct")
    target = tmp_path / "empty.dcm"
    dicom.write_seg(np.zeros(SHAPE, dtype=bool), series, target, description="no bleed")
    seg = pydicom.dcmread(target)
    assert int(seg.NumberOfFrames) == SHAPE[2]
    assert not seg.pixel_array.any()
    assert seg.ContentLabel == "NO BLEED"
    with pytest.raises(ValueError, match="does not match"):
        dicom.write_seg(np.zeros((6, 24, 32), bool), series, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="only 0 and 1"):
        dicom.write_seg(np.full(SHAPE, 2, np.uint8), series, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_missing_extra_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dicom.write_series(_volume()[:, :, :2], tmp_path)
    series = _only_series(tmp_path)
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    with pytest.raises(ConfigError, match=r"^writing DICOM SEG needs the optional extra: pip"):
        dicom.write_seg(np.zeros((32, 24, 2), bool), series, tmp_path / "seg.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    message = "reading DICOM needs the optional extra: pip install 'ichseg[dicom]'"
    with pytest.raises(ConfigError) as caught:
        dicom.find_series(tmp_path)
    assert str(caught.value) == message
    with pytest.raises(ConfigError, match="reading DICOM needs"):
        dicom.read_series(series)
    assert dicom.is_dicom_folder(tmp_path)  # needs neither package


def test_module_imports_without_the_extra() -> None:
    code = (
        "import sys; sys.modules['pydicom'] = None; sys.modules['highdicom'] = None; "
        "import ichseg.io.dicom as d; print(d.DicomSeries.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "DicomSeries"


def test_series_split_over_folders(tmp_path: Path) -> None:
    hu = _volume(7)
    uid = "1.2.826.0.1.3680043.8.498.1234567"
    common = {"series_uid": uid, "study_uid": uid + ".1", "spacing": (0.5, 0.5, 5.0)}
    dicom.write_series(hu[:, :, :3], tmp_path / "x" / "a", seed=1, **common)
    b = dicom.write_series(hu[:, :, 3:], tmp_path / "x" / "b", seed=2, origin=(0, 0, 15), **common)
    series = _only_series(tmp_path)
    assert series.folder == tmp_path / "x" and len(series.files) == 6
    np.testing.assert_array_equal(np.asarray(dicom.read_series(series).dataobj), hu)
    b[1].unlink()
    with pytest.raises(DatasetError, match=r"a gap of 10\.00 mm between the slice positions 15"):
        dicom.read_series(_only_series(tmp_path))
    pydicom.dcmread(b[0]).save_as(b[0].with_name("copy"))
    with pytest.raises(DatasetError, match=r"b/\w+ and b/\w+ share the slice position 15\.00"):
        dicom.read_series(_only_series(tmp_path))
