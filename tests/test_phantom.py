"""Tests of the synthetic CT-ICH phantom (ichseg.data.phantom): layouts, labels, HU, CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ichseg.cli import phantom as phantom_cli
from ichseg.data import phantom
from ichseg.data.ctich import open_dataset
from ichseg.data.phantom import (
    LABEL_COLUMNS,
    NIFTI_PATIENT_IDS,
    SUBTYPES,
    PhantomManifest,
    Tissue,
    generate_phantom,
    make_head_volume,
    parse_slices,
    patient_ids,
)
from ichseg.data.phantom import write as phantom_write
from ichseg.errors import ConfigError, DatasetError, IchsegError

SIZE = 96


# --------------------------------------------------------------------------------------------------
# Shared phantoms (generated once per module)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nifti(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    root = tmp_path_factory.mktemp("nifti") / "ct-ich"
    return generate_phantom(root, "nifti", n_patients=12, n_slices=(9, 12), size=SIZE, seed=1)


@pytest.fixture(scope="module")
def jpg(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    root = tmp_path_factory.mktemp("jpg") / "ct-ich"
    return generate_phantom(root, "jpg", n_patients=6, n_slices=10, size=SIZE, seed=1)


def read_csv_rows(path: Path, encoding: str = "utf-8-sig") -> list[list[str]]:
    with open(path, encoding=encoding, newline="") as handle:
        return list(csv.reader(handle))


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------


def test_nifti_layout_names_shapes_dtypes_and_header(nifti: PhantomManifest) -> None:
    root = nifti.root
    assert sorted(p.name for p in root.iterdir()) == [
        "Patient_demographics.csv",
        "ct_scans",
        "hemorrhage_diagnosis_raw_ct.csv",
        "ichseg_phantom.json",
        "masks",
    ]
    marker = json.loads((root / "ichseg_phantom.json").read_text())
    assert marker["synthetic"] is True and marker["release"] == "nifti"
    assert (marker["patients"], marker["slices"], marker["size"], marker["seed"]) == (
        12,
        [9, 12],
        SIZE,
        1,
    )
    assert open_dataset(root).synthetic is True
    ids = [p.patient_id for p in nifti.patients]
    assert ids == [49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 66, 67]
    names = [f"{i:03d}.nii" for i in ids]
    assert sorted(p.name for p in (root / "ct_scans").iterdir()) == names
    assert sorted(p.name for p in (root / "masks").iterdir()) == names
    for patient in nifti.patients:
        scan = nib.load(root / "ct_scans" / f"{patient.patient_id:03d}.nii")
        mask = nib.load(root / "masks" / f"{patient.patient_id:03d}.nii")
        assert scan.shape == mask.shape == patient.shape
        assert patient.shape[:2] == (SIZE, SIZE) and 9 <= patient.shape[2] <= 12
        assert scan.get_data_dtype() == np.int16
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert int(scan.header["qform_code"]) == 1 and int(scan.header["sform_code"]) == 1
        np.testing.assert_allclose(scan.affine, mask.affine)
        zooms = tuple(float(z) for z in scan.header.get_zooms())
        assert zooms == patient.spacing
        x, y, z = patient.spacing
        assert x == y and 220 <= x * SIZE <= 250  # field of view in mm, whatever the size
        assert 4.5 <= z <= 5.0
    spacings = {p.spacing for p in nifti.patients}
    assert len(spacings) > 1  # varies per patient


def test_nifti_patient_numbers_skip_059_to_065() -> None:
    ids = patient_ids("nifti", 75)
    assert ids == NIFTI_PATIENT_IDS
    assert len(ids) == 75 and ids[:10] == tuple(range(49, 59)) and ids[10] == 66 and ids[-1] == 130
    assert not set(range(59, 66)) & set(ids)
    assert patient_ids("nifti", 12)[-2:] == (66, 67)
    assert patient_ids("jpg", 82) == tuple(range(49, 131))


def test_jpg_layout_names_sizes_and_masks_only_on_ich_slices(jpg: PhantomManifest) -> None:
    root = jpg.root
    assert sorted(p.name for p in root.iterdir()) == [
        "Patients_CT",
        "hemorrhage_diagnosis.csv",
        "ichseg_phantom.json",
        "patient_demographics.csv",
    ]
    assert sorted(p.name for p in (root / "Patients_CT").iterdir()) == [
        f"{i:03d}" for i in range(49, 55)
    ]
    for patient in jpg.patients:
        assert patient.spacing is None and patient.shape == (SIZE, SIZE, 10)
        folder = root / "Patients_CT" / f"{patient.patient_id:03d}"
        assert sorted(p.name for p in folder.iterdir()) == ["bone", "brain"]
        ich = patient.subtypes.any(axis=1)
        expected_brain = {f"{k}.jpg" for k in range(1, 11)}
        expected_brain |= {f"{k}_HGE_Seg.jpg" for k in range(1, 11) if ich[k - 1]}
        assert {p.name for p in (folder / "brain").iterdir()} == expected_brain
        expected_bone = {f"{k}.jpg" for k in range(1, 11) if k not in patient.missing_bone_slices}
        assert {p.name for p in (folder / "bone").iterdir()} == expected_bone
        with Image.open(folder / "brain" / "1.jpg") as image:
            assert image.format == "JPEG" and image.mode == "L" and image.size == (SIZE, SIZE)
        with Image.open(folder / "bone" / "1.jpg") as image:
            assert image.mode == "L" and image.size == (SIZE, SIZE)


@pytest.mark.parametrize(("release", "size"), [("nifti", 512), ("jpg", 650)])
def test_default_image_size_per_release(tmp_path: Path, release: str, size: int) -> None:
    manifest = generate_phantom(tmp_path / "out", release, n_patients=1, n_slices=2, seed=3)
    assert manifest.patients[0].shape == (size, size, 2)
    if release == "nifti":
        assert nib.load(tmp_path / "out" / "ct_scans" / "049.nii").shape == (size, size, 2)
    else:
        with Image.open(tmp_path / "out" / "Patients_CT" / "049" / "brain" / "1.jpg") as image:
            assert image.size == (size, size)
    assert phantom.DEFAULT_PATIENTS == {"nifti": 75, "jpg": 82}


def test_slice_count_range_is_drawn_per_patient(nifti: PhantomManifest) -> None:
    counts = {p.n_slices for p in nifti.patients}
    assert counts <= set(range(9, 13)) and len(counts) > 1


def test_parse_slices() -> None:
    assert parse_slices(12) == (12, 12)
    assert parse_slices("12") == (12, 12)
    assert parse_slices("30-40") == (30, 40)
    assert parse_slices((30, 40)) == (30, 40)
    for bad in ("abc", "40-30", "0", "3-", "-3", "1-2-3", "5.5"):
        with pytest.raises(ConfigError):
            parse_slices(bad)


# --------------------------------------------------------------------------------------------------
# CSV files
# --------------------------------------------------------------------------------------------------


def test_label_csv_bom_and_line_endings(nifti: PhantomManifest, jpg: PhantomManifest) -> None:
    jpg_bytes = (jpg.root / "hemorrhage_diagnosis.csv").read_bytes()
    assert jpg_bytes.startswith(b"\xef\xbb\xbfPatientNumber,SliceNumber,")
    assert jpg_bytes.count(b"\n") == jpg_bytes.count(b"\r\n") > 0
    nifti_bytes = (nifti.root / "hemorrhage_diagnosis_raw_ct.csv").read_bytes()
    assert nifti_bytes.startswith(b"PatientNumber,SliceNumber,")
    assert b"\r" not in nifti_bytes


@pytest.mark.parametrize("release", ["nifti", "jpg"])
def test_label_csv_rows_match_manifest(
    release: str, nifti: PhantomManifest, jpg: PhantomManifest
) -> None:
    manifest = nifti if release == "nifti" else jpg
    name = "hemorrhage_diagnosis_raw_ct.csv" if release == "nifti" else "hemorrhage_diagnosis.csv"
    rows = read_csv_rows(manifest.root / name)
    assert tuple(rows[0]) == LABEL_COLUMNS
    body = rows[1:]
    assert len(body) == manifest.n_slices
    assert all(len(r) == 9 and all(v.isdigit() for v in r) for r in body)
    expected = [
        [
            str(p.patient_id),
            str(k + 1),
            *(str(int(x)) for x in p.subtypes[k]),
            str(int(not p.subtypes[k].any())),
            str(int(p.fracture[k])),
        ]
        for p in manifest.patients
        for k in range(p.n_slices)
    ]
    assert body == expected
    assert body[0][0] == "49"  # plain integers, not 049


def test_jpg_demographics_header_is_exact(jpg: PhantomManifest) -> None:
    path = jpg.root / "patient_demographics.csv"
    assert path.read_bytes().startswith(b'"Patient Number","Age\n(years)","Gender",')
    rows = read_csv_rows(path)
    assert rows[0] == [
        "Patient Number",
        "Age\n(years)",
        "Gender",
        "Intraventricular",
        "Intraparenchymal",
        "Subarachnoid",
        "Epidural",
        "Subdural",
        "Fracture (Yes/No)",
        "Condition on file",
        "Note",
    ]
    body = rows[1:]
    assert [int(r[0]) for r in body] == [p.patient_id for p in jpg.patients]
    for row, patient in zip(body, jpg.patients, strict=True):
        assert len(row) == 11
        assert float(row[1]) == patient.age and row[2] == patient.gender
        assert row[3:8] == ["1" if x else "" for x in patient.subtypes.any(axis=0)]
        assert row[8] == ("1" if patient.fracture.any() else "")
        assert row[9] == ("Hemorrhage" if patient.has_ich else "No Hemorrhage")


def test_nifti_demographics_two_header_rows_are_exact(nifti: PhantomManifest) -> None:
    path = nifti.root / "Patient_demographics.csv"
    assert path.read_text(encoding="utf-8").startswith(
        'Patient Number,"Age\n(years)",Gender,Hemorrhage type based on the radiologists '
        "diagnosis ,,,,,Fracture (yes 1/no 0),Note1\n"
        ",,,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,,\n"
    )
    rows = read_csv_rows(path, encoding="utf-8")
    assert rows[0] == [
        "Patient Number",
        "Age\n(years)",
        "Gender",
        "Hemorrhage type based on the radiologists diagnosis ",
        "",
        "",
        "",
        "",
        "Fracture (yes 1/no 0)",
        "Note1",
    ]
    assert rows[1] == ["", "", "", *phantom.SUBTYPE_COLUMNS, "", ""]
    body = rows[2:]
    assert [int(r[0]) for r in body] == [p.patient_id for p in nifti.patients]
    for row, patient in zip(body, nifti.patients, strict=True):
        assert len(row) == 10
        assert row[3:8] == ["1" if x else "" for x in patient.subtypes.any(axis=0)]
        assert row[8] == ("1" if patient.fracture.any() else "")


def test_demographics_look_like_the_cohort() -> None:
    plans = [
        phantom._plan_patient(seed, i, pid, (30, 40))
        for seed in range(10)
        for i, pid in enumerate(patient_ids("jpg", 82))
    ]
    ages = np.array([p.age for p in plans])
    assert 22 <= ages.mean() <= 34 and 13 <= ages.std() <= 25
    assert (ages < 18).mean() > 0.15 and (ages < 1).any() and (ages != np.round(ages)).any()
    male = np.mean([p.gender == "Male" for p in plans])
    assert 0.48 <= male <= 0.64
    with_ich = np.mean([bool(p.subtypes) for p in plans])
    assert 0.35 <= with_ich <= 0.55


# --------------------------------------------------------------------------------------------------
# Masks and labels
# --------------------------------------------------------------------------------------------------


def test_nifti_masks_match_labels(nifti: PhantomManifest) -> None:
    for patient in nifti.patients:
        mask = np.asarray(nib.load(nifti.root / "masks" / f"{patient.patient_id:03d}.nii").dataobj)
        pixels = (mask > 0).sum(axis=(0, 1))
        np.testing.assert_array_equal(pixels, patient.mask_pixels)
        np.testing.assert_array_equal(pixels > 0, patient.subtypes.any(axis=1))
        assert patient.mask_pixels.dtype == np.int64
        assert patient.subtypes.shape == (patient.n_slices, 5)
        assert patient.fracture.shape == (patient.n_slices,)


def test_jpg_masks_match_labels_with_the_127_threshold(jpg: PhantomManifest) -> None:
    for patient in jpg.patients:
        brain = jpg.root / "Patients_CT" / f"{patient.patient_id:03d}" / "brain"
        for k in range(patient.n_slices):
            path = brain / f"{k + 1}_HGE_Seg.jpg"
            if not patient.subtypes[k].any():
                assert not path.exists() and patient.mask_pixels[k] == 0
                continue
            with Image.open(path) as image:
                decoded = np.asarray(image.convert("L"))
            assert decoded.shape == (SIZE, SIZE)
            assert int((decoded > 127).sum()) == patient.mask_pixels[k] > 0


def test_same_patient_in_memory_gives_consistent_labels() -> None:
    hu, mask, labels = make_head_volume(
        np.random.default_rng(5), 16, 128, with_ich=True, spacing_mm=1.8, subtypes=SUBTYPES
    )
    assert hu.dtype == np.int16 and mask.dtype == bool and hu.shape == mask.shape == (128, 128, 16)
    bits = labels["subtype_map"]
    np.testing.assert_array_equal(mask, bits > 0)
    np.testing.assert_array_equal(labels["tissue"] == Tissue.BLEED, mask)
    for i in range(5):
        has = ((bits >> i) & 1).astype(bool).any(axis=(0, 1))
        np.testing.assert_array_equal(has, labels["subtypes"][:, i])
    assert labels["subtypes"].any(axis=0).all()  # all five subtypes made it into this scan


def test_all_five_subtypes_and_fractures_appear(nifti: PhantomManifest) -> None:
    per_subtype = np.sum([p.subtypes.sum(axis=0) for p in nifti.patients], axis=0)
    assert (per_subtype > 0).all(), dict(zip(SUBTYPES, per_subtype, strict=True))
    assert any(p.fracture.any() for p in nifti.patients)
    assert any(not p.has_ich for p in nifti.patients)
    with_fracture = [p for p in nifti.patients if p.fracture.any()]
    assert all(1 <= p.fracture.sum() <= 4 for p in with_fracture)


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_lesions_are_continuous_3d_shapes(subtype: str) -> None:
    _, mask, labels = make_head_volume(
        np.random.default_rng(11), 30, 128, with_ich=True, spacing_mm=1.8, subtypes=(subtype,)
    )
    slices = np.flatnonzero(labels["subtypes"][:, SUBTYPES.index(subtype)])
    assert slices.size >= 2
    assert np.all(np.diff(slices) == 1), slices  # one run of consecutive slices
    for a, b in zip(slices[:-1], slices[1:], strict=True):
        assert (mask[:, :, a] & mask[:, :, b]).any()  # neighbouring cuts overlap
    if subtype in ("EDH", "SDH", "IPH"):  # an ellipsoid-like cut: grows, then shrinks
        areas = mask[:, :, slices].sum(axis=(0, 1))
        assert areas[0] < areas.max() and areas[-1] < areas.max()


def test_ich_stays_a_small_fraction_of_slices_and_pixels(tmp_path: Path) -> None:
    manifest = generate_phantom(tmp_path / "p", "nifti", n_patients=24, n_slices=(30, 40), size=64)
    slices_with_ich = manifest.n_ich_slices / manifest.n_slices
    pixels = sum(int(p.mask_pixels.sum()) for p in manifest.patients)
    total = sum(int(np.prod(p.shape)) for p in manifest.patients)
    assert 0.03 <= slices_with_ich <= 0.2
    assert 0 < pixels / total < 0.01


# --------------------------------------------------------------------------------------------------
# Does it look like CT?
# --------------------------------------------------------------------------------------------------


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Erode in-plane by one pixel (to measure a tissue away from partial-volume edges)."""
    structure = np.zeros((3, 3, 1), dtype=bool)
    structure[:, :, 0] = True
    return ndimage.binary_erosion(mask, structure=structure)


def test_hounsfield_units_look_like_head_ct() -> None:
    hu, mask, labels = make_head_volume(
        np.random.default_rng(0),
        12,
        256,
        with_ich=True,
        spacing_mm=0.9,
        age=40,
        subtypes=SUBTYPES,
        calcifications=True,
    )
    tissue = labels["tissue"]

    def median(code: Tissue) -> float:
        return float(np.median(hu[_eroded(tissue == code)]))

    assert -1010 <= median(Tissue.AIR) <= -990
    assert 700 <= median(Tissue.BONE) <= 1800
    assert 20 <= median(Tissue.SCALP) <= 60
    assert 35 <= median(Tissue.GREY) <= 46
    assert 18 <= median(Tissue.WHITE) <= 32
    assert median(Tissue.GREY) - median(Tissue.WHITE) >= 6  # grey / white contrast
    assert 0 <= median(Tissue.CSF) <= 15
    assert 50 <= float(np.median(hu[_eroded(mask)])) <= 90
    noise = hu[_eroded(tissue == Tissue.WHITE)].std()
    assert 3 <= noise <= 8
    assert (hu[tissue == Tissue.AIR] >= -1024).all() and hu.max() <= 3071
    # Dome: the head cross-section is largest in the middle slices.
    head = (tissue != Tissue.AIR) & (tissue != Tissue.HEADREST)
    area = head.sum(axis=(0, 1))
    assert area[len(area) // 2] > area[-1] and area[len(area) // 2] > area[0]


def test_children_have_smaller_heads() -> None:
    areas = {}
    for age in (0.5, 40.0):
        _, _, labels = make_head_volume(
            np.random.default_rng(2), 5, 128, with_ich=False, spacing_mm=1.8, age=age
        )
        tissue = labels["tissue"][:, :, 2]
        areas[age] = int(((tissue != Tissue.AIR) & (tissue != Tissue.HEADREST)).sum())
    assert areas[0.5] < 0.8 * areas[40.0]


def test_confounders_in_the_bleed_range_outside_the_mask() -> None:
    hu, mask, labels = make_head_volume(
        np.random.default_rng(4), 10, 256, with_ich=False, spacing_mm=0.9, calcifications=True
    )
    tissue = labels["tissue"]
    assert not mask.any()
    head = (tissue != Tissue.AIR) & (tissue != Tissue.HEADREST)
    in_range = (hu >= 50) & (hu <= 90) & head
    assert in_range.sum() > 500  # a plain 50-90 HU threshold finds bleed-like pixels anyway
    # Partial-volume rim: brain pixels touching the skull pass through 50-150 HU.
    near_bone = ndimage.binary_dilation(tissue == Tissue.BONE, structure=np.ones((3, 3, 1), bool))
    rim = near_bone & np.isin(tissue, [Tissue.GREY, Tissue.CSF]) & (hu >= 50) & (hu <= 150)
    assert rim.sum() > 100
    calcified = tissue == Tissue.CALCIFICATION
    assert calcified.any() and np.median(hu[calcified]) >= 100


def test_fracture_is_a_gap_in_the_skull_flagged_per_slice() -> None:
    _, _, labels = make_head_volume(
        np.random.default_rng(8), 20, 128, with_ich=False, spacing_mm=1.8, fracture=True
    )
    flagged = np.flatnonzero(labels["fracture"])
    assert 1 <= flagged.size <= 4 and np.all(np.diff(flagged) == 1)
    _, _, without = make_head_volume(
        np.random.default_rng(8), 20, 128, with_ich=False, spacing_mm=1.8, fracture=False
    )
    assert not without["fracture"].any()
    # The gap replaces bone by soft tissue on the flagged slices only.
    bone_lost = (without["tissue"] == Tissue.BONE) & (labels["tissue"] == Tissue.SCALP)
    assert set(np.flatnonzero(bone_lost.any(axis=(0, 1)))) == set(flagged)


# --------------------------------------------------------------------------------------------------
# Determinism and quirks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", ["nifti", "jpg"])
def test_same_seed_gives_identical_bytes(tmp_path: Path, release: str) -> None:
    def make(name: str, seed: int, n: int = 3) -> dict[str, str]:
        generate_phantom(tmp_path / name, release, n_patients=n, n_slices=6, size=64, seed=seed)
        return tree_digest(tmp_path / name)

    first, second, other = make("a", 7), make("b", 7), make("c", 8)
    assert first == second
    assert first.keys() == other.keys() or release == "jpg"
    assert any(first[k] != other.get(k) for k in first)
    # A smaller phantom holds the same first patients.
    subset = make("d", 7, n=2)
    scans = [k for k in subset if k.endswith((".nii", ".jpg"))]
    assert scans and all(subset[k] == first[k] for k in scans)


def test_missing_bone_jpg_quirk(jpg: PhantomManifest) -> None:
    missing = {p.patient_id: p.missing_bone_slices for p in jpg.patients if p.missing_bone_slices}
    second = jpg.patients[1]
    assert missing == {second.patient_id: (second.n_slices,)}
    folder = jpg.root / "Patients_CT" / f"{second.patient_id:03d}"
    assert (folder / "brain" / f"{second.n_slices}.jpg").exists()
    assert not (folder / "bone" / f"{second.n_slices}.jpg").exists()


def test_missing_bone_is_084_slice_36_when_it_exists() -> None:
    plans = [
        phantom._plan_patient(0, i, pid, (30, 40)) for i, pid in enumerate(patient_ids("jpg", 40))
    ]
    assert phantom._missing_bone(plans) == {84: (36,)}
    short = [phantom._plan_patient(0, i, pid, (10, 10)) for i, pid in enumerate(range(49, 90))]
    assert phantom._missing_bone(short) == {50: (10,)}


def test_full_size_jpg_phantom_has_the_real_missing_bone(tmp_path: Path) -> None:
    manifest = generate_phantom(tmp_path / "j", "jpg", n_patients=36, n_slices=(36, 40), size=64)
    patient = next(p for p in manifest.patients if p.patient_id == 84)
    assert patient.missing_bone_slices == (36,)
    assert not (tmp_path / "j" / "Patients_CT" / "084" / "bone" / "36.jpg").exists()


# --------------------------------------------------------------------------------------------------
# Output folder handling and the command line
# --------------------------------------------------------------------------------------------------


def test_existing_output_is_refused_and_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate_phantom(out, n_patients=1, n_slices=2, size=64)
    before = tree_digest(out)
    with pytest.raises(DatasetError, match=str(out)):
        generate_phantom(out, n_patients=1, n_slices=2, size=64, seed=9)
    assert tree_digest(out) == before
    generate_phantom(out, n_patients=1, n_slices=2, size=64, seed=9, overwrite=True)
    assert tree_digest(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_overwrite_refuses_a_folder_with_foreign_files(tmp_path: Path) -> None:
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="thesis.tex, which is not a file of an ichseg phantom"):
        generate_phantom(out, n_patients=1, n_slices=2, size=64, overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    generate_phantom(tmp_path / "empty", "jpg", n_patients=1, n_slices=2, size=64)
    assert (tmp_path / "empty" / "hemorrhage_diagnosis.csv").exists()


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantom_write, "_write_label_csv", boom)
    with pytest.raises(RuntimeError):
        generate_phantom(tmp_path / "out", n_patients=1, n_slices=2, size=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"release": "dicom"},
        {"n_patients": 0},
        {"size": 8},
        {"n_slices": "10-5"},
        {"n_slices": 0},
    ],
)
def test_bad_arguments_raise_ichseg_errors(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(IchsegError):
        generate_phantom(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_phantom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [str(out), "--release", "jpg", "--patients", "2", "--slices", "3-4", "--size", "64"]
    assert phantom.main([*argv, "--seed", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert str(out) in captured.out and captured.err == ""
    assert sorted(p.name for p in (out / "Patients_CT").iterdir()) == ["049", "050"]


def test_cli_refuses_non_empty_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [str(out), "--patients", "1", "--slices", "2", "--size", "64", "--no-progress"]
    assert phantom_cli.main(argv) == 0
    before = tree_digest(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        phantom_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "error" in err
    assert tree_digest(out) == before
    assert phantom_cli.main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("slices", ["abc", "5-3", "0", "4-"])
def test_cli_rejects_bad_slices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], slices: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        phantom_cli.main([str(tmp_path / "out"), "--slices", slices, "--no-progress"])
    assert exit_info.value.code == 2
    assert "--slices" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_runs(tmp_path: Path) -> None:
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "ichseg.data.phantom", str(out), "--patients", "1"]
    cmd += ["--slices", "2", "--size", "64", "--no-progress"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "ct_scans" / "049.nii").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and str(out) in again.stderr
    assert "Traceback" not in again.stderr


def test_jpg_brain_window_matches_the_library_formula(jpg: PhantomManifest) -> None:
    """Brain JPGs decode to the 40/120 window of a plausible head: dark air, white skull."""
    with Image.open(jpg.root / "Patients_CT" / "049" / "brain" / "5.jpg") as image:
        brain = np.asarray(image)
    with Image.open(jpg.root / "Patients_CT" / "049" / "bone" / "5.jpg") as image:
        bone = np.asarray(image)
    assert brain[0, 0] <= 5 and bone[0, 0] <= 5  # air
    assert (brain >= 250).mean() > 0.02  # skull saturates the brain window
    assert ((brain > 90) & (brain < 170)).mean() > 0.2  # brain tissue in mid grey
    assert (bone > 200).mean() < 0.05  # in the bone window only bone is bright
    level, width = phantom.BRAIN_WINDOW
    expected = np.clip(
        np.rint((np.array([-1000, 40, 2000]) - (level - width / 2)) / width * 255), 0, 255
    )
    np.testing.assert_array_equal(
        phantom._window_u8(np.array([-1000, 40, 2000]), level, width), expected
    )


def test_manifest_is_what_was_written(nifti: PhantomManifest) -> None:
    assert nifti.release == "nifti" and len(nifti.patients) == 12
    assert nifti.n_slices == sum(p.shape[2] for p in nifti.patients)
    assert isinstance(nifti.root, Path) and nifti.root.is_dir()
    data = io.StringIO((nifti.root / "hemorrhage_diagnosis_raw_ct.csv").read_text())
    assert sum(1 for _ in data) == nifti.n_slices + 1
