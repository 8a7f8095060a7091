"""StitchedEvaluation: an oracle scores 1, an empty model 0, each test slice once, files, logs."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from ichseg.data.datamodule import CTICHDataModule
from ichseg.data.layout import PHANTOM_MARKER
from ichseg.errors import ConfigError
from ichseg.eval.counts import SliceCounts
from ichseg.eval.markdown import SYNTHETIC_BANNER
from ichseg.eval.postprocess import grid_scale
from ichseg.eval.scoring import EvaluationData, ShardResult, merge_shards, shard_patients
from ichseg.eval.tables import PatientInfo
from ichseg.lit.callbacks.stitched_eval import StitchedEvaluation
from ichseg.lit.segmentation import ICHSegmentationModule

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


class Oracle(nn.Module):
    """Logits +-20 from channel 0 thresholded at 0.5: perfect when channel 0 holds the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] - 0.5) * self.scale


class Empty(nn.Module):
    """Predicts nothing anywhere (the paper's full-slice U-Net)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, :1]) + self.bias


def oracle_datamodule(root: Path, **options) -> CTICHDataModule:
    """A datamodule whose working-size images hold the working-size masks (255 = ICH)."""
    defaults = {"k": 3, "exclude": (), "batch_size": 16, "window": 32, "stride": 16}
    module = CTICHDataModule(root, **{**defaults, **options})
    module.setup("test")
    module.store.images[:, 0] = module.store.mask_slices(slice(None)).astype(np.uint8) * 255
    return module


# working size = the phantom's size: no resampling, so encoding the mask in the image is exact
CASES = {
    "nifti-windowed": ("nifti", {"working_size": 96}),
    "nifti-full_slice": ("nifti", {"working_size": 96, "mode": "full_slice"}),
    "jpg-crop": ("jpg", {"working_size": 108}),  # 110 -> 108: one-pixel border cropped
}


@pytest.fixture(scope="module")
def datamodules(nifti_phantom, jpg_phantom) -> dict[str, CTICHDataModule]:
    roots = {"nifti": nifti_phantom.root, "jpg": jpg_phantom.root}
    return {name: oracle_datamodule(roots[rel], **opts) for name, (rel, opts) in CASES.items()}


def make_trainer(tmp_path: Path, callbacks, logger=False, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def metric(trainer: pl.Trainer, name: str) -> float:
    return float(trainer.callback_metrics[name])


def strict_json(path: Path):
    def reject(constant):
        raise ValueError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def expected_slices(datamodule: CTICHDataModule) -> set[tuple[int, int]]:
    store = datamodule.store
    rows = datamodule.rows("test")
    return set(zip(store.patients[rows].tolist(), store.slice_numbers[rows].tolist(), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_oracle_scores_one_and_every_test_slice_is_written_once(case, datamodules, tmp_path):
    datamodule = datamodules[case]
    callback = StitchedEvaluation(min_area=0, inference={"postprocess": False}, n_overlays=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = make_trainer(tmp_path, [callback], logger=logger)
    results = trainer.test(ICHSegmentationModule(Oracle()), datamodule=datamodule, verbose=False)

    for name in ("dice", "jaccard", "dice_3d"):
        assert metric(trainer, f"test/stitched_{name}") == 1.0
    for t in THRESHOLDS:
        for name in ("sensitivity", "specificity", "accuracy"):
            assert metric(trainer, f"test/stitched_{name}@{t:g}") == 1.0
    assert results[0]["test/stitched_dice"] == 1.0  # also in what trainer.test returns
    # the test split is predicted once, by the stitched pass: no window-level test metrics
    assert "test/dice" not in trainer.callback_metrics
    if case != "jpg-crop":  # the JPG release has no spacing: volumes are undefined
        assert metric(trainer, "test/stitched_abs_error_ml") == 0.0

    report = strict_json(tmp_path / "report.json")
    test_patients = sorted(datamodule.cv_round.test)
    assert report["patients"] == test_patients and report["fold"] == 0 and report["split"] == "test"
    settings = report["settings"]
    assert settings["min_area"] == 0 and settings["thresholds"] == list(THRESHOLDS)
    assert settings["mode"] == datamodule.mode
    assert report["tables"]["segmentation"]["dice"]["mean"] == 1.0
    report_md = (tmp_path / "report.md").read_text()
    assert "Table 5" in report_md
    # a phantom's report says, under its title, that the data is synthetic
    assert settings["synthetic"] is True
    assert report_md.splitlines()[2] == SYNTHETIC_BANNER

    with open(tmp_path / "slices.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = [(int(r["patient"]), int(r["slice"])) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected_slices(datamodule)
    ich = [r for r in rows if int(r["gt_pixels"]) > 0]
    assert ich and all(float(r["dice@0.5"]) == 1.0 for r in ich)
    assert all(r["dice@0.5"] == "" for r in rows if int(r["gt_pixels"]) == 0)
    assert all(int(r["pred_pixels@0.9"]) == int(r["gt_pixels"]) for r in rows)
    # the label CSV's subtype flags travel with their slices (the phantom's labels match its masks)
    flagged = [r for r in rows if any(r[s] == "1" for s in ("IVH", "IPH", "SAH", "EDH", "SDH"))]
    assert flagged == ich
    counts = SliceCounts.load(tmp_path / "counts.npz")
    assert len(counts) == len(rows) and counts.thresholds.tolist() == list(THRESHOLDS)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert any("stitched_best_slices" in tag for tag in events.Tags()["images"])
    text_tags = [tag for tag in events.Tags()["tensors"] if "stitched_report" in tag]
    assert text_tags
    text = events.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert SYNTHETIC_BANNER in text


def test_the_original_masks_are_the_reference(datamodules, tmp_path):
    """The counts' ground truth is the mask on the scan's own grid (here 96 = working size)."""
    datamodule = datamodules["nifti-windowed"]
    callback = StitchedEvaluation(min_area=0, inference={"postprocess": False}, n_overlays=0)
    make_trainer(tmp_path, [callback]).test(
        ICHSegmentationModule(Oracle()), datamodule=datamodule, verbose=False
    )
    merged, _ = callback.results["test"]
    for scan in datamodule.eval_scans("test"):
        rows = merged.counts.patient == scan.patient_id
        np.testing.assert_array_equal(merged.counts.gt_pixels[rows], scan.mask.sum(axis=(0, 1)))
        assert merged.patients[scan.patient_id].age == scan.demographics.age


def test_empty_model_scores_dice_zero_and_specificity_one(datamodules, tmp_path):
    callback = StitchedEvaluation(n_overlays=0)  # the paper's post-processing and 400 px minimum
    trainer = make_trainer(tmp_path, [callback])
    datamodule = datamodules["nifti-windowed"]
    trainer.test(ICHSegmentationModule(Empty()), datamodule=datamodule, verbose=False)
    assert metric(trainer, "test/stitched_dice") == 0.0
    assert metric(trainer, "test/stitched_jaccard") == 0.0
    assert metric(trainer, "test/stitched_dice_3d") == 0.0
    for t in THRESHOLDS:
        assert metric(trainer, f"test/stitched_specificity@{t:g}") == 1.0
        assert metric(trainer, f"test/stitched_sensitivity@{t:g}") == 0.0
    report = strict_json(tmp_path / "report.json")
    assert report["settings"]["min_area"] == 400
    assert report["settings"]["postprocess"]["closing_size"] == 10


def test_data_without_the_phantom_marker_get_no_synthetic_banner(nifti_phantom, tmp_path):
    """The banner follows the marker file, not the patients: the same scans without
    ``ichseg_phantom.json`` (as a real release has none) give a report without it."""
    root = tmp_path / "release"
    shutil.copytree(nifti_phantom.root, root)
    (root / PHANTOM_MARKER).unlink()
    datamodule = oracle_datamodule(root, working_size=96)
    assert datamodule.dataset.synthetic is False
    callback = StitchedEvaluation(min_area=0, inference={"postprocess": False}, n_overlays=0)
    out = tmp_path / "out"
    make_trainer(out, [callback]).test(
        ICHSegmentationModule(Oracle()), datamodule=datamodule, verbose=False
    )
    assert "synthetic" not in strict_json(out / "report.json")["settings"]
    report_md = (out / "report.md").read_text()
    assert "Table 5" in report_md and SYNTHETIC_BANNER not in report_md


def test_gaussian_blending_and_a_resampled_grid_stay_close_to_perfect(nifti_phantom, tmp_path):
    """Working size 128 from 96 (as 640 from 512): probabilities are resampled back to 96."""
    datamodule = oracle_datamodule(nifti_phantom.root, working_size=128)
    callback = StitchedEvaluation(
        min_area=0, inference={"postprocess": False, "blend": "gaussian"}, n_overlays=0
    )
    trainer = make_trainer(tmp_path, [callback])
    trainer.test(ICHSegmentationModule(Oracle()), datamodule=datamodule, verbose=False)
    assert metric(trainer, "test/stitched_dice") > 0.85
    assert metric(trainer, "test/stitched_specificity@0.5") == 1.0


def test_val_split_is_scored_during_fit_for_the_checkpoint(datamodules, tmp_path):
    datamodule = datamodules["nifti-windowed"]
    callback = StitchedEvaluation(
        every_n_val_epochs=2, min_area=0, inference={"postprocess": False}, n_overlays=0
    )
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/stitched_dice", mode="max", every_n_epochs=2
    )
    trainer = make_trainer(
        tmp_path, [callback, checkpoint], enable_checkpointing=True, max_epochs=2,
        limit_train_batches=1, limit_val_batches=1,
    )  # fmt: skip
    model = ICHSegmentationModule(Oracle(), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer.fit(model, datamodule=datamodule)
    assert metric(trainer, "val/stitched_dice") == 1.0
    assert float(checkpoint.best_model_score) == 1.0 and Path(checkpoint.best_model_path).is_file()
    assert set(callback.results["val"][0].counts.patient.tolist()) == set(datamodule.cv_round.val)
    assert not (tmp_path / "report.json").exists()  # files only at test time


def test_a_val_split_at_test_time_goes_into_its_own_folder(datamodules, tmp_path):
    callback = StitchedEvaluation(splits=["val", "test"], min_area=0, n_overlays=0)
    trainer = make_trainer(tmp_path, [callback], logger=False)
    callback.output_dir = tmp_path / "out"
    datamodule = datamodules["nifti-windowed"]
    trainer.test(ICHSegmentationModule(Oracle()), datamodule=datamodule, verbose=False)
    assert strict_json(tmp_path / "out" / "report.json")["split"] == "test"
    assert strict_json(tmp_path / "out" / "val" / "report.json")["split"] == "val"
    assert "val/stitched_dice" in trainer.callback_metrics


def test_bad_options_and_a_missing_datamodule_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="splits"):
        StitchedEvaluation(splits=["train"])
    with pytest.raises(ConfigError, match="unknown key.*closing"):
        StitchedEvaluation(inference={"closing": 10})
    with pytest.raises(ConfigError, match="blend"):
        StitchedEvaluation(inference={"blend": "median"})
    with pytest.raises(ConfigError, match="threshold"):
        StitchedEvaluation(thresholds=[0.5, 1.5])
    off = StitchedEvaluation(inference={"postprocess": False, "closing_size": 10})
    assert off.inference.postprocess_config().steps() == []
    loader = DataLoader([{"image": torch.zeros(1, 8, 8), "mask": torch.zeros(1, 8, 8)}])
    with pytest.raises(ConfigError, match="datamodule"):
        make_trainer(tmp_path, [StitchedEvaluation()]).test(
            ICHSegmentationModule(Oracle()), dataloaders=loader, verbose=False
        )


def test_grid_scale_gives_sizes_at_640():
    assert grid_scale((512, 512), 640, "resize") == (0.8, 0.8)
    assert grid_scale((650, 650), 640, "crop") == (1.0, 1.0)
    assert grid_scale((96, 96), 96, "resize") == pytest.approx((0.15, 0.15))
    assert grid_scale((130, 130), 128, "crop") == pytest.approx((0.2, 0.2))


# --------------------------------------------------------------------------- DDP sharding


def fake_patient(patient: int, n_slices: int, seed: int) -> ShardResult:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 50, n_slices) * (rng.random(n_slices) < 0.5)
    pred = rng.integers(0, 60, (n_slices, 2))
    inter = np.minimum(pred, gt[:, None]) // 2
    counts = SliceCounts(
        np.full(n_slices, patient), np.arange(1, n_slices + 1), (0.5, 0.7), gt, pred, inter, 0.01
    )
    flags = rng.random((n_slices, 6)) < 0.3
    return ShardResult(counts, {patient: PatientInfo(patient, age=30.0)}, flags)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharding_and_merging_cover_every_slice_exactly_once(world_size):
    patients = [49, 50, 51, 52, 66, 67, 70]
    scored = {p: fake_patient(p, 3 + i, seed=i) for i, p in enumerate(patients)}
    shards = [shard_patients(patients, rank, world_size) for rank in range(world_size)]
    assert sorted(p for shard in shards for p in shard) == patients  # disjoint and complete
    assert all(patients.index(p) % world_size == rank for rank, s in enumerate(shards) for p in s)
    parts = [merge_shards([scored[p] for p in shard]) if shard else ShardResult.empty((0.5, 0.7))
             for shard in shards]  # fmt: skip
    parts.append(scored[patients[0]])  # a repeated patient (as DDP padding repeats samples)
    merged = merge_shards(parts)
    counts = merged.counts
    keys = list(zip(counts.patient.tolist(), counts.slice_index.tolist(), strict=True))
    expected = {(p, s) for p in patients for s in range(1, len(scored[p].counts) + 1)}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert keys == sorted(keys)
    assert set(merged.patients) == set(patients)
    for p in patients:  # label flags stay aligned with their slices
        rows = merged.counts.patient == p
        np.testing.assert_array_equal(merged.slice_flags[rows], scored[p].slice_flags)
        np.testing.assert_array_equal(merged.counts.gt_pixels[rows], scored[p].counts.gt_pixels)


def test_merging_rejects_a_slice_scored_twice_differently():
    first, second = fake_patient(49, 4, seed=0), fake_patient(49, 4, seed=1)
    with pytest.raises(ConfigError, match="different"):
        merge_shards([first, second])
    with pytest.raises(ConfigError, match="rank"):
        shard_patients([1, 2], rank=2, world_size=2)


def test_nan_free_scalars_for_a_split_without_ich():
    """No ICH patient: Dice is undefined (NaN scalar) and the JSON says null."""
    from ichseg.eval.report import compute_tables, dumps_json
    from ichseg.eval.scoring import scalar_metrics

    counts = SliceCounts([49, 49], [1, 2], (0.5,), [0, 0], [[0], [0]], [[0], [0]], 0.01)
    tables = compute_tables(counts)
    scalars = scalar_metrics(tables, "test")
    assert math.isnan(scalars["test/stitched_dice"])
    assert scalars["test/stitched_specificity@0.5"] == 1
    assert "NaN" not in dumps_json(tables.to_dict())


# ------------------------------------------------------------------------- through the entry point


def test_train_entry_point_writes_the_stitched_report(tmp_path):
    """`ichseg.train.train` with the composed config (experiment=demo) writes report.json."""
    from ichseg.train import compose_config, train

    run_dir = tmp_path / "run"
    overrides = [
        "experiment=demo", f"paths.log_dir={tmp_path}", f"paths.output_dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}", "data.phantom.patients=8", "data.phantom.slices=6",
        "data.phantom.size=64", "data.k=4", "data.working_size=64", "data.tile_size=32",
        "data.tile_stride=16", "model.net.base_filters=4", "model.net.depth=2",
        "trainer.max_epochs=1", "callbacks.stitched_eval.tune_on_val=false",
        "++trainer.limit_train_batches=2", "callbacks.progress_bar.refresh_rate=0",
    ]  # fmt: skip
    cfg = compose_config(overrides)
    assert cfg.callbacks.stitched_eval.min_area == 400  # in the default callbacks
    metrics = train(cfg)
    report = strict_json(run_dir / "report.json")
    assert report["patients"] and report["settings"]["min_area"] == 400
    assert report["settings"]["postprocess"] == {
        "closing_size": 10, "opening_size": 5, "order": "close-open", "convention": "opencv",
    }  # fmt: skip
    assert "best-epoch000" in report["checkpoint"] and "test/stitched_dice" in metrics
    for name in ("report.md", "slices.csv", "counts.npz"):
        assert (run_dir / name).is_file()
    assert SYNTHETIC_BANNER in (run_dir / "report.md").read_text()  # the demo's phantom says so


def test_overlay_gallery_keeps_the_best_and_worst_slices_once():
    from ichseg.eval.gallery import OverlayGallery, _Overlay

    def item(patient, number, dice):
        blank = np.zeros((4, 4), dtype=np.uint8)
        return _Overlay(dice, 10, patient, number, blank, blank > 0, blank > 0)

    ranks = [OverlayGallery(2), OverlayGallery(2)]
    ranks[0].add([item(49, 1, 0.9), item(49, 2, 0.1), item(49, 3, 0.5)])
    ranks[1].add([item(50, 1, 0.8), item(50, 2, 0.0)])
    gathered = [copy.deepcopy(ranks[0]), copy.deepcopy(ranks[1])]  # as all_gather_object gives
    ranks[0].merge([OverlayGallery(2), *gathered])
    assert [(i.patient, i.slice_number) for i in ranks[0].best] == [(49, 1), (50, 1)]
    assert [(i.patient, i.slice_number) for i in ranks[0].worst] == [(50, 2), (49, 2)]
    dice = np.array([np.nan, 0.2, 0.9, 0.5, np.nan])
    assert OverlayGallery(1).candidates(dice, np.ones(5, int)).tolist() == [1, 2]


def test_the_datamodule_provides_the_evaluation_data(datamodules) -> None:
    """CTICHDataModule is the EvaluationData the callback reads (plain attributes, no getattr)."""
    for datamodule in datamodules.values():
        assert isinstance(datamodule, EvaluationData)
        assert datamodule.dataset.release in ("nifti", "jpg")
        assert isinstance(datamodule.fold, int) and isinstance(datamodule.k, int)


def test_earlier_callback_path_keeps_working() -> None:
    """``ichseg.eval.callback`` re-exports; the Hydra config names the new target."""
    from pathlib import Path

    import ichseg.eval.callback as old
    from ichseg.eval import scoring, tuning

    assert old.StitchedEvaluation is StitchedEvaluation
    assert (
        old.score_scan is scoring.score_scan
        and old.choose_on_validation is tuning.choose_on_validation
    )
    conf = Path(__file__).parents[1] / "conf" / "callbacks" / "stitched_eval.yaml"
    assert "_target_: ichseg.lit.callbacks.stitched_eval.StitchedEvaluation" in conf.read_text()


# ------------------------------------------------------------------------- one pass over the tiles


class Blurred(nn.Module):
    """A 5x5 mean of channel 0 into logits: near the mask, wrong at its edges, by threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.fill_(40.0 / 25)
            self.conv.bias.fill_(-18.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x[:, :1])


class Counted(nn.Module):
    """``net`` with a count of its forward calls and of the inputs it was given."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0
        self.inputs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inputs += len(x)
        return self.net(x)


def split_tiles(datamodule: CTICHDataModule, split: str) -> list[int]:
    """Network inputs (tiles, or whole slices) of each patient of ``split``."""
    per_slice = datamodule.input_spec.tiles_per_slice
    return [scan.n_slices * per_slice for scan in datamodule.eval_scans(split)]


@pytest.mark.parametrize("case", ["nifti-windowed", "nifti-full_slice"])
@pytest.mark.parametrize("tune_on_val", [False, True])
def test_a_test_phase_runs_the_network_once_per_test_tile(case, tune_on_val, datamodules, tmp_path):
    datamodule = datamodules[case]
    batch = datamodule.input_spec.tiles_per_slice  # one slice's tiles per forward pass
    net = Counted(Blurred())
    callback = StitchedEvaluation(
        min_area=0, n_overlays=0, tune_on_val=tune_on_val, inference={"tile_batch_size": batch}
    )
    module = ICHSegmentationModule(net)
    make_trainer(tmp_path, [callback]).test(module, datamodule=datamodule, verbose=False)

    test_tiles = sum(split_tiles(datamodule, "test"))
    assert test_tiles == len(datamodule.eval_dataset("test"))  # the test loop's tiles
    expected_calls, expected_inputs = math.ceil(test_tiles / batch), test_tiles
    if tune_on_val:  # each val tile once, for every threshold and post-processing tried
        val_tiles = sum(split_tiles(datamodule, "val"))
        expected_calls += math.ceil(val_tiles / batch)
        expected_inputs += val_tiles
    assert net.calls == expected_calls and net.inputs == expected_inputs
    assert module.window_test_metrics  # restored after the test phase


def test_forward_calls_are_the_tile_batches_of_each_patient(datamodules, tmp_path):
    """A tile batch that does not divide a slice's tiles: ceil(tiles / batch) per patient."""
    datamodule = datamodules["nifti-windowed"]
    net = Counted(Blurred())
    callback = StitchedEvaluation(n_overlays=0, inference={"tile_batch_size": 100})
    trainer = make_trainer(tmp_path, [callback])
    trainer.test(ICHSegmentationModule(net), datamodule=datamodule, verbose=False)
    # 100 tiles per batch x 4 batches per chunk: 16 slices of 25 tiles, more than any patient has
    assert all(n <= 400 for n in split_tiles(datamodule, "test"))
    assert net.calls == sum(math.ceil(n / 100) for n in split_tiles(datamodule, "test"))
    assert net.inputs == sum(split_tiles(datamodule, "test"))


def test_the_window_metrics_stay_when_the_test_split_is_not_stitched(datamodules, tmp_path):
    datamodule = datamodules["nifti-windowed"]
    net = Counted(Blurred())
    callback = StitchedEvaluation(splits=["val"], min_area=0, n_overlays=0)
    trainer = make_trainer(tmp_path, [callback])
    trainer.test(ICHSegmentationModule(net), datamodule=datamodule, verbose=False)
    assert (
        "test/dice" in trainer.callback_metrics and "val/stitched_dice" in trainer.callback_metrics
    )
    assert net.inputs == len(datamodule.eval_dataset("test")) + sum(split_tiles(datamodule, "val"))


@pytest.mark.parametrize("tune_on_val", [False, True])
def test_the_reported_metrics_are_those_of_scoring_each_split_on_its_own(
    tune_on_val, datamodules, tmp_path
):
    """The callback's numbers equal scoring outside Lightning, every post-processing of the
    tuning predicted separately, as before the test phase shared its passes."""
    from ichseg.eval.scoring import scalar_metrics, score_scans
    from ichseg.eval.tables import compute_tables
    from ichseg.eval.tuning import TUNE_THRESHOLDS, choose_on_validation, tuning_variants
    from ichseg.inference.predictor import Predictor
    from ichseg.specs import InferenceSpec

    datamodule = datamodules["nifti-windowed"]
    module = ICHSegmentationModule(Blurred())
    callback = StitchedEvaluation(
        min_area=0, n_overlays=0, tune_on_val=tune_on_val, inference={"tile_batch_size": 7},
        calibrate=False,  # raw probabilities, as scored here (calibration: the tests below)
    )  # fmt: skip
    trainer = make_trainer(tmp_path, [callback])
    trainer.test(module, datamodule=datamodule, verbose=False)

    spec = InferenceSpec(tile_batch_size=7)
    thresholds = sorted(set(THRESHOLDS) | {spec.threshold})
    if tune_on_val:
        results = {}
        for enabled in tuning_variants(spec):
            variant = spec.with_operating_point(spec.threshold, enabled and spec.postprocess)
            predictor = Predictor(module, datamodule.input_spec, variant, "cpu")
            results[enabled] = score_scans(predictor, datamodule.eval_scans("val"), TUNE_THRESHOLDS)
        choice = choose_on_validation(results, TUNE_THRESHOLDS, spec.threshold, True, 0)
        assert (choice.threshold, choice.postprocess) == (
            callback.tuning.threshold, callback.tuning.postprocess,
        )  # fmt: skip
        assert choice.grid == callback.tuning.grid
        spec = spec.with_operating_point(choice.threshold, choice.postprocess)
        thresholds = sorted(set(thresholds) | {spec.threshold, *TUNE_THRESHOLDS})
    predictor = Predictor(module, datamodule.input_spec, spec, "cpu")
    merged = score_scans(predictor, datamodule.eval_scans("test"), thresholds)
    expected = scalar_metrics(
        compute_tables(merged.counts, merged.patients, spec.threshold, 0), "test"
    )
    assert 0 < expected["test/stitched_dice"] < 1  # a model that is neither perfect nor empty
    for name, value in expected.items():
        assert metric(trainer, name) == pytest.approx(value, nan_ok=True), name
    scored, _ = callback.results["test"]
    np.testing.assert_array_equal(scored.counts.pred_pixels, merged.counts.pred_pixels)
    np.testing.assert_array_equal(scored.counts.intersection, merged.counts.intersection)


def test_progress_bars_follow_the_trainer(datamodules, tmp_path, monkeypatch):
    """Bars over patients and tiles on a terminal when the trainer shows its own; none when
    the trainer's bar is off (enable_progress_bar, refresh rate 0) or not on a terminal."""
    import io
    import sys

    from pytorch_lightning.callbacks import TQDMProgressBar

    from ichseg.lit.callbacks.stitched_eval import progress_enabled

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    datamodule = datamodules["nifti-windowed"]

    def run(terminal: bool, **options) -> tuple[pl.Trainer, str]:
        stream = Terminal() if terminal else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        callback = StitchedEvaluation(min_area=0, n_overlays=0)
        trainer = make_trainer(tmp_path, [callback, *options.pop("bars", [])], **options)
        trainer.test(ICHSegmentationModule(Blurred()), datamodule=datamodule, verbose=False)
        monkeypatch.undo()
        return trainer, stream.getvalue()

    trainer, text = run(True, enable_progress_bar=True)
    assert progress_enabled(trainer) and "Stitched test" in text and "tile" in text
    trainer, text = run(True, enable_progress_bar=False)
    assert not progress_enabled(trainer) and "Stitched test" not in text
    trainer, text = run(True, enable_progress_bar=True, bars=[TQDMProgressBar(refresh_rate=0)])
    assert not progress_enabled(trainer) and "Stitched test" not in text
    trainer, text = run(False, enable_progress_bar=True)
    assert "Stitched test" not in text


# ------------------------------------------------------------------------- calibration


def test_tune_on_val_fits_a_temperature_and_the_masks_stay_the_same(datamodules, tmp_path):
    """calibrate: T fitted on val, the threshold mapped to its scale, the same masks written;
    report.md / report.json state the ECE before and after, reliability.png and TensorBoard
    show the diagram."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ichseg.eval.calibration import calibrated_threshold

    datamodule = datamodules["nifti-windowed"]
    callbacks, modules = {}, {}
    for calibrate in (True, False):
        out = tmp_path / f"calibrate-{calibrate}"
        callback = StitchedEvaluation(
            min_area=0, n_overlays=0, tune_on_val=True, save_masks=True, calibrate=calibrate
        )
        module = ICHSegmentationModule(Blurred(), meta={"format": "test"})
        logger = TensorBoardLogger(out, name="tb", version="")
        make_trainer(out, [callback], logger=logger).test(
            module, datamodule=datamodule, verbose=False
        )
        callbacks[calibrate], modules[calibrate] = callback, module

    on, off = callbacks[True], callbacks[False]
    temperature = on.calibration["temperature"]
    print(f"phantom (Blurred): T = {temperature:.4f}, val ECE {on.calibration['ece_before']:.6f}"
          f" -> {on.calibration['ece_after']:.6f}; test ECE "
          f"{on.calibration_reports['test']['ece_before']:.6f} -> "
          f"{on.calibration_reports['test']['ece_after']:.6f}")  # fmt: skip
    assert temperature != 1.0 and off.calibration["temperature"] == 1.0
    assert on.calibration["ece_after"] < on.calibration["ece_before"]  # on val, where it was fit
    # the same choice on val, stored on the calibrated scale
    assert (on.tuning.threshold, on.tuning.postprocess) == (
        off.tuning.threshold, off.tuning.postprocess,
    )  # fmt: skip
    stored = {c: modules[c].meta["inference"] for c in (True, False)}
    assert stored[True]["temperature"] == temperature and stored[False]["temperature"] == 1.0
    assert stored[True]["threshold"] == calibrated_threshold(on.tuning.threshold, temperature)
    assert stored[False]["threshold"] == off.tuning.threshold
    assert modules[True].meta["operating_point"]["threshold_uncalibrated"] == on.tuning.threshold
    # every test mask is the same with and without calibration
    folder = {c: tmp_path / f"calibrate-{c}" for c in (True, False)}
    names = sorted(p.name for p in (folder[True] / "masks").glob("*_ich_seg.nii.gz"))
    assert names and names == sorted(p.name for p in (folder[False] / "masks").glob("*"))
    import nibabel as nib

    some = False
    for name in names:
        a = np.asanyarray(nib.load(folder[True] / "masks" / name).dataobj)
        b = np.asanyarray(nib.load(folder[False] / "masks" / name).dataobj)
        np.testing.assert_array_equal(a, b, err_msg=name)
        some |= bool(a.any())
    assert some
    scored = {c: callbacks[c].results["test"][1].segmentation.dice.mean for c in (True, False)}
    assert scored[True] == scored[False]
    # the report: ECE before -> after on test, the val fit, the diagram
    report = strict_json(folder[True] / "report.json")
    calibration = report["calibration"]
    assert calibration["temperature"] == temperature and calibration["bins"] == 15
    assert calibration["pixels"] == sum(s.mask.size for s in datamodule.eval_scans("test"))
    assert calibration["ece_after"] < calibration["ece_before"]
    assert calibration["fit"]["pixels"] == sum(s.mask.size for s in datamodule.eval_scans("val"))
    assert report["settings"]["temperature"] == temperature
    assert report["settings"]["threshold"] == stored[True]["threshold"]
    markdown = (folder[True] / "report.md").read_text()
    assert "## Calibration" in markdown and "(reliability.png)" in markdown
    assert f"{calibration['ece_before']:.5f} -> {calibration['ece_after']:.5f}" in markdown
    assert f"T = {temperature:.4g}" in markdown
    assert "not calibrated (T = 1)" in (folder[False] / "report.md").read_text()
    assert strict_json(folder[False] / "report.json")["calibration"]["temperature"] == 1.0
    for c in (True, False):
        assert (folder[c] / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        events = EventAccumulator(str(folder[c] / "tb"), size_guidance={"images": 0})
        events.Reload()
        assert "test/reliability" in events.Tags()["images"]


TINY_UNET = {"_target_": "ichseg.models.UNet", "in_channels": 1, "out_channels": 1,
             "base_filters": 4, "depth": 2, "norm": "none"}  # fmt: skip


def tiny_unet() -> nn.Module:
    from ichseg.models import UNet

    return UNet(**{k: v for k, v in TINY_UNET.items() if k != "_target_"})


def save_unet_checkpoint(path: Path, datamodule: CTICHDataModule) -> None:
    """A tiny UNet in an ichseg checkpoint (format of ichseg.train) for the datamodule's inputs."""
    from ichseg.checkpoint import make_meta
    from ichseg.specs import InferenceSpec

    torch.manual_seed(0)
    meta = make_meta(TINY_UNET, datamodule.input_spec, InferenceSpec())
    module = ICHSegmentationModule(tiny_unet(), meta=meta)
    size = datamodule.input_spec.tile_size
    batch = [{"image": torch.rand(1, size, size), "mask": torch.zeros(1, size, size)}] * 2
    trainer = make_trainer(path.parent, [], max_epochs=1, limit_train_batches=1)
    trainer.fit(module, DataLoader(batch, batch_size=2))
    trainer.save_checkpoint(path)


def test_the_tested_checkpoint_holds_the_temperature_and_predict_applies_it(datamodules, tmp_path):
    from ichseg.checkpoint import read_checkpoint
    from ichseg.eval.calibration import apply_temperature
    from ichseg.inference.scans import load_predictor

    datamodule = datamodules["nifti-windowed"]
    ckpt = tmp_path / "model.ckpt"
    save_unet_checkpoint(ckpt, datamodule)
    plain = load_predictor(ckpt, device="cpu")  # as trained: T = 1
    assert plain.inference_spec.temperature == 1.0
    copy_ckpt = tmp_path / "uncalibrated.ckpt"
    shutil.copy(ckpt, copy_ckpt)
    temperatures = {}
    for calibrate, path in ((True, ckpt), (False, copy_ckpt)):
        callback = StitchedEvaluation(min_area=0, n_overlays=0, tune_on_val=True,
                                      calibrate=calibrate)  # fmt: skip
        module = ICHSegmentationModule(tiny_unet())
        make_trainer(tmp_path / str(calibrate), [callback]).test(
            module, datamodule=datamodule, ckpt_path=path, verbose=False
        )
        assert callback.operating_point_file == path
        meta, _ = read_checkpoint(path)
        temperatures[calibrate] = meta["inference"]["temperature"]
    assert temperatures[False] == 1.0 and temperatures[True] != 1.0
    calibrated = load_predictor(ckpt, device="cpu")
    assert calibrated.inference_spec.temperature == temperatures[True]
    scan = next(iter(datamodule.eval_scans("test")))
    raw = plain.probabilities(scan.images, scan.original_shape)
    np.testing.assert_array_equal(
        calibrated.probabilities(scan.images, scan.original_shape),
        apply_temperature(raw, temperatures[True]),
    )
