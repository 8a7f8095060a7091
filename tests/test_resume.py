"""A run resumed from ``last.ckpt`` ends with the same weights, bit for bit, and logs the same
epoch losses as the uninterrupted run with the same seed (on the CPU)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import TINY, compose_train

from ichseg.train import train

EPOCHS = 3
#: The tiny phantom run of test_train with dropout and augmentation on (the demo's: every random
#: stream of training is used), CSV logs (the epoch losses) and no test stage.
RESUMABLE = [
    "experiment=demo",
    *[o for o in TINY if not o.startswith("trainer.max_epochs")],
    "model.net.dropout=0.5",
    f"model.scheduler.T_max={EPOCHS}",  # one cosine schedule, however many epochs a call runs
    "logger=csv",
    "test=false",
    "data.phantom.patients=6",
]


def overrides(epochs: int, *extra: str) -> list[str]:
    return [*RESUMABLE, f"trainer.max_epochs={epochs}", *extra]


def final_state(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(
        run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["epoch"] == EPOCHS - 1
    return checkpoint["state_dict"]


def epoch_losses(run: Path) -> dict[int, str]:
    """``train/loss_epoch`` per epoch as logged (the text, so equal means bitwise equal)."""
    losses = {}
    for path in sorted(run.rglob("metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss_epoch"):
                    losses[int(row["epoch"])] = row["train/loss_epoch"]
    return losses


def assert_same_run(a: Path, b: Path, losses_b: dict[int, str] | None = None) -> None:
    """Every parameter and buffer of the final weights equal, and the epoch losses of ``b``
    (``losses_b``, default: its logs) those of ``a``."""
    first, second = final_state(a), final_state(b)
    assert first.keys() == second.keys()
    differ = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"
    losses = epoch_losses(a)
    assert sorted(losses) == list(range(EPOCHS))
    logged = epoch_losses(b) if losses_b is None else losses_b
    assert logged == {epoch: losses[epoch] for epoch in logged}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "outputs" / "straight"
    train(compose_train(overrides(EPOCHS), run))
    return run


def test_resumed_run_equals_uninterrupted(uninterrupted):
    run = uninterrupted.parent / "resumed"
    train(compose_train(overrides(2), run))  # stops after epoch 1 with its last.ckpt
    before = epoch_losses(run)  # the CSV logger starts its file afresh when a run resumes
    train(compose_train(overrides(EPOCHS, "ckpt_path=last"), run))
    assert_same_run(uninterrupted, run, {**before, **epoch_losses(run)})
    assert sorted({**before, **epoch_losses(run)}) == list(range(EPOCHS))


@pytest.mark.slow
def test_loader_workers_change_nothing_also_when_resuming(uninterrupted):
    """Two loader workers give the weights of the main process, and so does resuming with them
    (the workers start drawing before Lightning sets the sampler's epoch)."""
    run = uninterrupted.parent / "workers"
    workers = "data.num_workers=2"
    train(compose_train(overrides(2, workers), run))
    before = epoch_losses(run)
    train(compose_train(overrides(EPOCHS, workers, "ckpt_path=last"), run))
    assert_same_run(uninterrupted, run, {**before, **epoch_losses(run)})


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(uninterrupted):
    """The real thing: ``python -m ichseg.train`` killed with SIGKILL once the last.ckpt of epoch
    1 exists (during epoch 2), then resumed in the same folder with ``ckpt_path=last``."""
    run = uninterrupted.parent / "killed"
    last = run / "checkpoints" / "last.ckpt"
    command = [
        sys.executable, "-m", "ichseg.train", *overrides(EPOCHS), f"hydra.run.dir={run}",
        f"paths.log_dir={uninterrupted.parent}",  # the same phantom and cache
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if last.is_file() and _epoch_of(last) == 1:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert _epoch_of(last) == 1  # killed during epoch 2, before its checkpoint
    result = subprocess.run(
        [*command, "ckpt_path=last"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(uninterrupted, run)  # the losses logged after resuming


def _epoch_of(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # being written
        return None
