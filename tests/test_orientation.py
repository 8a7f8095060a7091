"""Orientation safety: the training scans' orientation is recorded, a scan in another orientation is
brought to it for the network, and its outputs are written in the scan's own space."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import NET, read_rows, save_lightning_checkpoint

from ichseg.checkpoint import load_model
from ichseg.checkpoint import make_meta as checkpoint_meta
from ichseg.data import CTICHDataModule
from ichseg.data.phantom import generate_phantom
from ichseg.errors import ConfigError
from ichseg.io.orientation import Reorientation, axcodes, check_codes, most_common, reorientation
from ichseg.predict import main
from ichseg.specs import InferenceSpec, InputSpec

SPEC = InputSpec(tile_size=32, tile_stride=16, working_size=64, orientation=("L", "A", "S"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("orient-phantom") / "ct-ich"
    return generate_phantom(root, "nifti", n_patients=2, n_slices=6, size=64, seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("orient-ckpt") / "tiny.ckpt"
    meta = checkpoint_meta(NET, SPEC, InferenceSpec(threshold=0.5))
    meta["data"] = {"window": 32}  # the test helper's batch size
    save_lightning_checkpoint(path, meta)
    return path


def test_reorientation_round_trips_every_flip_and_permutation():
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    target = ("L", "A", "S")
    # the same voxels stored with axes (A, L, S) and with axes (R, P, I)
    transposed = Reorientation(("A", "L", "S"), target)
    assert np.array_equal(transposed.forward(data.transpose(1, 0, 2)), data)
    assert transposed.shape((3, 2, 4)) == (2, 3, 4)
    assert transposed.spacing((0.5, 0.4, 5.0)) == (0.4, 0.5, 5.0)
    flipped = Reorientation(("R", "P", "I"), target)
    stored = data[::-1, ::-1, ::-1]
    assert np.array_equal(flipped.forward(stored), data)
    assert np.array_equal(flipped.backward(data), stored)
    assert Reorientation(target, target).identity


def test_axis_codes_are_validated():
    assert check_codes(["l", "a", "s"]) == ("L", "A", "S")
    for bad in (["L", "R", "S"], ["L", "A"], ["X", "A", "S"]):
        with pytest.raises(ValueError, match="one each of L/R, A/P and S/I"):
            check_codes(bad)
    with pytest.raises(ConfigError, match="input spec.orientation"):
        InputSpec(orientation=("L", "L", "S"))
    assert most_common([("L", "A", "S"), ("R", "A", "S"), ("L", "A", "S")]) == ("L", "A", "S")
    assert InputSpec.from_dict(SPEC.to_dict()) == SPEC


def test_the_datamodule_records_the_training_scans_orientation(phantom):
    datamodule = CTICHDataModule(root=phantom.root, tile_size=32, tile_stride=16, working_size=64)
    assert datamodule.input_spec.orientation == ("L", "A", "S")
    scan = next(iter(sorted((phantom.root / "ct_scans").glob("*.nii*"))))
    assert axcodes(nib.load(scan).affine) == ("L", "A", "S")


def flipped_copy(source: Path, target: Path) -> None:
    """The same voxels with the first axis reversed and the affine saying so (R, A, S)."""
    image = nib.load(source)
    nib.save(image.slicer[::-1, :, :], target)


def transposed_copy(source: Path, target: Path) -> None:
    """The same voxels with the first two axes swapped and the affine saying so (A, L, S)."""
    image = nib.load(source)
    data = np.asanyarray(image.dataobj).transpose(1, 0, 2)
    affine = image.affine[:, [1, 0, 2, 3]]
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    out.header.set_zooms(image.header.get_zooms())
    nib.save(out, target)


@pytest.mark.parametrize(
    ("variant", "codes", "back"),
    [
        (flipped_copy, "RAS", lambda a: a[::-1, :, :]),
        (transposed_copy, "ALS", lambda a: a.transpose(1, 0, 2)),
    ],
)
def test_a_reoriented_scan_predicts_the_same_voxels(
    phantom, checkpoint, tmp_path, capsys, variant, codes, back
):
    scan = sorted((phantom.root / "ct_scans").glob("*.nii*"))[0]
    folder = tmp_path / "scans"
    folder.mkdir()
    original = folder / "a.nii.gz"
    nib.save(nib.load(scan), original)
    variant(scan, folder / "b.nii.gz")
    assert "".join(axcodes(nib.load(folder / "b.nii.gz").affine)) == codes
    output = tmp_path / "out"
    args = [f"ckpt={checkpoint}", f"input={folder}", f"output={output}", "progress=false"]
    assert main([*args, "save_probabilities=true", "inference.threshold=0.45"]) == 0
    out = capsys.readouterr().out
    assert "b.nii.gz: " in out and f"scan oriented {','.join(codes)}: reoriented" in out
    assert "a.nii.gz: " in out and out.count("reoriented for the model") == 1
    for kind in ("ich_seg", "prob"):
        a = nib.load(output / f"a_{kind}.nii.gz")
        b = nib.load(output / f"b_{kind}.nii.gz")
        assert b.shape == nib.load(folder / "b.nii.gz").shape
        np.testing.assert_allclose(b.affine, nib.load(folder / "b.nii.gz").affine, atol=1e-5)
        np.testing.assert_array_equal(back(np.asanyarray(b.dataobj)), np.asanyarray(a.dataobj))
    prob = np.asanyarray(nib.load(output / "a_prob.nii.gz").dataobj)
    assert prob.std() > 0  # the network saw an image, not a constant
    rows = {row["mask"]: row for row in read_rows(output / "volumes.csv")}
    assert rows["a_ich_seg.nii.gz"]["orientation"] == "LAS"
    assert rows["b_ich_seg.nii.gz"]["orientation"] == codes
    for column in ("ich_voxels", "ich_slices", "slices", "components"):
        assert rows["a_ich_seg.nii.gz"][column] == rows["b_ich_seg.nii.gz"][column]


def test_a_model_trained_in_another_orientation_sees_scans_in_its_own(phantom, tmp_path):
    """A checkpoint that records R,A,S gets CT-ICH's L,A,S scans flipped before the network."""
    from ichseg.inference.scans import find_inputs, load_predictor, predict_files

    las = tmp_path / "las.ckpt"
    meta = checkpoint_meta(NET, SPEC, InferenceSpec())
    meta["data"] = {"window": 32}
    save_lightning_checkpoint(las, meta)
    checkpoint = torch.load(las, weights_only=True)
    checkpoint["ichseg"]["input"]["orientation"] = ["R", "A", "S"]
    ras = tmp_path / "ras.ckpt"
    torch.save(checkpoint, ras)
    assert load_model(ras).input_spec.orientation == ("R", "A", "S")
    scan = sorted((phantom.root / "ct_scans").glob("*.nii*"))[0]
    predictor = load_predictor(ras, device="cpu")
    (result,) = predict_files(
        predictor, find_inputs(scan), tmp_path / "out", save_probabilities=True, progress=False
    )
    assert result.reoriented and result.orientation == ("L", "A", "S")
    written = np.asanyarray(nib.load(result.probability_path).dataobj)
    hu = np.asanyarray(nib.load(scan).dataobj)
    expected, _ = predictor.predict_hu(np.ascontiguousarray(hu[::-1]))  # what the network saw
    np.testing.assert_array_equal(written, expected[::-1])
    assert reorientation(nib.load(scan).affine, ("R", "A", "S")).source == ("L", "A", "S")
