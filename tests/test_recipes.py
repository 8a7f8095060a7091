"""The improved recipes end to end: configs, tiny training runs, a checkpoint, the comparison."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_train import TINY, compose_train

from ichseg.eval.calibration import calibrated_threshold
from ichseg.models.losses import DiceBCELoss
from ichseg.predict import load_predictor
from ichseg.specs import InputSpec
from ichseg.train import compose_config, train

ROOT = Path(__file__).resolve().parents[1]
PLUS = ["windowed_plus", "full_slice_plus"]


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "compare_recipes", ROOT / "bench" / "compare_recipes.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("experiment", PLUS)
def test_plus_experiments_compose_with_nine_input_channels(experiment, tmp_path):
    cfg = OmegaConf.to_container(
        compose_train([f"experiment={experiment}"], tmp_path / "run"), resolve=True
    )
    data, model, stitched = cfg["data"], cfg["model"], cfg["callbacks"]["stitched_eval"]
    assert data["channels"] == ["brain", "subdural", "bone"] and data["context_slices"] == 1
    assert model["net"]["in_channels"] == 9
    assert data["sampling"] == "oversample" and data["foreground_fraction"] == 0.33
    assert model["loss"]["_target_"] == "ichseg.models.losses.DiceBCELoss"
    assert model["net"]["head"] == "conv1x1" and model["optimizer"]["lr"] == 1e-3
    assert stitched["tune_on_val"] is True
    assert (data["mode"], data["working_size"]) == (experiment.removesuffix("_plus"), 640)
    if experiment == "windowed_plus":
        assert (data["tile_size"], data["tile_stride"], data["batch_size"]) == (160, 80, 32)
        assert stitched["inference"]["blend"] == "gaussian" and model["net"]["norm"] == "batch"
    else:
        assert data["batch_size"] == 2 and model["net"]["norm"] == "instance"


def test_the_cpu_recipe_is_windowed_plus_with_its_time_spent_on_training(tmp_path):
    """experiment=windowed_plus_cpu changes only width, validation sample, epoch length, memory
    format, workers and the budget; the recipe itself is windowed_plus's."""

    def composed(experiment: str) -> dict:
        cfg = compose_train([f"experiment={experiment}"], tmp_path / experiment)
        return OmegaConf.to_container(cfg, resolve=True)

    plus, cpu = composed("windowed_plus"), composed("windowed_plus_cpu")
    changed = {"num_workers", "batches_per_epoch", "val_tiles_max", "splits_dir"}
    assert {k: v for k, v in cpu["data"].items() if k not in changed} == {
        k: v for k, v in plus["data"].items() if k not in changed
    }
    assert cpu["data"]["val_tiles"] == "all" and cpu["data"]["val_tiles_max"] == 2048
    assert cpu["data"]["num_workers"] == 0 and cpu["data"]["batches_per_epoch"] == 100
    assert cpu["model"]["net"]["base_filters"] == 16 and cpu["model"]["channels_last"] is True
    for key in ("loss", "optimizer", "head"):
        assert cpu["model"].get(key) == plus["model"].get(key)
    assert cpu["model"]["scheduler"]["T_max"] == cpu["trainer"]["max_epochs"] == 8
    assert cpu["trainer"]["accelerator"] == "cpu" and cpu["trainer"]["max_time"] == "00:00:25:00"
    assert cpu["callbacks"]["stitched_eval"] == plus["callbacks"]["stitched_eval"]


def test_the_paper_experiment_keeps_the_paper_head_and_loss(tmp_path):
    cfg = OmegaConf.to_container(
        compose_train(["experiment=windowed"], tmp_path / "run"), resolve=True
    )
    assert cfg["model"]["net"]["head"] == "paper" and cfg["model"]["loss"] is None
    assert cfg["data"]["context_slices"] == 0 and cfg["data"]["sampling"] == "paper"
    assert cfg["callbacks"]["stitched_eval"]["tune_on_val"] is False


def test_in_channels_follow_channels_and_context(tmp_path):
    overrides = ["experiment=windowed", "data.channels=[brain,bone]", "data.context_slices=2"]
    cfg = compose_train(overrides, tmp_path / "run")
    assert OmegaConf.to_container(cfg, resolve=True)["model"]["net"]["in_channels"] == 10
    spec = InputSpec(channels=tuple(cfg.data.channels), context_slices=cfg.data.context_slices)
    assert spec.in_channels == 10


def test_windowed_plus_trains_tunes_on_val_and_predicts(tmp_path):
    run = tmp_path / "outputs" / "run"
    tiny = [*TINY, "data=phantom", "trainer=cpu", "data.batch_size=6", "data.num_workers=0"]
    metrics = train(compose_train(["experiment=windowed_plus", *tiny], run))
    assert {"test/stitched_dice", "val/tuned_threshold"} <= set(metrics)
    assert 0.3 <= metrics["val/tuned_threshold"] <= 0.7
    report = json.loads((run / "report.json").read_text())
    settings = report["settings"]
    assert settings["context_slices"] == 1 and settings["blend_mode"] == "gaussian"
    # the threshold chosen on val, on the scale of the temperature fitted with it
    tuned = settings["tuned_on_val"]
    assert settings["threshold"] == tuned["threshold_calibrated"]
    assert tuned["threshold_calibrated"] == calibrated_threshold(
        tuned["threshold"], settings["temperature"]
    )
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    checkpoint = torch.load(best, weights_only=True, map_location="cpu")
    assert checkpoint["ichseg"]["input"]["context_slices"] == 1
    assert checkpoint["ichseg"]["net"]["in_channels"] == 9
    # the operating point chosen on val is stored with the model, and report.json names the file
    stored = checkpoint["ichseg"]["inference"]
    assert stored["threshold"] == tuned["threshold_calibrated"]
    assert stored["temperature"] == settings["temperature"] == report["calibration"]["temperature"]
    assert stored["postprocess"] == settings["tuned_on_val"]["postprocess"]
    assert stored["blend"] == "gaussian"
    assert checkpoint["ichseg"]["operating_point"]["source"] == "tuned on val"
    assert settings["operating_point_file"] == str(best)
    assert not any(key.startswith("loss.") for key in checkpoint["state_dict"])
    predictor = load_predictor(best, device="cpu")
    assert predictor.input_spec.in_channels == 9
    assert predictor.inference_spec.threshold == tuned["threshold_calibrated"]
    hu = np.zeros((64, 64, 5), dtype=np.int16)
    probabilities, mask = predictor.predict_hu(hu)
    assert probabilities.shape == mask.shape == (64, 64, 5)


def test_full_slice_plus_trains(tmp_path):
    run = tmp_path / "outputs" / "run"
    tiny = [*TINY, "data=phantom", "trainer=cpu", "data.num_workers=0", "data.batch_size=2"]
    metrics = train(compose_train(["experiment=full_slice_plus", *tiny], run))
    assert "test/stitched_dice" in metrics and math.isfinite(metrics["train/loss_epoch"])
    assert isinstance(DiceBCELoss(), torch.nn.Module)


# --------------------------------------------------------------------------- the comparison


def result(bench, name, dice, fp_ml, outside_ml=None):
    outside_ml = fp_ml if outside_ml is None else outside_ml
    return bench.RecipeResult(
        name=name, description=name, dice=dice, dice_3d=dice, fp_ml=fp_ml, outside_ml=outside_ml,
        sensitivity=1.0, specificity=1.0, steps=10, seconds=1.0, run_dir="run",
    )  # fmt: skip


def test_verdict_and_table():
    bench = load_bench()
    paper, plus = result(bench, "paper", 0.1, 20.0), result(bench, "windowed_plus", 0.5, 1.0)
    holds, line = bench.verdict([paper, plus])
    assert holds is True and "YES" in line
    holds, line = bench.verdict([paper, result(bench, "windowed_plus", 0.5, 25.0)])
    assert holds is False and "false-positive volume 25.00 vs 20.00 mL: NOT lower" in line
    holds, line = bench.verdict([paper, result(bench, "windowed_plus", 0.5, 1.0, 30.0)])
    assert holds is False and "outside the bleed 30.00 vs 20.00 mL: NOT lower" in line
    holds, line = bench.verdict([paper, result(bench, "windowed_plus", 0.05, 1.0)])
    assert holds is False and "NOT better" in line
    holds, _ = bench.verdict(
        [result(bench, "paper", 0.0, 0.0), result(bench, "windowed_plus", 0.4, 0.0)]
    )
    assert holds is True  # nothing predicted outside the bleeds by either: not worse
    assert bench.verdict([plus])[0] is None
    table = bench.format_table([paper, plus])
    assert "| windowed_plus | 0.500 | +0.400 |" in table and "-19.00" in table


@pytest.mark.slow
def test_improved_recipe_beats_the_paper_recipe_on_the_phantom(tmp_path):
    """The benchmark itself: windowed_plus beats the paper recipe on Dice and false-positive mL."""
    out = tmp_path / "compare"
    command = [sys.executable, str(ROOT / "bench" / "compare_recipes.py"),
               "--recipes", "paper,windowed_plus", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((out / "compare.json").read_text())
    rows = {row["name"]: row for row in document["results"]}
    assert document["improved_beats_paper"] is True
    assert rows["windowed_plus"]["dice"] > rows["paper"]["dice"]
    assert rows["windowed_plus"]["fp_ml"] < rows["paper"]["fp_ml"]
    assert rows["windowed_plus"]["outside_ml"] < rows["paper"]["outside_ml"]
    assert "windowed_plus beats paper at the same budget: YES" in done.stdout


def test_every_recipe_composes_and_each_switch_changes_its_base(tmp_path):
    """``+x`` differs from ``paper_lr`` and ``plus-x`` from ``windowed_plus``,
    each by its switch.
    """
    bench = load_bench()
    common = bench.shared_overrides(tmp_path / "phantom", tmp_path, 128, 2, 8, 20, 12)

    def composed(name):
        cfg = compose_config([*common, *bench.RECIPES[name][1]], tmp_path / name)
        return OmegaConf.to_container(cfg, resolve=True)

    paper_lr, plus = composed("paper_lr"), composed("windowed_plus")
    assert set(bench.ADDED) | set(bench.WITHOUT) | {"paper", "paper_lr"} <= set(bench.RECIPES)
    for name in bench.SWITCHES:
        added, removed = composed(f"+{name}"), composed(f"plus-{name}")
        assert added != paper_lr and removed != plus, name
        assert added["model"]["optimizer"]["lr"] == 1e-3 and removed["data"]["tile_size"] == 32
    assert composed("plus-context")["model"]["net"]["in_channels"] == 3
    assert composed("+windows")["model"]["net"]["in_channels"] == 3
    assert composed("plus-dice_bce")["model"]["loss"] is None
    assert composed("+oversample")["data"]["sampling"] == "oversample"


def test_every_row_is_a_config_file_with_a_description():
    bench = load_bench()
    for name, experiment in bench.ROWS.items():
        path = bench.EXPERIMENTS / f"{experiment}.yaml"
        assert path.is_file(), name
        assert bench.RECIPES[name][1] == [f"experiment={experiment}"]
        assert bench.RECIPES[name][0] and "\n" not in bench.RECIPES[name][0]
    assert bench.RECIPES["plus-tuned"][0] == (
        "windowed_plus without Gaussian stitching, val-tuned threshold / post-processing"
    )


def test_rows_over_seeds_are_means_with_the_dice_spread():
    bench = load_bench()
    runs = [
        bench.replace(result(bench, "windowed_plus", dice, fp, 2 * fp), seeds=[seed], tuned=tuned)
        for seed, dice, fp, tuned in [
            (42, 0.5, 1.0, {"threshold": 0.3, "postprocess": False}),
            (43, 0.7, 3.0, {"threshold": 0.7, "postprocess": True}),
        ]
    ]
    row = bench.mean_over_seeds(runs)
    assert row.seeds == [42, 43] and row.dice == pytest.approx(0.6)
    assert row.dice_sd == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert (row.fp_ml, row.outside_ml, row.seconds) == (2.0, 4.0, 2.0)
    assert row.points == ["0.3, no morphology (val)", "0.7, closing/opening (val)"]
    table = bench.format_table([row])
    assert "| windowed_plus | 0.600 ± 0.141 |" in table
    assert "0.3, no morphology (val) / 0.7, closing/opening (val)" in table
    single = bench.mean_over_seeds(runs[:1])
    assert single.dice == 0.5 and "| 0.500 |" in bench.format_table([single])
