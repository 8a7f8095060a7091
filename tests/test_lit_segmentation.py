"""The LightningModule: loss, metrics on a perfect prediction, NaN guard, schedules, checkpoints,
images.
"""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ichseg.lit.segmentation import ICHSegmentationModule, NonFiniteLossError, inverse_time_decay
from ichseg.models import UNet


class SquaresDataset(Dataset):
    """Images with a bright square; the mask is the square."""

    def __init__(self, n: int = 16, size: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, size, size, generator=g) * 0.3
        self.masks = torch.zeros(n, 1, size, size)
        corners = torch.randint(0, size - 10, (n, 2), generator=g)
        for i, (r, c) in enumerate(corners.tolist()):
            self.masks[i, 0, r : r + 8, c : c + 8] = 1
        self.images = self.images + 0.7 * self.masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i]}


class Oracle(nn.Module):
    """Logits that threshold the input at 0.5: perfect on SquaresDataset."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, x):
        return (x[:, :1] - 0.5) * self.scale


def trainer(tmp_path, **kwargs):
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def loader(**kwargs):
    return DataLoader(SquaresDataset(**kwargs), batch_size=4)


def test_perfect_prediction_scores_one(tmp_path):
    module = ICHSegmentationModule(Oracle())
    metrics = trainer(tmp_path).validate(module, loader(), verbose=False)[0]
    assert metrics["val/jaccard"] == pytest.approx(1.0)
    assert metrics["val/dice"] == pytest.approx(1.0)


def test_empty_prediction_scores_zero(tmp_path):
    class Nothing(Oracle):
        def forward(self, x):
            return torch.full_like(x[:, :1], -10.0) * self.scale / self.scale

    metrics = trainer(tmp_path).validate(ICHSegmentationModule(Nothing()), loader(), verbose=False)[
        0
    ]
    assert metrics["val/jaccard"] == 0.0 and metrics["val/dice"] == 0.0
    assert metrics["val/loss"] == pytest.approx(
        nn.functional.binary_cross_entropy_with_logits(
            torch.full((16, 1, 32, 32), -10.0), SquaresDataset().masks
        ).item(),
        rel=1e-4,
    )


def test_training_learns_squares(tmp_path):
    torch.manual_seed(0)
    module = ICHSegmentationModule(
        UNet(base_filters=8, depth=2, norm="batch", dropout=0.0),
        optimizer=partial(torch.optim.Adam, lr=3e-3),
    )
    before = trainer(tmp_path).validate(module, loader(seed=1), verbose=False)[0]
    trainer(tmp_path, max_epochs=30).fit(module, loader(n=32), loader(seed=1))
    after = trainer(tmp_path).validate(module, loader(seed=1), verbose=False)[0]
    assert after["val/loss"] < before["val/loss"]
    assert after["val/dice"] > 0.9 > before["val/dice"]


def test_non_finite_loss_stops_with_the_step(tmp_path):
    class Broken(Oracle):
        def forward(self, x):
            return x[:, :1] * float("nan") * self.scale

    with pytest.raises(NonFiniteLossError, match=r"the training loss is nan at epoch 0, step 0"):
        trainer(tmp_path, max_epochs=1).fit(ICHSegmentationModule(Broken()), loader())


def test_inverse_time_decay_matches_keras():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-5)
    scheduler = inverse_time_decay(optimizer, decay=1e-5 / 150)
    for _ in range(1000):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 / (1 + 1e-5 / 150 * 1000))


def test_scheduler_is_configured_per_step():
    module = ICHSegmentationModule(Oracle(), scheduler=partial(inverse_time_decay, decay=0.1))
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(config["optimizer"], torch.optim.Adam)
    assert config["optimizer"].param_groups[0]["lr"] == 1e-5


def test_checkpoint_holds_meta_and_loads_weights_only(tmp_path):
    meta = {"model": {"base_filters": 4}, "data": {"windows": ["brain"], "working_size": 64}}
    module = ICHSegmentationModule(UNet(base_filters=4, depth=2), meta=meta)
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    fit.fit(module, loader())
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    assert checkpoint["ichseg"] == meta
    assert all(key.startswith("net.") for key in checkpoint["state_dict"])


def test_overlay_grid_is_logged_to_tensorboard(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run")
    module = ICHSegmentationModule(Oracle(), image_log_every_n_epochs=1, image_log_samples=3)
    trainer(tmp_path, logger=logger, max_epochs=1, limit_train_batches=1).fit(
        module, loader(), loader()
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    (tag,) = events.Tags()["images"]
    image = events.Images(tag)[0]
    assert (image.height, image.width) == (3 * 32 + 2 * 2, 3 * 32 + 2 * 2)
    assert {"train/loss_epoch", "val/loss", "val/jaccard", "val/dice"} <= set(
        events.Tags()["scalars"]
    )


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    net = UNet(base_filters=4, depth=2).eval()
    x = torch.rand(2, 1, 32, 32)
    plain = ICHSegmentationModule(net)(x)
    fast = ICHSegmentationModule(net, channels_last=True)
    fast.setup("fit")
    torch.testing.assert_close(fast(x), plain, rtol=1e-5, atol=1e-5)


def test_test_step_logs_window_metrics(tmp_path):
    metrics = trainer(tmp_path).test(ICHSegmentationModule(Oracle()), loader(), verbose=False)[0]
    assert metrics["test/jaccard"] == pytest.approx(1.0) and metrics["test/dice"] == pytest.approx(
        1.0
    )
    assert "test/loss" in metrics


def test_bf16_mixed_precision_trains_and_scores(tmp_path):
    torch.manual_seed(0)
    module = ICHSegmentationModule(
        UNet(base_filters=4, depth=2, norm="batch"), optimizer=partial(torch.optim.Adam, lr=3e-3)
    )
    fit = trainer(tmp_path, max_epochs=2, precision="bf16-mixed")
    fit.fit(module, loader(n=8), loader(seed=1))
    metrics = fit.validate(module, loader(seed=1), verbose=False)[0]
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert 0.0 <= metrics["val/dice"] <= 1.0
    assert all(p.dtype == torch.float32 for p in module.parameters())  # weights stay float32


@pytest.mark.slow
def test_torch_compile_gives_the_same_logits_and_plain_weight_names(tmp_path):
    torch.manual_seed(0)
    net = UNet(base_filters=4, depth=2).eval()
    x = torch.rand(2, 1, 32, 32)
    compiled = ICHSegmentationModule(net, compile=True)
    compiled.setup("fit")
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)
    assert all(key.startswith("net.") and "_orig_mod" not in key for key in compiled.state_dict())
