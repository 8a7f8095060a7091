"""Reading both CT-ICH releases: round trip on the phantom, quirks, laziness, errors."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from ichseg.data import open_dataset
from ichseg.data.ctich import find_release
from ichseg.errors import ConfigError, DatasetError, DatasetProblems


def test_nifti_round_trip(nifti_phantom):
    dataset = open_dataset(nifti_phantom.root)
    assert dataset.release == "nifti"
    expected = {p.patient_id: p for p in nifti_phantom.patients}
    assert dataset.patient_ids == sorted(expected)
    assert not set(range(59, 66)) & set(dataset.patient_ids)  # the release's gap
    for scan in dataset:
        truth = expected[scan.patient_id]
        assert scan.image.dtype == np.int16 and scan.image.shape == truth.shape
        assert scan.mask.dtype == bool and scan.mask.shape == truth.shape
        np.testing.assert_array_equal(scan.mask.sum(axis=(0, 1)), truth.mask_pixels)
        np.testing.assert_array_equal(scan.labels.subtypes, truth.subtypes)
        np.testing.assert_array_equal(scan.labels.fracture, truth.fracture)
        np.testing.assert_array_equal(scan.labels.no_hemorrhage, ~truth.subtypes.any(axis=1))
        assert scan.demographics.age == pytest.approx(truth.age)
        assert scan.demographics.gender == truth.gender
        np.testing.assert_allclose(scan.spacing, truth.spacing, rtol=1e-6)
        assert scan.affine.shape == (4, 4)
        np.testing.assert_allclose(np.abs(np.diag(scan.affine)[:3]), truth.spacing, rtol=1e-6)
        assert scan.voxel_volume_ml == pytest.approx(np.prod(truth.spacing) / 1000)
        assert scan.paths["image"].name == f"{scan.patient_id:03d}.nii"


def test_jpg_round_trip(jpg_phantom):
    dataset = open_dataset(jpg_phantom.root)
    assert dataset.release == "jpg"
    expected = {p.patient_id: p for p in jpg_phantom.patients}
    assert dataset.patient_ids == list(range(49, 55))
    missing_seen = False
    for scan in dataset:
        truth = expected[scan.patient_id]
        assert scan.image.dtype == np.uint8 and scan.image.shape == truth.shape == (110, 110, 8)
        assert scan.bone.shape == truth.shape
        np.testing.assert_array_equal(scan.mask.sum(axis=(0, 1)), truth.mask_pixels)
        np.testing.assert_array_equal(scan.labels.subtypes, truth.subtypes)
        assert scan.demographics.age == pytest.approx(truth.age)
        assert scan.spacing is None and scan.affine is None and scan.voxel_volume_ml is None
        assert scan.missing_bone_slices == truth.missing_bone_slices
        for number in scan.missing_bone_slices:  # zero-filled
            missing_seen = True
            assert not scan.bone[:, :, number - 1].any()
    assert missing_seen, "the phantom leaves out one bone JPG like the real release"


def test_jpg_masks_are_binarised_above_127(jpg_copy):
    dataset = open_dataset(jpg_copy)
    patient = next(p for p in dataset.patient_ids if dataset.labels[p].has_ich.any())
    k = int(np.flatnonzero(dataset.labels[patient].has_ich)[0]) + 1
    from PIL import Image

    mask_path = jpg_copy / "Patients_CT" / f"{patient:03d}" / "brain" / f"{k}_HGE_Seg.jpg"
    grey = np.zeros((110, 110), np.uint8)
    grey[:, :40] = 127  # lossy grey: not mask
    grey[:, 40:60] = 128  # just above: mask
    Image.fromarray(grey).save(mask_path, quality=100)
    scan = dataset.load(patient)
    decoded = np.asarray(Image.open(mask_path))
    np.testing.assert_array_equal(scan.mask[:, :, k - 1], decoded > 127)
    assert 0 < scan.mask[:, :, k - 1].sum() < 110 * 40


def test_windowed_slices(nifti_phantom, jpg_phantom):
    scan = open_dataset(nifti_phantom.root).load(49)
    stacked = scan.windowed(("brain", "bone", "subdural"), np.float32)
    n, (h, w) = scan.n_slices, scan.shape[:2]
    assert stacked.shape == (n, 3, h, w) and stacked.flags.c_contiguous
    assert 0.0 <= stacked.min() and stacked.max() <= 1.0
    hu = scan.image[:, :, 2].astype(float)
    np.testing.assert_allclose(stacked[2, 0], np.clip((hu + 20) / 120, 0, 1), atol=1e-6)
    assert scan.mask_slices().shape == (n, h, w)
    jpg_scan = open_dataset(jpg_phantom.root).load(49)
    both = jpg_scan.windowed(("brain", "bone"), np.uint8)
    np.testing.assert_array_equal(both[:, 0], np.moveaxis(jpg_scan.image, 2, 0))
    with pytest.raises(ConfigError, match="only brain and bone windows, not 'subdural'"):
        jpg_scan.windowed(("subdural",))


def test_patient_labels_table(nifti_phantom):
    dataset = open_dataset(nifti_phantom.root)
    table = dataset.patient_labels()
    assert table.shape == (12, 6)
    for row, patient in enumerate(nifti_phantom.patients):
        assert table[row, 0] == patient.subtypes.any()
        np.testing.assert_array_equal(table[row, 1:], patient.subtypes.any(axis=0))


def test_nii_gz_and_float_masks_are_accepted(nifti_copy):
    scan_path = nifti_copy / "ct_scans" / "050.nii"
    mask_path = nifti_copy / "masks" / "050.nii"
    original = open_dataset(nifti_copy).load(50)
    with open(scan_path, "rb") as src, gzip.open(scan_path.with_suffix(".nii.gz"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    scan_path.unlink()
    mask = nib.load(mask_path)
    float_mask = nib.Nifti1Image(np.asarray(mask.dataobj).astype(np.float32) * 0.7, mask.affine)
    nib.save(float_mask, nifti_copy / "masks" / "050.nii.gz")
    mask_path.unlink()
    scan = open_dataset(nifti_copy).load(50)
    np.testing.assert_array_equal(scan.image, original.image)
    np.testing.assert_array_equal(scan.mask, original.mask)
    assert scan.paths["image"].name == "050.nii.gz"


def test_scaled_float_scan_is_rounded_back_to_int16(nifti_copy):
    path = nifti_copy / "ct_scans" / "049.nii"
    original = open_dataset(nifti_copy).load(49)
    img = nib.load(path, mmap=False)
    as_float = nib.Nifti1Image(original.image.astype(np.float32), img.affine, img.header)
    as_float.set_data_dtype(np.float32)
    nib.save(as_float, path)
    scan = open_dataset(nifti_copy).load(49)
    assert scan.image.dtype == np.int16
    np.testing.assert_array_equal(scan.image, original.image)


def test_root_may_hold_the_release_folder(nifti_phantom):
    root, release = find_release(nifti_phantom.root.parent)
    assert (root, release) == (nifti_phantom.root, "nifti")


def test_loading_is_lazy(nifti_copy):
    dataset = open_dataset(nifti_copy)  # reads the CSVs only
    (nifti_copy / "ct_scans" / "051.nii").write_bytes(b"not a nifti")
    assert 51 in dataset.patient_ids
    dataset.load(49)
    with pytest.raises(DatasetError, match=r"051\.nii: unreadable NIfTI"):
        dataset.load(51)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda root: shutil.rmtree(root / "masks"), r"masks: folder missing"),
        (
            lambda root: (root / "masks" / "052.nii").unlink(),
            r"ct_scans/052\.nii: scan has no mask",
        ),
        (lambda root: (root / "hemorrhage_diagnosis_raw_ct.csv").unlink(), r"label CSV missing"),
        (
            lambda root: (root / "ct_scans" / "053.nii").unlink(),
            r"masks/053\.nii: mask has no scan",
        ),
        (
            lambda root: [(root / sub / "053.nii").unlink() for sub in ("ct_scans", "masks")],
            r"rows for patient 53 but no images",
        ),
    ],
    ids=[
        "no-masks-folder",
        "scan-without-mask",
        "no-label-csv",
        "mask-without-scan",
        "rows-without-images",
    ],
)
def test_structural_problems_raise_with_file_names(nifti_copy, damage, message):
    damage(nifti_copy)
    with pytest.raises(DatasetError, match=message):
        open_dataset(nifti_copy)


def test_several_problems_are_reported_together(nifti_copy):
    (nifti_copy / "masks" / "052.nii").unlink()
    (nifti_copy / "masks" / "054.nii").unlink()
    with pytest.raises(DatasetProblems) as info:
        open_dataset(nifti_copy)
    assert len(info.value.problems) == 2
    assert "052.nii" in str(info.value) and "054.nii" in str(info.value)


def test_mask_shape_mismatch(nifti_copy):
    mask = nib.load(nifti_copy / "masks" / "049.nii", mmap=False)
    nib.save(
        nib.Nifti1Image(np.asarray(mask.dataobj)[:, :-1], mask.affine),
        nifti_copy / "masks" / "049.nii",
    )
    with pytest.raises(
        DatasetError,
        match=r"masks/049\.nii: mask shape \(96, 95, \d+\) differs from its scan 049\.nii",
    ):
        open_dataset(nifti_copy).load(49)


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="is empty"):
        open_dataset(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a CT-ICH release"):
        open_dataset(tmp_path)
