"""Evaluation switches of the improved recipes: 2.5D stitching and the val-tuned operating point."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from ichseg.data.datamodule import CTICHDataModule
from ichseg.eval.counts import SliceCounts
from ichseg.eval.scoring import ShardResult
from ichseg.eval.tuning import choose_on_validation
from ichseg.inference.stitch import context_index, full_slice, stitch
from ichseg.lit.callbacks.stitched_eval import StitchedEvaluation
from ichseg.lit.segmentation import ICHSegmentationModule

LOGIT_035 = math.log(0.35 / 0.65)


class Mixer(nn.Module):
    """A fixed 1x1 convolution: every input channel counts differently, so channel order matters."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-2, 3, in_channels).reshape(1, -1, 1, 1))
            self.conv.bias.fill_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def stacked(volume: torch.Tensor, k: int) -> torch.Tensor:
    """The 2.5D input built naively: slices s-k..s+k (clamped) concatenated as channels."""
    n = volume.shape[0]
    parts = [
        torch.cat([volume[min(max(s + d, 0), n - 1)] for d in range(-k, k + 1)]) for s in range(n)
    ]
    return torch.stack(parts)


@pytest.mark.parametrize("k", [1, 2])
def test_stitching_with_context_equals_a_stacked_volume(k):
    torch.manual_seed(0)
    volume = torch.rand(5, 2, 24, 24)
    model = Mixer(2 * (2 * k + 1))
    reference = stitch(model, stacked(volume, k), tile_size=8, tile_stride=4, tile_batch_size=7)
    ours = stitch(model, volume, tile_size=8, tile_stride=4, tile_batch_size=7, context_slices=k)
    torch.testing.assert_close(ours, reference)
    part = stitch(
        model,
        volume,
        tile_size=8,
        tile_stride=4,
        context_slices=k,
        rows=slice(1, 4),
        blend="gaussian",
    )
    whole = stitch(model, volume, tile_size=8, tile_stride=4, context_slices=k, blend="gaussian")
    torch.testing.assert_close(part, whole[1:4])
    torch.testing.assert_close(
        full_slice(model, volume, batch_size=2, context_slices=k),
        full_slice(model, stacked(volume, k), batch_size=2),
    )
    torch.testing.assert_close(
        full_slice(model, volume, context_slices=k, rows=slice(3, 5)),
        full_slice(model, stacked(volume, k))[3:5],
    )


def test_context_index_clamps_to_the_volume():
    assert context_index(torch.tensor([0, 2, 4]), 1, 5).tolist() == [
        [0, 0, 1],
        [1, 2, 3],
        [3, 4, 4],
    ]


# --------------------------------------------------------------------------- choosing on val


def counts_of(dice_by_threshold: dict[float, float]) -> SliceCounts:
    """One ICH slice of 100 pixels whose Dice at each threshold is as given (prediction inside)."""
    thresholds = sorted(dice_by_threshold)
    intersection = [round(100 * d / (2 - d)) for d in (dice_by_threshold[t] for t in thresholds)]
    return SliceCounts([1], [1], thresholds, [100], [intersection], [intersection])


def test_the_choice_prefers_dice_then_no_postprocessing_then_the_default_threshold():
    off = ShardResult(counts_of({0.3: 0.5, 0.4: 0.8, 0.5: 0.8, 0.6: 0.2}))
    on = ShardResult(counts_of({0.3: 0.5, 0.4: 0.8, 0.5: 0.8, 0.6: 0.2}))
    choice = choose_on_validation({False: off, True: on}, [0.3, 0.4, 0.5, 0.6], 0.5, True)
    assert (choice.threshold, choice.postprocess) == (0.5, False)  # a tie keeps it off
    assert choice.dice == pytest.approx(0.8, abs=0.01) and len(choice.grid) == 8
    better = ShardResult(counts_of({0.3: 0.5, 0.4: 0.9, 0.5: 0.8, 0.6: 0.2}))
    choice = choose_on_validation({False: off, True: better}, [0.3, 0.4, 0.5, 0.6], 0.5, True)
    assert (choice.threshold, choice.postprocess) == (0.4, True)  # kept only because it helps
    empty = ShardResult(SliceCounts([1], [1], [0.3, 0.5], [0], [[5, 0]], [[0, 0]]))
    fallback = choose_on_validation({False: empty}, [0.3, 0.5], 0.5, True)
    assert fallback.fallback and (fallback.threshold, fallback.postprocess) == (0.5, True)


# --------------------------------------------------------------------------- through the callback


class Faint(nn.Module):
    """Probability 0.35 on the ICH pixels encoded in channel 0, ~0 elsewhere: right below 0.35."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(LOGIT_035 + 20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.gain - 20.0


@pytest.fixture(scope="module")
def faint_datamodule(nifti_phantom) -> CTICHDataModule:
    module = CTICHDataModule(nifti_phantom.root, k=3, exclude=(), batch_size=16, window=32,
                             stride=16, working_size=96)  # fmt: skip
    module.setup("test")
    module.store.images[:, 0] = module.store.mask_slices(slice(None)).astype(np.uint8) * 255
    return module


def run_test(datamodule, callback, tmp_path) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=tmp_path, callbacks=[callback], accelerator="cpu", logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.test(ICHSegmentationModule(Faint()), datamodule=datamodule, verbose=False)
    return trainer


def test_the_threshold_is_tuned_on_val_and_applied_to_test(faint_datamodule, tmp_path):
    requested: list[str] = []
    original = faint_datamodule.eval_scans

    def spy(split="test", patients=None):
        requested.append(split)
        return original(split, patients)

    faint_datamodule.eval_scans = spy  # type: ignore[method-assign]
    try:
        plain = run_test(
            faint_datamodule, StitchedEvaluation(min_area=0, n_overlays=0), tmp_path / "a"
        )
        assert float(plain.callback_metrics["test/stitched_dice"]) == 0.0  # nothing above 0.5
        requested.clear()
        callback = StitchedEvaluation(min_area=0, n_overlays=0, tune_on_val=True, calibrate=False)
        tuned = run_test(faint_datamodule, callback, tmp_path / "b")
    finally:
        del faint_datamodule.eval_scans
    assert requested == ["val", "test"]  # val first, for the choice; test only scored
    assert callback.tuning is not None and callback.tuning.threshold == 0.3
    assert callback.tuning.dice == 1.0 and set(callback.tuning.patients) == set(
        faint_datamodule.cv_round.val
    )
    metrics = tuned.callback_metrics
    assert (
        float(metrics["val/tuned_threshold"]) == pytest.approx(0.3)
        and float(metrics["test/stitched_dice"]) == 1.0
    )
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    settings = report["settings"]
    assert settings["threshold"] == 0.3 and settings["tuned_on_val"]["threshold"] == 0.3
    assert len(settings["tuned_on_val"]["grid"]) == 10  # 5 thresholds x post-processing on / off
    assert settings["thresholds"] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert report["tables"]["segmentation"]["threshold"] == 0.3
    chosen_post = settings["tuned_on_val"]["postprocess"]
    assert (settings["postprocess"]["closing_size"] > 1) == chosen_post
    assert "tuned on the validation split" in (tmp_path / "b" / "report.md").read_text()
