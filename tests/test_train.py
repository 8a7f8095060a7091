"""The Hydra config tree and the training entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from ichseg.errors import ConfigError
from ichseg.train import compose_config, resolve_ckpt_path, train

EXPERIMENTS = ["windowed", "full_slice", "threshold", "demo"]
TINY = [
    "data.phantom.patients=9",
    "data.k=3",
    "data.phantom.slices=6",
    "data.phantom.size=64",
    "data.working_size=64",
    "data.tile_size=32",
    "data.tile_stride=16",
    "data.batch_size=8",
    "model.net.base_filters=4",
    "model.net.depth=2",
    "trainer.max_epochs=1",
    "callbacks.progress_bar.refresh_rate=0",
    "+trainer.enable_model_summary=false",
]


def compose_train(overrides: list[str], output_dir: Path | None = None):
    cfg = compose_config(overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir.parent)
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path / "run")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["net"]["in_channels"] == len(resolved["data"]["channels"])
    assert resolved["callbacks"]["model_checkpoint"]["monitor"] == "val/jaccard"


def test_paper_settings_of_the_windowed_experiment(tmp_path):
    cfg = OmegaConf.to_container(
        compose_train(["experiment=windowed"], tmp_path / "run"), resolve=True
    )
    data, model = cfg["data"], cfg["model"]
    assert (data["tile_size"], data["tile_stride"], data["working_size"], data["batch_size"]) == (
        160,
        80,
        640,
        32,
    )
    assert (
        data["mode"] == "windowed" and data["sampling"] == "paper" and data["channels"] == ["brain"]
    )
    assert model["optimizer"]["lr"] == 1e-5 and cfg["trainer"]["max_epochs"] == 150
    assert model["net"]["base_filters"] == 64 and model["net"]["norm"] == "none"
    assert model["scheduler"]["decay"] == pytest.approx(1e-5 / 150)
    assert data["exclude"] == [70]
    full = OmegaConf.to_container(
        compose_train(["experiment=full_slice"], tmp_path / "run"), resolve=True
    )
    assert full["data"]["mode"] == "full_slice" and full["data"]["batch_size"] == 2


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "ddp_sim"])
def test_trainer_configs_compose(trainer, tmp_path):
    cfg = compose_train([f"trainer={trainer}"], tmp_path / "run")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


def test_checkpoint_file_names_have_no_slash(tmp_path):
    cfg = compose_train([], tmp_path / "run")
    assert "/" not in cfg.callbacks.model_checkpoint.filename.replace("{val/jaccard", "{")
    assert cfg.callbacks.model_checkpoint.auto_insert_metric_name is False


def test_demo_trains_tests_and_writes_outputs(tmp_path):
    run = tmp_path / "outputs" / "run"
    cfg = compose_train(["experiment=demo", *TINY], run)
    metrics = train(cfg)
    assert {"train/loss_epoch", "val/loss", "val/jaccard", "test/stitched_dice"} <= set(metrics)
    assert "test/dice" not in metrics  # the test tiles are predicted once, by the stitched pass
    assert all(value == value for value in metrics.values())  # no NaN
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(
        name.startswith("best-epoch000-jaccard") for name in checkpoints
    )
    assert (run / "splits.json").is_file()
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    best = next(p for p in (run / "checkpoints").iterdir() if p.name.startswith("best"))
    meta = torch.load(best, weights_only=True, map_location="cpu")["ichseg"]
    assert meta["format"] == "ichseg-checkpoint" and meta["net"]["base_filters"] == 4
    assert meta["version"] == 2 and meta["input"]["tile_size"] == 32
    assert meta["input"]["channels"] == ["brain"] and meta["input"]["working_mode"] == "resize"
    # the demo tunes its operating point on the val split and writes it into the tested checkpoint
    point = meta["operating_point"]
    assert point["source"] == "tuned on val" and point["threshold"] in (0.3, 0.4, 0.5, 0.6, 0.7)
    assert meta["inference"]["threshold"] == point["threshold"]
    assert "experiment=demo" in meta["train_overrides"]


def test_fast_dev_run_debug_preset(tmp_path):
    tiny = [o for o in TINY if not o.startswith("callbacks.")]
    run = tmp_path / "outputs" / "run"
    metrics = train(compose_train(["experiment=demo", "debug=fdr", *tiny], run))
    assert {"train/loss", "val/loss", "val/jaccard"} <= set(metrics)  # one batch of each
    assert not (run / "checkpoints").exists() and not (run / "tensorboard").exists()


def test_resume_needs_an_existing_checkpoint(tmp_path):
    cfg = compose_train(["ckpt_path=last"], tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"checkpoints/last\.ckpt: checkpoint to resume from does not exist"
    ):
        resolve_ckpt_path(cfg)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    env = {
        **os.environ,
        "ICHSEG_DATA": str(tmp_path / "nowhere"),
        "ICHSEG_OUTPUTS": str(tmp_path / "out"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "ichseg.train", "experiment=windowed"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = next(
        line for line in result.stderr.splitlines() if line.startswith("ichseg.train: error:")
    )
    assert (
        str(tmp_path / "nowhere") in line
        and "physionet.org/content/ct-ich" in line
        and "data=phantom" in line
    )
