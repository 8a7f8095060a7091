"""The threshold baseline: exact grid search (= the naive one, ties included), the band as a model,
the phantom's bleeds, fitting inside a Trainer, and `experiment=threshold` end to end."""

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
from torch.utils.data import DataLoader, Dataset

from ichseg.data.ctich import open_dataset
from ichseg.data.phantom import generate_phantom
from ichseg.errors import ConfigError, DatasetError
from ichseg.models.threshold import (
    LOWER_RANGE,
    OBJECTIVES,
    UPPER_RANGE,
    IntensityBand,
    IntensityHistograms,
    ThresholdModule,
    fit_thresholds,
    level_counts,
    naive_threshold_search,
    objective_surface,
    search_thresholds,
    store_histograms,
    surface_image,
    write_search,
)
from ichseg.train import register_resolvers, train


def random_slices(
    seed: int, n: int = 6, size: int = 10, low: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Small random slices whose ICH pixels are brighter on average; some slices without ICH."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < 0.2
    masks[rng.random(n) < 0.3] = False
    masks[0, 0, 0] = True  # at least one ICH slice
    bright = rng.integers(max(low, 120), 256, (n, size, size))
    anything = rng.integers(low, 256, (n, size, size))
    return np.where(masks, bright, anything).astype(np.uint8), masks


def assert_same_search(fast, naive) -> None:
    assert (fast.lower, fast.upper) == (naive.lower, naive.upper)
    assert fast.value == naive.value  # both the exact value rounded once
    np.testing.assert_allclose(fast.surface, naive.surface, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- histograms


def test_level_counts_equals_bincount():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in [(5, 7), (6, 6), (1, 1), (3, 1), (64, 64)]
    ]
    images.append(np.zeros((8, 8), np.uint8))
    framed = rng.integers(0, 256, (9, 9), dtype=np.uint8)
    framed[:3] = 0
    framed[-2:] = 0
    images += [framed, rng.integers(0, 256, (20, 21), dtype=np.uint8)[:, ::2]]  # and not contiguous
    for image in images:
        np.testing.assert_array_equal(
            level_counts(image), np.bincount(image.ravel(), minlength=256)
        )


def test_histograms_count_inside_and_outside():
    images, masks = random_slices(1)
    histograms = IntensityHistograms.from_slices(images, masks)
    for i in range(len(images)):
        np.testing.assert_array_equal(
            histograms.inside[i], np.bincount(images[i][masks[i]], minlength=256)
        )
        np.testing.assert_array_equal(
            histograms.outside[i], np.bincount(images[i][~masks[i]], minlength=256)
        )
    has_ich = masks.any(axis=(1, 2))
    only_ich = IntensityHistograms.from_ich_masks(images, masks[has_ich], has_ich)
    np.testing.assert_array_equal(only_ich.inside, histograms.inside)
    with pytest.raises(ConfigError, match="ICH masks"):
        IntensityHistograms.from_ich_masks(images, masks, has_ich)
    with pytest.raises(ConfigError, match="uint8"):
        IntensityHistograms.from_slices(images.astype(np.float32), masks)


# --------------------------------------------------------------------------- the search


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_search_equals_naive_on_the_paper_grid(objective, seed):
    images, masks = random_slices(seed)
    fast = fit_thresholds(images, masks, objective=objective)
    naive = naive_threshold_search(images, masks, objective=objective)
    assert_same_search(fast, naive)
    assert fast.surface.shape == (111, 46) and fast.lowers[0] == 100 and fast.uppers[-1] == 255
    assert fast.n_slices == len(images) and fast.n_ich_slices == int(masks.any(axis=(1, 2)).sum())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fast_search_equals_naive_with_empty_bands_and_plateaus(objective):
    # few distinct values: many pairs tie exactly; lower > upper pairs predict nothing
    rng = np.random.default_rng(5)
    images = rng.choice(np.array([3, 9, 17, 30, 41], np.uint8), size=(5, 6, 6))
    masks = (images >= 17) & (rng.random((5, 6, 6)) < 0.7)
    fast = fit_thresholds(images, masks, (0, 40), (20, 45), objective)
    naive = naive_threshold_search(images, masks, (0, 40), (20, 45), objective)
    assert_same_search(fast, naive)
    assert (fast.surface[fast.lowers > 45] == 0).all()  # bands with lower > upper are empty


def tie_slices() -> tuple[np.ndarray, np.ndarray]:
    """Three 40-pixel slices where bands (10, 20) and (11, 20) tie EXACTLY (mean Jaccard 1/5) but
    a float sum in slice order favours (11, 20): per-slice Jaccards (3, 2, 1)/10 against
    (1, 2, 3)/10, and (0.1 + 0.2) + 0.3 > (0.3 + 0.2) + 0.1 in floating point."""
    # (value, in mask, count); 255 outside the mask is outside every band: padding
    slices = [
        [(10, True, 2), (15, True, 1), (0, True, 7)],  # J(10,20) = 3/10, J(11,20) = 1/10
        [(15, True, 2), (0, True, 8)],  # 2/10 for both
        [(15, True, 3), (0, True, 7), (10, False, 20)],  # 3/30 = 1/10, then 3/10
    ]
    images = np.full((3, 1, 40), 255, np.uint8)
    masks = np.zeros((3, 1, 40), bool)
    for i, runs in enumerate(slices):
        position = 0
        for value, inside, count in runs:
            images[i, 0, position : position + count] = value
            masks[i, 0, position : position + count] = inside
            position += count
    return images, masks


def test_ties_are_exact_and_go_to_the_first_pair():
    images, masks = tie_slices()
    fast = fit_thresholds(images, masks, (10, 11), (20, 20), "slice_mean")
    naive = naive_threshold_search(images, masks, (10, 11), (20, 20), "slice_mean")
    assert (fast.lower, fast.upper) == (naive.lower, naive.upper) == (10, 20)
    assert fast.value == naive.value == 0.2
    # the trap is real: summed in slice order, the floats differ
    assert (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1
    # plateau: bins 12..19 hold nothing, so (10, 20) ... (10, 25) all tie; the first wins
    wide = fit_thresholds(images, masks, (10, 11), (20, 25), "slice_mean")
    assert (wide.lower, wide.upper) == (10, 20)
    assert np.all(wide.surface[0] == wide.surface[0, 0])


def test_chunking_does_not_change_the_result():
    images, masks = random_slices(7, n=12)
    histograms = IntensityHistograms.from_slices(images, masks)
    one = search_thresholds(histograms, chunk_slices=1)
    many = search_thresholds(histograms, chunk_slices=1000)
    assert (one.lower, one.upper, one.value) == (many.lower, many.upper, many.value)
    np.testing.assert_allclose(one.surface, many.surface, rtol=1e-13)


def test_slice_mean_ignores_slices_without_ich_and_pooled_counts_them():
    images, masks = random_slices(3)
    clean = np.full((1, *images.shape[1:]), 200, np.uint8)  # an ICH-free slice, all 200
    more_images = np.concatenate([images, clean])
    more_masks = np.concatenate([masks, np.zeros_like(clean, bool)])
    base = objective_surface(IntensityHistograms.from_slices(images, masks))
    more = objective_surface(IntensityHistograms.from_slices(more_images, more_masks))
    np.testing.assert_array_equal(base, more)
    pooled = objective_surface(IntensityHistograms.from_slices(images, masks), objective="pooled")
    pooled_more = objective_surface(
        IntensityHistograms.from_slices(more_images, more_masks), objective="pooled"
    )
    holds_200 = np.arange(100, 211) <= 200  # lower thresholds of the bands that contain 200
    assert (pooled_more[holds_200] < pooled[holds_200]).all()  # false positives
    np.testing.assert_array_equal(pooled_more[~holds_200], pooled[~holds_200])


def test_bad_inputs_raise_clear_errors():
    images, masks = random_slices(0)
    with pytest.raises(DatasetError, match="no"):
        fit_thresholds(images, np.zeros_like(masks))
    with pytest.raises(ConfigError, match="objective"):
        fit_thresholds(images, masks, objective="dice")
    with pytest.raises(ConfigError, match="lower_range"):
        fit_thresholds(images, masks, lower_range=(200, 100))
    with pytest.raises(ConfigError, match="upper_range"):
        fit_thresholds(images, masks, upper_range=(210, 256))


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


# --------------------------------------------------------------------------- the phantom


@pytest.fixture(scope="module")
def phantom_slices(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain-window slices, masks and HU of a small 256x256 phantom (8 patients of 8 slices)."""
    root = tmp_path_factory.mktemp("threshold-phantom") / "ct-ich"
    generate_phantom(root, "nifti", n_patients=8, n_slices=8, size=256, seed=0)
    dataset = open_dataset(root)
    images, masks, hu = [], [], []
    for patient in dataset.patient_ids:
        scan = dataset.load(patient)
        images.append(scan.windowed(("brain",))[:, 0])
        masks.append(scan.mask_slices())
        hu.append(np.moveaxis(scan.image, 2, 0))
    return np.concatenate(images), np.concatenate(masks), np.concatenate(hu)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_band_found_on_the_phantom_holds_its_bleeds(phantom_slices, objective):
    images, masks, hu = phantom_slices
    search = fit_thresholds(images, masks, objective=objective)
    # bleeds are 50-90 HU (brain window 149-234); the skull's partial-volume rim brightens some
    bleed = images[masks & (hu >= 50) & (hu <= 90)]
    assert bleed.size > 1000
    assert 149 - 10 <= search.lower <= np.median(bleed) <= search.upper < 255  # not bone (255)
    assert ((bleed >= search.lower) & (bleed <= search.upper)).mean() > 0.6  # most of them
    brain = images[~masks & (hu >= 20) & (hu <= 45)]  # grey and white matter: outside the band
    assert ((brain >= search.lower) & (brain <= search.upper)).mean() < 0.01


# --------------------------------------------------------------------------- the band as a model


def all_levels() -> torch.Tensor:
    """Every 0-255 level as float input the way the DataModule makes it: (1, 2, 16, 16)."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    image = levels.to(torch.float32).mul_(1.0 / 255.0)
    return torch.cat([image, torch.zeros_like(image)], dim=1)  # a second channel, ignored


def test_band_predicts_one_inside_and_zero_outside():
    band = IntensityBand(140, 230)
    images = all_levels()
    inside = (torch.arange(256) >= 140) & (torch.arange(256) <= 230)
    probabilities = torch.sigmoid(band(images))
    assert probabilities.shape == (1, 1, 16, 16)
    torch.testing.assert_close(probabilities.view(-1), inside.float(), rtol=0, atol=0)
    module = ThresholdModule(band)
    torch.testing.assert_close(
        module.predict_probabilities(images).view(-1), inside.float(), rtol=0, atol=0
    )
    assert dict(module.state_dict()).keys() >= {"net.lower", "net.upper", "train_objective"}


def test_band_needs_thresholds_and_a_brain_channel():
    with pytest.raises(ConfigError, match="no thresholds"):
        IntensityBand()(all_levels())
    with pytest.raises(ConfigError, match="channel 2"):
        IntensityBand(channel=2, in_channels=1)
    with pytest.raises(ConfigError, match="both"):
        IntensityBand(lower=140)


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
    module = ThresholdModule(
        objective=objective, source="batches", output_dir=str(tmp_path / "run")
    )
    loader = DataLoader(SliceDataset(images, masks), batch_size=3, shuffle=True)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/jaccard", mode="max"
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[checkpoint], precision=precision,
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
    assert (
        json.loads((tmp_path / "run" / "threshold_search.json").read_text())["lower"]
        == expected.lower
    )


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
        trainer.fit(
            ThresholdModule(source="batches", output_dir=False), DataLoader(Windows(images, masks))
        )


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
    assert model["_target_"] == "ichseg.models.threshold.ThresholdModule"
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
        "val/jaccard", "val/dice", "test/jaccard", "test/dice",
    } <= set(metrics)  # fmt: skip
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
    assert state["ichseg"]["net"]["_target_"] == "ichseg.models.threshold.IntensityBand"
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
