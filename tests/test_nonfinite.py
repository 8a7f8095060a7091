"""The divergence guard: a NaN validation epoch stops training before any checkpoint of it is kept,
no checkpoint with non-finite weights is written, and prediction refuses such a checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from test_lit_segmentation import loader
from test_predict import make_meta, save_lightning_checkpoint
from test_train import TINY, compose_train

from ichseg.checkpoint import CheckpointError, load_model
from ichseg.data.phantom import generate_phantom
from ichseg.errors import IchsegError, TrainingDiverged
from ichseg.inference import Predictor
from ichseg.inference.predictor import NonFinitePrediction
from ichseg.lit.segmentation import ICHSegmentationModule
from ichseg.models import UNet
from ichseg.train import train

ROOT = Path(__file__).resolve().parents[1]


class BlowUp(pl.Callback):
    """Set every weight to ``value`` after the last training step of ``epoch`` (as a step with a
    far too high learning rate does)."""

    def __init__(self, epoch: int, value: float = 1e30) -> None:
        self.epoch, self.value = epoch, value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == trainer.num_training_batches - 1:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(self.value)


def checkpointed_trainer(tmp_path: Path, *callbacks: pl.Callback, **kwargs) -> pl.Trainer:
    """The checkpoints of ichseg.train: the best val/jaccard and last.ckpt at each epoch end."""
    best = ModelCheckpoint(
        dirpath=tmp_path, filename="best-{epoch}", monitor="val/jaccard", mode="max"
    )
    last = ModelCheckpoint(
        dirpath=tmp_path, filename="last", monitor=None, save_on_train_epoch_end=True
    )
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[best, last, *callbacks],
        **kwargs,
    )  # fmt: skip


def tiny_module() -> ICHSegmentationModule:
    torch.manual_seed(0)
    return ICHSegmentationModule(UNet(base_filters=4, depth=2, norm="batch"))


def saved_epochs(folder: Path) -> dict[str, int]:
    return {
        p.name: torch.load(p, map_location="cpu", weights_only=True)["epoch"]
        for p in sorted(folder.glob("*.ckpt"))
    }


@pytest.mark.parametrize("value", [1e30, float("nan")])
def test_diverged_epoch_stops_before_its_checkpoints(tmp_path, value):
    trainer = checkpointed_trainer(tmp_path, BlowUp(epoch=1, value=value), max_epochs=3)
    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 1, step 8: the val"):
        trainer.fit(tiny_module(), loader(), loader(seed=1))
    # only epoch 0 was kept: best and last
    assert saved_epochs(tmp_path) == {"best-epoch=0.ckpt": 0, "last.ckpt": 0}
    load_model_ok = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in load_model_ok.values() if t.is_floating_point())


def test_no_checkpoint_at_all_when_the_first_epoch_diverges(tmp_path):
    trainer = checkpointed_trainer(tmp_path, BlowUp(epoch=0), max_epochs=2)
    with pytest.raises(TrainingDiverged, match="lower model.optimizer.lr"):
        trainer.fit(tiny_module(), loader(), loader(seed=1))
    assert saved_epochs(tmp_path) == {}


def test_no_checkpoint_with_nan_weights_is_written_even_without_validation(tmp_path):
    trainer = checkpointed_trainer(
        tmp_path, BlowUp(epoch=0, value=float("nan")), max_epochs=1, limit_val_batches=0
    )
    with pytest.raises(TrainingDiverged, match=r"the weight net\.\S+ is NaN or infinite"):
        trainer.fit(tiny_module(), loader())
    assert saved_epochs(tmp_path) == {}


def test_train_raises_the_ichseg_error_through_lightning(tmp_path):
    """What the train command prints as one line, exit 2: a step with lr 1e30 is the only one of
    epoch 0, its validation is NaN, and neither a best nor a last checkpoint is written."""
    run = tmp_path / "outputs" / "run"
    cfg = compose_train(
        ["experiment=demo", *TINY, "model.optimizer.lr=1e30", "+trainer.limit_train_batches=1"],
        run,
    )
    with pytest.raises(TrainingDiverged, match="training diverged at epoch 0") as caught:
        train(cfg)
    assert type(caught.value) is TrainingDiverged and isinstance(caught.value, IchsegError)
    assert "\n" not in str(caught.value)
    assert not list((run / "checkpoints").glob("*.ckpt"))


# --------------------------------------------------------------------------- prediction


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nonfinite") / "good.ckpt"
    save_lightning_checkpoint(path, make_meta())
    return path


def spoiled(good: Path, folder: Path, value: float, name: str) -> Path:
    """``good`` with every network weight set to ``value``, written as ``name``."""
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    for key, tensor in checkpoint["state_dict"].items():
        if key.startswith("net.") and tensor.is_floating_point():
            tensor.fill_(value)
    path = folder / name
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (float("nan"), r"the weight \S+ holds \d+ NaN or infinite"),
        (1e30, "NaN or infinite outputs"),
    ],
)
def test_loading_refuses_a_diverged_checkpoint(good_checkpoint, tmp_path, value, says):
    path = spoiled(good_checkpoint, tmp_path, value, "diverged.ckpt")
    with pytest.raises(CheckpointError, match=rf"^{path}: .*{says}"):
        load_model(path)
    load_model(good_checkpoint)  # the good one loads


def test_predictor_refuses_non_finite_probabilities(good_checkpoint):
    model = load_model(good_checkpoint)
    predictor = Predictor(model.net, model.input_spec, model.inference_spec)
    assert predictor.source == str(good_checkpoint)
    hu = np.full((64, 64, 2), 40, dtype=np.int16)
    predictor.predict_hu(hu)  # finite
    with torch.no_grad():
        next(model.net.parameters()).fill_(float("inf"))
    with pytest.raises(
        NonFinitePrediction, match=rf"^{good_checkpoint}: the network gives \d+ NaN"
    ):
        predictor.predict_hu(hu)


def test_predict_command_exits_2_with_one_line(good_checkpoint, tmp_path):
    dataset = generate_phantom(tmp_path / "ct-ich", "nifti", n_patients=1, n_slices=4, size=64)
    scan = sorted((dataset.root / "ct_scans").glob("*.nii*"))[0]
    path = spoiled(good_checkpoint, tmp_path, 1e30, "diverged.ckpt")
    result = subprocess.run(
        [sys.executable, "-m", "ichseg.predict", f"ckpt={path}", f"input={scan}",
         f"output={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "ichseg.predict: error: " in lines[0] and str(path) in lines[0]
    assert "NaN or infinite" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii*"))


@pytest.mark.slow
def test_train_command_exits_2_with_one_line(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "ichseg.train", "experiment=demo", *TINY,
         "model.optimizer.lr=1e30", "+trainer.limit_train_batches=1", f"hydra.run.dir={run}",
         f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("ichseg.train: error: training diverged")
    assert not list(run.rglob("*.ckpt"))
