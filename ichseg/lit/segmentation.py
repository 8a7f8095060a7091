"""The LightningModule: any segmentation network trained with sigmoid BCE, logged to TensorBoard.

``ICHSegmentationModule`` wraps an ``nn.Module`` that maps (B, C, H, W) images to (B, 1, H, W)
logits. It trains with ``BCEWithLogitsLoss`` (optionally positive-weighted, or any loss module),
builds its optimiser and scheduler from partials (the paper: Adam, lr 1e-5, Keras inverse-time
decay), and logs ``train/loss``, ``val/loss``, ``val/jaccard`` and ``val/dice`` (pooled over all
validation pixels, from torchmetrics on integer tensors) plus, every few epochs, a picture grid of a
fixed validation batch. Batches are dicts with ``image`` (B, C, H, W) float and ``mask``
(B, 1, H, W) float in {0, 1}.

GPU options: ``channels_last`` memory format, ``compile`` (``torch.compile`` of the network's
forward, the weights stay under ``net.``), and any Lightning ``precision`` (e.g. ``bf16-mixed``).

Guards and resumption: a non-finite training loss, validation loss or validation output stops the
run with :class:`~ichseg.errors.TrainingDiverged` before a checkpoint of that epoch is kept, and no
checkpoint with non-finite weights is ever written. Every training epoch starts from a random state
derived from ``(seed, epoch, rank)`` and checkpoints carry the random state, so a run resumed from
``last.ckpt`` continues exactly as the uninterrupted run would have. docs/training.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex

from ichseg.errors import ConfigError, TrainingDiverged
from ichseg.lit.callbacks.images import keep_overlay_batch, log_overlay_grid
from ichseg.utils.plain import to_plain
from ichseg.utils.rng import derived_seed, rng_state, seed_all, set_rng_state

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class NonFiniteLossError(TrainingDiverged):
    """The training loss became NaN or infinite."""


#: What a diverged run can try, ending every :class:`TrainingDiverged` message.
DIVERGED_HINT = (
    "lower model.optimizer.lr or train in full precision (trainer.precision=32-true) and start "
    "the run again (a resumed run would restore the optimiser's learning rate)"
)


def first_non_finite(tensors: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` holding NaN or inf, or None."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                return name
    return None


def inverse_time_decay(optimizer: Optimizer, decay: float) -> LambdaLR:
    """Keras' per-step learning-rate decay: ``lr_t = lr / (1 + decay * step)``.

    The paper's code used ``decay = lr / epochs``. Step it every optimiser step.
    """
    return LambdaLR(optimizer, lambda step: 1.0 / (1.0 + decay * step))


class ICHSegmentationModule(pl.LightningModule):
    """Binary ICH segmentation with any network that returns logits.

    Args:
        net: the network, (B, C, H, W) -> (B, 1, H, W) logits.
        optimizer: a partial taking the parameters (default: Adam, lr 1e-5, as the paper).
        scheduler: a partial taking the optimiser, or None.
        scheduler_interval: "step" or "epoch".
        loss: a loss module on (logits, target); default ``BCEWithLogitsLoss(pos_weight)``.
        pos_weight: weight of the positive (ICH) pixels in the default BCE; refused together with
            ``loss`` (a loss module takes its own, e.g. ``DiceBCELoss(pos_weight=...)``).
        threshold: probability threshold for the validation metrics.
        image_log_every_n_epochs: log the overlay grid of a fixed validation batch this often
            (0: never).
        image_log_samples: samples in that grid.
        channels_last: run the network in channels-last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the network's forward.
        check_finite_loss: stop with :class:`~ichseg.errors.TrainingDiverged` when the training
            loss, the validation loss or the validation outputs are NaN or infinite, and refuse to
            save a checkpoint whose weights are (no checkpoint of a diverged epoch is kept).
        epoch_seed: start every training epoch from a random state (torch, numpy, python) derived
            from ``(seed, epoch, rank)``, with ``seed`` the one given to ``pl.seed_everything``
            (``PL_GLOBAL_SEED``; nothing is reseeded without it): dropout and any other draw of
            an epoch do not depend on what ran before it, so a resumed run repeats an
            uninterrupted one bit for bit.
        meta: plain-data description of the run (model and preprocessing config) stored in every
            checkpoint under ``"ichseg"``, so that prediction can rebuild the network and its
            inputs.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        loss: nn.Module | None = None,
        pos_weight: float | None = None,
        threshold: float = 0.5,
        image_log_every_n_epochs: int = 5,
        image_log_samples: int = 8,
        channels_last: bool = False,
        compile: bool = False,
        check_finite_loss: bool = True,
        meta: Mapping[str, Any] | None = None,
        epoch_seed: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["net", "optimizer", "scheduler", "loss", "meta"], logger=False
        )
        self.net = net
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-5)
        self.scheduler_factory = scheduler
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', not {scheduler_interval!r}"
            )
        self.scheduler_interval = scheduler_interval
        if loss is not None and pos_weight is not None:
            raise ConfigError(
                f"model.pos_weight={pos_weight} applies to the default BCE only, not to the "
                "configured model.loss: set the loss's own pos_weight (model.loss.pos_weight)"
            )
        if loss is None:
            weight = None if pos_weight is None else torch.tensor([float(pos_weight)])
            loss = nn.BCEWithLogitsLoss(pos_weight=weight)
        self.loss = loss
        self.threshold = threshold
        self.image_log_every_n_epochs = image_log_every_n_epochs
        self.image_log_samples = image_log_samples
        self.channels_last = channels_last
        self.check_finite_loss = check_finite_loss
        self.epoch_seed = bool(epoch_seed)
        # validation batches with a non-finite loss or output in the current epoch
        self._val_non_finite = torch.zeros((), dtype=torch.int64)
        self.meta = dict(meta or {})
        self.val_metrics = MetricCollection(
            {"jaccard": BinaryJaccardIndex(), "dice": BinaryF1Score()}, prefix="val/"
        )
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self._compiled_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._compile = compile
        self._fixed_val_batch: dict[str, torch.Tensor] | None = None
        #: Compute the window-level test metrics in ``test_step``. The stitched evaluation
        #: switches them off when it scores the test split itself, so that a test phase runs the
        #: network over each test tile once (docs/evaluation.md).
        self.window_test_metrics = True

    # ------------------------------------------------------------------ forward

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self._compile and self._compiled_forward is None:
            # not registered as a submodule: checkpoints keep the plain "net." weight names
            object.__setattr__(self, "_compiled_forward", torch.compile(self.net))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, H, W) for images (B, C, H, W)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self._compiled_forward is not None:
            return self._compiled_forward(images)
        return self.net(images)

    @torch.no_grad()
    def predict_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities (B, 1, H, W) in float32."""
        return torch.sigmoid(self(images).float())

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits.float(), batch["mask"].float())
        if self.check_finite_loss and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at epoch {self.current_epoch}, "
                f"step {self.global_step} "
                f"(batch {batch_idx}); no checkpoint of this epoch is kept: {DIVERGED_HINT}, "
                "or check the input data"
            )
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(logits),
        )
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        target = batch["mask"]
        loss = self.loss(logits.float(), target.float())
        if self.check_finite_loss:
            bad = ~torch.isfinite(loss) | ~torch.isfinite(logits).all()
            self._val_non_finite = self._val_non_finite.to(bad.device) + bad.long()
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(logits)
        )
        predicted = (torch.sigmoid(logits.float()) > self.threshold).int()
        self.val_metrics.update(predicted, target.int())
        if batch_idx == 0:
            keep_overlay_batch(self, batch)

    def on_validation_epoch_start(self) -> None:
        # fresh metric states in the current grad mode (a `validate` before `fit` leaves
        # inference-mode tensors behind)
        self.val_metrics.reset()
        self._val_non_finite = torch.zeros((), dtype=torch.int64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        self._check_finite_validation()
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self._log_overlay_grid()

    def _check_finite_validation(self) -> None:
        """Raise :class:`TrainingDiverged` when a validation batch (on any rank) had a non-finite
        loss or output: callbacks saving checkpoints (``on_validation_end``,
        ``on_train_epoch_end``) run after this hook, so nothing of this epoch is kept."""
        if not self.check_finite_loss:
            return
        count = int(self._val_non_finite.item())
        trainer = self._trainer
        diverged = count > 0
        if trainer is not None:
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if not diverged:
            return
        weights = first_non_finite(self.state_dict())
        if weights:
            cause = f"the weight {weights} is NaN or infinite"
        else:
            largest = max((float(p.detach().abs().max()) for p in self.parameters()), default=0.0)
            cause = (
                f"the weights are finite (largest magnitude {largest:.3g}): activations overflowed"
            )
        sanity = trainer is not None and trainer.sanity_checking
        where = (
            "in the sanity check before training"
            if sanity
            else f"at epoch {self.current_epoch}, step {self.global_step}"
        )
        raise TrainingDiverged(
            f"training diverged {where}: the validation loss or network outputs are NaN or "
            f"infinite on {count} validation batch(es) and {cause}; no checkpoint of this epoch "
            f"is kept: {DIVERGED_HINT}"
        )

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Window-level test metrics (``test/loss``, ``test/jaccard``, ``test/dice``), unless
        :attr:`window_test_metrics` is off (then the network does not run on the batch)."""
        if not self.window_test_metrics:
            return
        logits = self(batch["image"])
        target = batch["mask"]
        loss = self.loss(logits.float(), target.float())
        self.log("test/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(logits))
        self.test_metrics.update(
            (torch.sigmoid(logits.float()) > self.threshold).int(), target.int()
        )

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()

    def on_test_epoch_end(self) -> None:
        if self.window_test_metrics:
            self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def _log_overlay_grid(self) -> None:
        log_overlay_grid(self)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------ checkpoints

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Reseed before an epoch's first step rather than in on_train_epoch_start: Lightning
        # skips that hook in the first epoch of a run resumed from an end-of-epoch checkpoint.
        seed = os.environ.get("PL_GLOBAL_SEED")
        if self.epoch_seed and seed is not None and batch_idx == 0:
            seed_all(derived_seed(int(seed), self.current_epoch, self.global_rank))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.check_finite_loss:
            name = first_non_finite(checkpoint.get("state_dict", {}))
            if name is not None:
                raise TrainingDiverged(
                    f"training diverged at epoch {self.current_epoch}, step {self.global_step}: "
                    f"the weight {name} is NaN or infinite, so the checkpoint of this epoch is "
                    f"not written: {DIVERGED_HINT}"
                )
        checkpoint["ichseg"] = to_plain(self.meta)
        checkpoint["ichseg_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.meta = dict(checkpoint.get("ichseg", {}))
        trainer = self._trainer
        state = checkpoint.get("ichseg_rng")
        if state is not None and trainer is not None and trainer.state.fn == "fit":
            set_rng_state(state)  # resuming: the random state where the run stopped
        #: (epoch, global_step) at which the loaded weights were saved (named in reports).
        self.loaded_position = (
            int(checkpoint.get("epoch", 0)),
            int(checkpoint.get("global_step", 0)),
        )
