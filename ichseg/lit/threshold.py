"""The threshold baseline in a Trainer: :class:`ThresholdModule` fits the brain-window band of an
:class:`~ichseg.models.intensity_band.IntensityBand` without gradients, once per training epoch,
on exactly the training patients' slices (:mod:`ichseg.baselines.threshold` does the search), so
``python -m ichseg.train experiment=threshold`` runs through the same Trainer, checkpoints,
evaluation and TensorBoard as the networks. The search files are written by
:class:`~ichseg.lit.callbacks.threshold_report.ThresholdReport`. docs/threshold.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import pytorch_lightning as pl
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex

from ichseg.baselines.threshold import (
    LOWER_RANGE,
    UPPER_RANGE,
    IntensityHistograms,
    Objective,
    SliceSource,
    ThresholdSearch,
    _check_objective,
    _check_range,
    search_thresholds,
    store_histograms,
)
from ichseg.errors import ConfigError, DatasetError
from ichseg.lit.callbacks.images import keep_overlay_batch, log_overlay_grid
from ichseg.models.intensity_band import IntensityBand
from ichseg.utils.plain import to_plain

__all__ = ["Source", "ThresholdData", "ThresholdModule", "TrainingRound"]

Source = Literal["auto", "store", "batches"]


class TrainingRound(Protocol):
    """The cross-validation round of the data side (:class:`ichseg.data.folds.CVRound`)."""

    #: the round's number (its test fold)
    index: int
    #: the training patients' ids
    train: Sequence[int]


@runtime_checkable
class ThresholdData(Protocol):
    """All that :class:`ThresholdModule` reads from ``trainer.datamodule``.

    :class:`~ichseg.data.CTICHDataModule` provides it. A DataModule without all of these members
    (or no DataModule) counts as no data side: the module then fits from the batches, unchecked.
    """

    #: the slice store (None before ``setup``)
    store: SliceSource | None
    #: the CT windows stacked as input channels ("brain" must be the band's channel)
    channels: Sequence[str]
    #: the training augmentation's options (falsy: none)
    augmentation_options: Mapping[str, Any] | None
    #: the CV round (None before ``setup``)
    cv_round: TrainingRound | None

    def rows(self, split: str) -> np.ndarray:
        """The store rows of a split's slices."""
        ...


class ThresholdModule(pl.LightningModule):
    """The threshold baseline as a LightningModule: one gradient-free "training" epoch.

    Fitting (once per training epoch, before that epoch's validation, or at its end when there is
    none) uses exactly the training patients' slices:

    * ``source="store"``: every row of ``rows("train")`` in the DataModule's slice store
      (:class:`ThresholdData`): whole working-size slices as stored, never augmented, each once,
      whatever the loader does. The training pass only iterates.
    * ``source="batches"``: histograms accumulated in ``training_step`` from the training batches,
      de-duplicated by ``(patient, slice)`` when the batches carry them. Needs whole, unaugmented
      slices each once (``data.mode=full_slice``, ``data.train_slices=all``, no augmentation) and
      one process; checked against the DataModule when it has a store.
    * ``"auto"``: the store when the DataModule has one, else the batches.

    Then :func:`~ichseg.baselines.threshold.search_thresholds` picks the band; it is kept in
    ``net.lower`` / ``net.upper`` (state-dict buffers, so checkpoints carry it) and in
    :attr:`search`, and logged as ``threshold/lower``, ``threshold/upper``,
    ``threshold/train_objective``. Validation and test steps log ``val/jaccard``, ``val/dice``
    (``test/...``) pooled over the batches' pixels, as
    :class:`~ichseg.lit.segmentation.ICHSegmentationModule` does (no loss).

    Args:
        net: the :class:`IntensityBand` (default: a new one on channel 0).
        lower_range, upper_range: the grid, inclusive (the paper: 100..210 and 210..255).
        objective: ``"slice_mean"`` or ``"pooled"`` (:mod:`ichseg.baselines.threshold`).
        source: where the training slices come from (above).
        chunk_slices: slices per chunk of the search (memory bound).
        threshold: probability threshold of the validation metrics (the band's probabilities are
            0 / 1, so any value in [0, 1) gives the same masks).
        image_log_every_n_epochs, image_log_samples: overlay grid of a fixed validation batch.
        meta: plain-data description of the run stored in checkpoints under ``"ichseg"``.
    """

    def __init__(
        self,
        net: IntensityBand | None = None,
        lower_range: Sequence[int] = LOWER_RANGE,
        upper_range: Sequence[int] = UPPER_RANGE,
        objective: Objective = "slice_mean",
        source: Source = "auto",
        chunk_slices: int = 128,
        threshold: float = 0.5,
        image_log_every_n_epochs: int = 1,
        image_log_samples: int = 8,
        meta: Mapping[str, Any] | None = None,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        if output_dir is not None:  # checkpoints of earlier releases carry it in their hparams
            warnings.warn(
                "ThresholdModule(output_dir=...) is ignored: the search files now go where "
                "callbacks.threshold_report.output_dir says",
                FutureWarning,
                stacklevel=2,
            )
        # plain values first: checkpoints must load with weights_only=True (no ListConfig)
        lower_range = [int(v) for v in lower_range]
        upper_range = [int(v) for v in upper_range]
        _check_range("lower_range", lower_range)
        _check_range("upper_range", upper_range)
        self.save_hyperparameters(ignore=["net", "meta", "output_dir"], logger=False)
        self.automatic_optimization = False
        self.net = net if net is not None else IntensityBand()
        self.lower_range = tuple(lower_range)
        self.upper_range = tuple(upper_range)
        self.objective = _check_objective(objective)
        if source not in ("auto", "store", "batches"):
            raise ConfigError(
                f"threshold source must be 'auto', 'store' or 'batches', not {source!r}"
            )
        self.source = source
        self.chunk_slices = int(chunk_slices)
        self.threshold = float(threshold)
        self.image_log_every_n_epochs = image_log_every_n_epochs
        self.image_log_samples = image_log_samples
        self.meta = dict(meta or {})
        self.register_buffer("train_objective", torch.tensor(float("nan"), dtype=torch.float64))
        self.val_metrics = MetricCollection(
            {"jaccard": BinaryJaccardIndex(), "dice": BinaryF1Score()}, prefix="val/"
        )
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        #: the latest fit's search (None until fitted here; a loaded band has none)
        self.search: ThresholdSearch | None = None
        self._batch_histograms: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        self._fitted_epoch: int | None = None
        self._fixed_val_batch: dict[str, torch.Tensor] | None = None
        #: Compute the window-level test metrics in ``test_step`` (switched off by the stitched
        #: evaluation when it scores the test split: each test tile is predicted once).
        self.window_test_metrics = True

    # ------------------------------------------------------------------ prediction

    @property
    def fitted(self) -> bool:
        return self.net.fitted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, H, W): +1e4 inside the band, -1e4 outside."""
        return self.net(images)

    @torch.no_grad()
    def predict_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) float32: exactly 1 inside the band, 0 outside."""
        return self.net.predict_mask(images).to(torch.float32)

    # ------------------------------------------------------------------ the data side

    def _data(self) -> ThresholdData | None:
        """The attached Trainer's DataModule when it provides :class:`ThresholdData`, else None."""
        trainer = self._trainer
        datamodule = None if trainer is None else trainer.datamodule
        return datamodule if isinstance(datamodule, ThresholdData) else None

    def resolved_source(self) -> str:
        """``"store"`` or ``"batches"``: the configured source, ``"auto"`` resolved."""
        if self.source != "auto":
            return self.source
        data = self._data()
        return "store" if data is not None and data.store is not None else "batches"

    def search_record(self) -> dict[str, Any]:
        """Where the fit's slices came from: the source and, with a CV DataModule, the round."""
        record: dict[str, Any] = {"source": self.resolved_source()}
        data = self._data()
        if data is not None and data.cv_round is not None:
            record["fold"] = int(data.cv_round.index)
            record["training_patients"] = [int(p) for p in data.cv_round.train]
        return record

    # ------------------------------------------------------------------ fitting

    def configure_optimizers(self) -> None:
        return None

    def on_fit_start(self) -> None:
        data = self._data()
        if data is not None and data.channels is not None:
            channels = tuple(data.channels)
            name = channels[self.net.channel] if self.net.channel < len(channels) else None
            if name != "brain":
                raise ConfigError(
                    f"the threshold baseline reads the brain window from input channel "
                    f"{self.net.channel}, but data.channels={list(channels)}"
                )
        if self.resolved_source() == "batches" and self.trainer.world_size > 1:
            raise ConfigError(
                "the threshold baseline fits from training batches on one process only; use "
                "model.source=store with several processes"
            )

    def on_train_epoch_start(self) -> None:
        self._batch_histograms = {}

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate histograms (source ``batches``); nothing to do for ``store``.

        Each batch also counts as one (empty) optimiser step: ``ModelCheckpoint`` saves nothing
        while the global step is 0.
        """
        self._count_step()
        if self.resolved_source() != "batches":
            return None
        tiles = batch.get("tile", batch.get("window"))
        if tiles is not None and bool((tiles >= 0).any()):
            raise ConfigError(
                "the threshold baseline fitted from batches needs whole slices "
                "(data.mode=full_slice), not tiles; or use model.source=store"
            )
        images = self.net.to_levels(batch["image"])[:, 0].to(torch.uint8).cpu().numpy()
        masks = (batch["mask"][:, 0] > 0.5).cpu().numpy()
        histograms = IntensityHistograms.from_slices(images, masks)
        has_keys = "patient" in batch and "slice" in batch
        for i in range(histograms.n_slices):
            key = (
                (int(batch["patient"][i]), int(batch["slice"][i]))
                if has_keys
                else (batch_idx, i, len(self._batch_histograms))
            )
            self._batch_histograms[key] = (histograms.inside[i], histograms.outside[i])
        return None

    def _count_step(self) -> None:
        """Step Lightning's stand-in optimiser so that ``trainer.global_step`` advances.

        Kept on purpose: ``ModelCheckpoint`` saves nothing (no ``best-*.ckpt``, no ``last.ckpt``)
        while the global step is 0, and the step count is recorded in checkpoints and in the
        evaluation report. Under manual optimisation only an optimiser step advances it; any
        other way would set Lightning's private loop counters. Not under fp16's gradient scaler,
        which refuses an optimiser without gradients.
        """
        if str(self.trainer.precision).startswith("16"):
            return
        optimizer = self.optimizers()
        if not isinstance(optimizer, list):
            optimizer.step()

    def _training_histograms(self) -> IntensityHistograms:
        """The training slices' histograms from the configured source."""
        data = self._data()
        if self.resolved_source() == "store":
            if data is None or data.store is None:
                raise ConfigError(
                    "model.source=store needs a DataModule with a slice store (CTICHDataModule); "
                    "use model.source=batches"
                )
            ich_only = self.objective == "slice_mean"
            return store_histograms(
                data.store, data.rows("train"), self.net.channel, ich_only, chunk=32
            )
        if not self._batch_histograms:
            raise DatasetError("the threshold baseline saw no training batch to fit on")
        if data is not None and data.augmentation_options:
            raise ConfigError(
                "the threshold baseline fitted from batches needs unaugmented slices "
                "(data.augmentation=null)"
            )
        if data is not None and data.store is not None:
            expected = len(data.rows("train"))
            if len(self._batch_histograms) != expected:
                raise ConfigError(
                    f"the threshold baseline saw {len(self._batch_histograms)} distinct training "
                    f"slices but the training patients have {expected}: fitting from batches needs "
                    "every slice once (data.mode=full_slice, data.train_slices=all, no batch "
                    "limit); or use model.source=store"
                )
        keys = sorted(self._batch_histograms)
        inside = np.stack([self._batch_histograms[k][0] for k in keys])
        outside = np.stack([self._batch_histograms[k][1] for k in keys])
        return IntensityHistograms(inside, outside)

    def fit_band(self, histograms: IntensityHistograms | None = None) -> ThresholdSearch:
        """Search the band on ``histograms`` (default: the training slices of the attached
        Trainer, from the configured source), set it and keep the search in :attr:`search`."""
        if histograms is None:
            histograms = self._training_histograms()
        search = search_thresholds(
            histograms, self.lower_range, self.upper_range, self.objective, self.chunk_slices
        )
        self.net.set_band(search.lower, search.upper)
        self.train_objective.fill_(search.value)
        self.search = search
        if self._trainer is not None:
            self._fitted_epoch = self.current_epoch
        return search

    def _fit_if_needed(self) -> None:
        if self._fitted_epoch != self.current_epoch:
            self.fit_band()

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        trainer = self.trainer
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._fit_if_needed()  # validation of a training epoch runs before on_train_epoch_end

    def on_train_epoch_end(self) -> None:
        self._fit_if_needed()
        self._batch_histograms = {}
        self.log("threshold/lower", float(self.net.lower), on_epoch=True, sync_dist=True)
        self.log("threshold/upper", float(self.net.upper), on_epoch=True, sync_dist=True)
        self.log(
            "threshold/train_objective", float(self.train_objective), on_epoch=True, sync_dist=True
        )

    # ------------------------------------------------------------------ validation and test

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        if not self.fitted:  # sanity check before fitting
            return
        self.val_metrics.update(
            self.predict_probabilities(batch["image"]).int(), batch["mask"].int()
        )
        if batch_idx == 0:
            keep_overlay_batch(self, batch)

    def on_validation_epoch_end(self) -> None:
        if not self.fitted:
            return
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            log_overlay_grid(self)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Window-level test metrics (``test/jaccard``, ``test/dice``), unless
        :attr:`window_test_metrics` is off."""
        if not self.window_test_metrics:
            return
        self.test_metrics.update(
            self.predict_probabilities(batch["image"]).int(), batch["mask"].int()
        )

    def on_test_epoch_start(self) -> None:
        if not self.fitted:
            raise ConfigError(
                "the threshold baseline has no band to test: fit it first (or load a checkpoint)"
            )
        self.test_metrics.reset()

    def on_test_epoch_end(self) -> None:
        if self.window_test_metrics:
            self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = dict(self.meta)
        if self.fitted:
            meta["threshold_band"] = {
                "lower": int(self.net.lower),
                "upper": int(self.net.upper),
                "objective": self.objective,
                "train_objective": float(self.train_objective),
                "inclusive": True,
            }
        checkpoint["ichseg"] = to_plain(meta)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.meta = {k: v for k, v in checkpoint.get("ichseg", {}).items() if k != "threshold_band"}
        #: (epoch, global_step) at which the loaded band was saved (named in reports).
        self.loaded_position = (
            int(checkpoint.get("epoch", 0)),
            int(checkpoint.get("global_step", 0)),
        )
