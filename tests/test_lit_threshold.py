"""The threshold baseline in a Trainer (ichseg.lit.threshold and the report callback,
ichseg.lit.callbacks.threshold_report): fitting from batches, the search files, the declared data
side, and `experiment=threshold` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict
from test_intensity_band import all_levels
from test_threshold import random_slices
from torch.utils.data import DataLoader, Dataset

from ichseg.baselines.threshold import (
    LOWER_RANGE,
    UPPER_RANGE,
    fit_thresholds,
    search_thresholds,
    store_histograms,
)
from ichseg.errors import ConfigError
from ichseg.lit.callbacks.threshold_report import ThresholdReport, surface_image, write_search
from ichseg.lit.threshold import ThresholdData, ThresholdModule
from ichseg.models.intensity_band import IntensityBand
from ichseg.train import register_resolvers, train


def test_search_files_are_written(tmp_path):
    images, masks = random_slices(4)
    search = fit_thresholds(images, masks)
    picture = surface_image(search)
    assert picture.shape == (3, 111 * 4, 46 * 4) and picture.min() >= 0 and picture.max() <= 1
    path = write_search(search, tmp_path / "run", {"source": "test"})
    summary = json.loads(path.read_text())
    assert (summary["lower"], summary["upper"], summary["objective_value"]) == (
        search.lower,
        search.upper,
        search.value,
    )
    assert np.array(summary["surface"]["values"]).shape == (111, 46) and summary["source"] == "test"
    np.testing.assert_array_equal(
        np.load(tmp_path / "run" / "threshold_surface.npy"), search.surface
    )
    assert (tmp_path / "run" / "threshold_surface.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "threshold_search.json",
        "threshold_surface.npy",
        "threshold_surface.png",
    ]  # no temporary files left behind


def test_module_predicts_the_bands_zeros_and_ones():
    band = IntensityBand(140, 230)
    images = all_levels()
    inside = (torch.arange(256) >= 140) & (torch.arange(256) <= 230)
    module = ThresholdModule(band)
    torch.testing.assert_close(
        module.predict_probabilities(images).view(-1), inside.float(), rtol=0, atol=0
    )
    assert dict(module.state_dict()).keys() >= {"net.lower", "net.upper", "train_objective"}


class SliceDataset(Dataset):
    """Whole slices as DataModule-style batches (image float [0, 1], mask, patient, slice)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": torch.from_numpy(self.images[i][None].astype(np.float32) / 255.0),
            "mask": torch.from_numpy(self.masks[i][None].astype(np.float32)),
            "patient": torch.tensor(1),
            "slice": torch.tensor(i + 1),
            "window": torch.tensor(-1),
        }


@pytest.mark.parametrize(
    ("objective", "precision"), [("slice_mean", "32-true"), ("pooled", "bf16-mixed")]
)
def test_module_fits_from_batches_in_a_trainer(tmp_path, objective, precision):
    images, masks = random_slices(11, n=10, size=16)
    expected = fit_thresholds(images, masks, objective=objective)
    module = ThresholdModule(objective=objective, source="batches")
    report = ThresholdReport(output_dir=str(tmp_path / "run"))
    loader = DataLoader(SliceDataset(images, masks), batch_size=3, shuffle=True)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/jaccard", mode="max"
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[checkpoint, report], precision=precision,
    )  # fmt: skip
    trainer.fit(module, loader, DataLoader(SliceDataset(images, masks), batch_size=4))
    assert (int(module.net.lower), int(module.net.upper)) == (expected.lower, expected.upper)
    assert float(module.train_objective) == expected.value
    metrics = trainer.callback_metrics
    assert float(metrics["threshold/lower"]) == expected.lower and "val/jaccard" in metrics
    assert trainer.global_step == 4  # one (empty) step per batch, so that checkpoints are saved
    best = trainer.checkpoint_callback.best_model_path
    state = torch.load(best, weights_only=True)
    assert int(state["state_dict"]["net.lower"]) == expected.lower
    assert state["ichseg"]["threshold_band"]["upper"] == expected.upper
    loaded = ThresholdModule.load_from_checkpoint(best, weights_only=True)
    assert (int(loaded.net.lower), int(loaded.net.upper)) == (expected.lower, expected.upper)
    # a checkpoint of an earlier release holds output_dir among its hyperparameters
    earlier = tmp_path / "earlier.ckpt"
    state["hyper_parameters"]["output_dir"] = str(tmp_path / "old-run")
    torch.save(state, earlier)
    with pytest.warns(FutureWarning, match="callbacks.threshold_report.output_dir"):
        old = ThresholdModule.load_from_checkpoint(earlier, weights_only=True)
    assert int(old.net.upper) == expected.upper and "output_dir" not in old.hparams
    summary = json.loads((tmp_path / "run" / "threshold_search.json").read_text())
    assert summary["lower"] == expected.lower and summary["source"] == "batches"
    assert "fold" not in summary  # no DataModule: no round to name


def test_report_follows_a_fit_without_validation(tmp_path, capsys):
    images, masks = random_slices(2, n=6, size=16)
    expected = fit_thresholds(images, masks)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[ThresholdReport()],
    )  # fmt: skip
    trainer.fit(ThresholdModule(source="batches"), DataLoader(SliceDataset(images, masks)))
    summary = json.loads((tmp_path / "threshold_search.json").read_text())  # default_root_dir
    assert (summary["lower"], summary["upper"]) == (expected.lower, expected.upper)
    err = capsys.readouterr().err
    printed = [line for line in err.splitlines() if line.startswith("[ichseg.threshold] band")]
    assert len(printed) == 2  # one report per fit, one fit per epoch


def test_report_does_nothing_for_other_modules_or_without_files(tmp_path):
    from test_lit_segmentation import Oracle, loader

    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[ThresholdReport()], limit_train_batches=1, limit_val_batches=1,
    )  # fmt: skip
    from ichseg.lit.segmentation import ICHSegmentationModule

    trainer.fit(ICHSegmentationModule(Oracle()), loader(), loader())
    images, masks = random_slices(2, n=4, size=16)
    quiet = pl.Trainer(
        default_root_dir=tmp_path / "quiet", accelerator="cpu", max_epochs=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[ThresholdReport(output_dir=False)],
    )  # fmt: skip
    quiet.fit(ThresholdModule(source="batches"), DataLoader(SliceDataset(images, masks)))
    assert not list(tmp_path.rglob("threshold_*"))


class Round:
    index = 2
    train = (3, 1)


class DataSide:
    """The declared data side without a store: channels, augmentation, round, rows."""

    store = None
    channels = ("brain",)
    augmentation_options = None
    cv_round = Round()

    def rows(self, split: str) -> np.ndarray:
        raise AssertionError("no store: rows are not read")


def test_the_data_side_is_a_declared_protocol():
    assert isinstance(DataSide(), ThresholdData)
    assert not isinstance(object(), ThresholdData)
    incomplete = type("Incomplete", (), {"store": None, "channels": ("brain",)})()
    assert not isinstance(incomplete, ThresholdData)

    class Attached:
        datamodule = DataSide()

    module = ThresholdModule()
    module._trainer = Attached()  # the module reads only trainer.datamodule here
    assert module.resolved_source() == "batches"  # auto without a store
    assert module.search_record() == {"source": "batches", "fold": 2, "training_patients": [3, 1]}
    Attached.datamodule = type("Other", (), {"store": object()})()  # undeclared: no data side
    assert module.search_record() == {"source": "batches"}
    module._trainer = None


def test_fit_from_windows_is_refused(tmp_path):
    class Windows(SliceDataset):
        def __getitem__(self, i):
            return super().__getitem__(i) | {"window": torch.tensor(3)}

    images, masks = random_slices(0)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="whole slices"):
        trainer.fit(ThresholdModule(source="batches"), DataLoader(Windows(images, masks)))


# --------------------------------------------------------------------------- experiment=threshold


def compose_threshold(tmp_path: Path, overrides: list[str]):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module("ichseg.conf", version_base="1.3"):
        return compose("train", overrides=["experiment=threshold", *overrides])


def test_experiment_config_is_the_papers(tmp_path):
    cfg = compose_threshold(tmp_path, [f"paths.output_dir={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model = resolved["model"]
    assert model["_target_"] == "ichseg.lit.threshold.ThresholdModule"
    assert resolved["callbacks"]["threshold_report"]["output_dir"] is None
    assert tuple(model["lower_range"]) == LOWER_RANGE and tuple(model["upper_range"]) == UPPER_RANGE
    assert model["objective"] == "slice_mean" and resolved["trainer"]["max_epochs"] == 1
    assert (
        resolved["data"]["_target_"] == "ichseg.lit.datamodule.CTICHDataModule"
        and resolved["data"]["phantom"] is None
    )
    assert resolved["callbacks"]["model_checkpoint"]["monitor"] == "val/jaccard"
    assert resolved["callbacks"]["lr_monitor"] is None
    assert resolved["callbacks"]["stitched_eval"]["inference"]["postprocess"] is False
    assert resolved["data"]["augmentation"] is None and resolved["data"]["mode"] == "full_slice"


def test_experiment_runs_end_to_end_on_a_tiny_phantom(tmp_path):
    run = tmp_path / "run"
    cfg = compose_threshold(tmp_path, [
        "data=phantom", f"paths.output_dir={run}", f"paths.log_dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}", "data.phantom.patients=8", "data.phantom.slices=6",
        "data.phantom.size=64", "data.working_size=64", "data.window=32", "data.stride=16",
        "data.k=4", "logger=[tensorboard]", "callbacks.progress_bar.refresh_rate=0",
    ])  # fmt: skip
    metrics = train(cfg)
    assert {
        "threshold/lower", "threshold/upper", "threshold/train_objective",
        "val/jaccard", "val/dice", "test/stitched_dice",
    } <= set(metrics)  # fmt: skip
    assert "test/dice" not in metrics  # the stitched pass predicts the test slices, once
    assert "val/loss" not in metrics and "train/loss" not in metrics
    summary = json.loads((run / "threshold_search.json").read_text())
    assert (metrics["threshold/lower"], metrics["threshold/upper"]) == (
        summary["lower"],
        summary["upper"],
    )
    assert (run / "threshold_surface.png").is_file() and (run / "threshold_surface.npy").is_file()
    best = next((run / "checkpoints").glob("best*.ckpt"))
    state = torch.load(best, weights_only=True, map_location="cpu")
    assert (int(state["state_dict"]["net.lower"]), int(state["state_dict"]["net.upper"])) == (
        summary["lower"],
        summary["upper"],
    )
    assert state["ichseg"]["net"]["_target_"] == "ichseg.models.intensity_band.IntensityBand"
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    if "stitched_eval" in cfg.callbacks and cfg.callbacks.stitched_eval.get("_target_"):
        assert "test/stitched_dice" in metrics
        report = json.loads((run / "report.json").read_text())
        assert report["settings"]["postprocess"]["closing_size"] <= 1  # morphology off

    # the search used exactly the training patients' slices: redo it from the store
    from hydra.utils import instantiate

    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        data_cfg.pop("phantom")
        data_cfg.splits_file = str(run / "splits.json")
    datamodule = instantiate(data_cfg, _convert_="all")
    datamodule.setup("fit")
    train_rows = datamodule.rows("train")
    again = search_thresholds(store_histograms(datamodule.store, train_rows))
    assert (again.lower, again.upper, again.value) == (
        summary["lower"],
        summary["upper"],
        summary["objective_value"],
    )
    assert summary["n_ich_slices"] == int((datamodule.store.positive_pixels[train_rows] > 0).sum())
    assert summary["training_patients"] == list(datamodule.cv_round.train) and summary["fold"] == 0
    assert summary["source"] == "store"
