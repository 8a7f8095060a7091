"""The stitched full-slice evaluation as a Lightning callback: where the paper's numbers come from.

:class:`StitchedEvaluation` scores every slice of the round's val / test patients on their
original grid (:mod:`ichseg.eval.scoring`), at test time and, if asked, every n-th validation
epoch (``val/stitched_dice`` for a ``ModelCheckpoint``); it can first choose the operating point
on val (:mod:`ichseg.eval.tuning`). Under DDP each rank scores its share of the patients
(:func:`~ichseg.eval.scoring.shard_patients`) and the results are gathered and merged, so every
slice is scored once; rank 0 writes the report files (:func:`ichseg.eval.report.write_report`)
and the TensorBoard tables and overlays (:mod:`ichseg.lit.callbacks.tensorboard_report`). The
logged scalars and the files: docs/evaluation.md.

A test phase runs the network once over each test tile: the callback switches off the module's
window-level test metrics (``window_test_metrics``) when it scores the test split itself, and
``tune_on_val`` predicts each validation patient once for every threshold and post-processing.
Each scored split shows tqdm bars over its patients and the current patient's tiles when the
trainer shows its own progress bar (:func:`progress_enabled`) on a terminal.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ichseg.errors import ConfigError
from ichseg.eval.calibration import (
    PixelSample,
    calibrated_operating_spec,
    fit_on_validation,
    operating_point_record,
    save_png,
    split_calibration,
)
from ichseg.eval.counts import DEFAULT_THRESHOLDS
from ichseg.eval.gallery import OverlayGallery
from ichseg.eval.metrics import PAPER_MIN_AREA
from ichseg.eval.report import FoldResult, json_safe, write_report
from ichseg.eval.scoring import (
    EvaluationData,
    ShardResult,
    autocast_for_precision,
    inference_spec_of,
    merge_shards,
    report_settings,
    scalar_metrics,
    score_scans,
    score_scans_variants,
    shard_patients,
)
from ichseg.eval.tables import EvaluationTables, compute_tables
from ichseg.eval.tuning import (
    TUNE_THRESHOLDS,
    TuningChoice,
    choose_on_validation,
    has_morphology,
    tuning_variants,
)
from ichseg.inference.predictor import Predictor
from ichseg.lit.callbacks.tensorboard_report import has_tensorboard, log_stitched_report
from ichseg.specs import InferenceSpec

SPLITS: tuple[str, ...] = ("val", "test")


def progress_enabled(trainer: pl.Trainer) -> bool:
    """Whether the stitched evaluation may show progress bars: rank 0 of a trainer whose own
    progress bar is on (``enable_progress_bar`` and a refresh rate above 0); tqdm then still
    shows them only on a terminal."""
    if getattr(trainer, "global_rank", 0) != 0:
        return False
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None:
        return False
    if getattr(bar, "is_disabled", False) or not getattr(bar, "refresh_rate", 1):
        return False
    return True


class EvaluationProgress:
    """tqdm bars of one stitched evaluation: the patients of the split, and the tiles (whole
    slices in full-slice mode) of the patient being predicted. ``update`` is what
    :meth:`~ichseg.inference.Predictor.working_probabilities` calls; ``enabled=False`` shows
    nothing, ``None`` only on a terminal (tqdm's rule)."""

    def __init__(
        self, split: str, n_patients: int, tiles_per_slice: int, unit: str, enabled: bool | None
    ) -> None:
        from tqdm.auto import tqdm

        disable = True if enabled is False else None
        self.tiles_per_slice = int(tiles_per_slice)
        self.patients = tqdm(
            total=n_patients, desc=f"Stitched {split}", unit="patient", leave=False,
            disable=disable, dynamic_ncols=True,
        )  # fmt: skip
        self.tiles = tqdm(
            total=0, desc="patient", unit=unit, leave=False, disable=disable, dynamic_ncols=True
        )

    def scans(self, scans: Iterable[Any]) -> Iterator[Any]:
        """``scans`` as they are, advancing the bars: the tile bar restarts with each patient."""
        for scan in scans:
            self.tiles.reset(total=int(scan.n_slices) * self.tiles_per_slice)
            self.tiles.set_description(f"patient {scan.patient_id}", refresh=False)
            yield scan
            self.patients.update(1)

    def update(self, n: int) -> None:
        self.tiles.update(n)

    def close(self) -> None:
        self.tiles.close()
        self.patients.close()


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (just ``[obj]`` without DDP)."""
    distributed = torch.distributed
    if world_size <= 1 or not (distributed.is_available() and distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * distributed.get_world_size()
    distributed.all_gather_object(gathered, obj)
    return gathered


def checkpoint_position(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, int]:
    """``(epoch, global_step)`` of the weights being scored: those recorded in the checkpoint
    that was loaded for testing (``pl_module.loaded_position``), else the trainer's."""
    loaded = getattr(pl_module, "loaded_position", None)
    if getattr(trainer, "ckpt_path", None) and loaded is not None:
        return int(loaded[0]), int(loaded[1])
    return int(trainer.current_epoch), int(trainer.global_step)


class StitchedEvaluation(pl.Callback):
    """Score every slice of the round's val / test patients on the original grid (module docstring).

    Args:
        splits: splits evaluated at test time (``"test"``, ``"val"``).
        every_n_val_epochs: also evaluate the val split at the end of every n-th validation epoch
            of fitting and log ``val/stitched_dice`` etc. (0: only at test).
        thresholds: probability thresholds scored (Table 6; default 0.5 ... 0.9); the inference
            spec's threshold is added.
        min_area: slice-detection minimum area in pixels at ``inference.reference_size`` (the
            paper: 400 at 640), scaled by area to the scored grid; 0 means "any predicted pixel".
        inference: the :class:`~ichseg.specs.InferenceSpec` (or a mapping of its fields): tile
            blending, tiles per forward pass, autocast, and the operating point (threshold,
            closing / opening) of Table 5, the subtype / age / volume tables, the overlays and the
            saved masks. It is stored in the checkpoints, so that ``ichseg.predict`` applies the
            model exactly as it was scored here.
        output_dir: where the report files go (None: the trainer's ``default_root_dir``).
        log_tables: log the markdown tables to TensorBoard as text.
        n_overlays: best and worst ICH slices shown as TensorBoard images (0: none).
        tune_on_val: at test time, first score the VAL split at every threshold of
            ``tune_thresholds`` with and without the post-processing, pick the pair with the
            highest paper Dice on val (ties: without post-processing, as nnU-Net keeps it only
            when it helps; then the threshold closest to the spec's) and apply it to every split
            scored; the choice and the grid go into the report (``settings.tuned_on_val``), the
            logs (``val/tuned_threshold``, ``val/tuned_postprocess``, ``val/tuned_dice``) and the
            tested checkpoint's metadata (:func:`ichseg.checkpoint.store_operating_point`), where
            ``ichseg.predict`` finds it. The test split never influences the choice.
        tune_thresholds: the thresholds tried on val (default 0.3 ... 0.7).
        save_masks: also write each scored patient's mask (at the operating point, in the scan's
            space) as ``masks/<patient>_ich_seg.nii.gz`` beside the report (test time only).
        calibrate: with ``tune_on_val``, also fit a temperature ``T`` on a seeded pixel sample
            of the same val pass (:func:`~ichseg.eval.calibration.fit_temperature`) and store it
            in the spec (``inference.temperature``) with the tuned threshold mapped to the
            calibrated scale, so that the masks stay those chosen; every split is then scored
            with calibrated probabilities (Table 6's thresholds included). False: the configured
            temperature is kept. Every written report states the ECE before / after on its split
            and draws ``reliability.png``.
    """

    def __init__(
        self,
        splits: Sequence[str] = ("test",),
        every_n_val_epochs: int = 0,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        min_area: float = PAPER_MIN_AREA,
        inference: InferenceSpec | Mapping[str, Any] | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        log_tables: bool = True,
        n_overlays: int = 4,
        tune_on_val: bool = False,
        tune_thresholds: Sequence[float] = TUNE_THRESHOLDS,
        save_masks: bool = False,
        calibrate: bool = True,
    ) -> None:
        super().__init__()
        self.splits = tuple(str(s) for s in ([splits] if isinstance(splits, str) else splits))
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ConfigError(
                f"stitched evaluation splits must be among val, test, not {bad or '[]'}"
            )
        if every_n_val_epochs < 0:
            raise ConfigError(f"every_n_val_epochs must be 0 or more, got {every_n_val_epochs}")
        levels = [float(t) for t in thresholds]
        if not levels or any(not 0.0 <= t <= 1.0 for t in levels):
            raise ConfigError(f"thresholds must be probabilities in [0, 1], got {levels}")
        if min_area < 0:
            raise ConfigError(f"min_area must be 0 or more pixels, got {min_area}")
        tune_levels = [float(t) for t in tune_thresholds]
        if not tune_levels or any(not 0.0 <= t <= 1.0 for t in tune_levels):
            raise ConfigError(f"tune_thresholds must be probabilities in [0, 1], got {tune_levels}")
        self.every_n_val_epochs = int(every_n_val_epochs)
        self.thresholds = tuple(sorted(set(levels)))
        self.min_area = float(min_area)
        self.inference = inference_spec_of(inference)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.log_tables = bool(log_tables)
        self.n_overlays = int(n_overlays)
        self.tune_on_val = bool(tune_on_val)
        self.tune_thresholds = tuple(sorted(set(tune_levels)))
        self.save_masks = bool(save_masks)
        self.calibrate = bool(calibrate)
        #: The last evaluation of each split: ``{split: (ShardResult, EvaluationTables)}``.
        self.results: dict[str, tuple[ShardResult, EvaluationTables]] = {}
        #: The last choice made on val (``tune_on_val``), or None.
        self.tuning: TuningChoice | None = None
        #: The checkpoint the last tuned operating point was written into, or None.
        self.operating_point_file: Path | None = None
        #: The temperature fitted on val at the last tuning (``tune_on_val``), or None:
        #: ``{"split", "temperature", "pixels", "bins", "ece_before", "ece_after", ...}``.
        self.calibration: dict[str, Any] | None = None
        #: The calibration summary of each split's last written report.
        self.calibration_reports: dict[str, dict[str, Any]] = {}
        self._tuning_pixels: PixelSample | None = None
        self._applied: InferenceSpec | None = None
        self._gallery: OverlayGallery | None = None
        self._window_metrics: bool | None = None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail early when the trainer's datamodule is no :class:`EvaluationData`."""
        needed = stage == "test" or (stage == "fit" and self.every_n_val_epochs > 0)
        if needed and not isinstance(trainer.datamodule, EvaluationData):
            raise ConfigError(
                "StitchedEvaluation needs a datamodule with eval_scans(split) and input_spec "
                "(CTICHDataModule): pass datamodule= to the trainer or remove the callback"
            )
        if stage == "test" and "test" in self.splits:
            # the test split is predicted here, once: the module's test loop skips the network
            self._window_metrics = getattr(pl_module, "window_test_metrics", None)
            if self._window_metrics is not None:
                pl_module.window_test_metrics = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "test" and self._window_metrics is not None:
            pl_module.window_test_metrics = self._window_metrics
            self._window_metrics = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.every_n_val_epochs
        if not every or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        # the same epochs as ModelCheckpoint(every_n_epochs=every)
        if (trainer.current_epoch + 1) % every == 0:
            self._run(trainer, pl_module, "val", write=False)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.operating_point_file = None
        self.calibration = None
        self.calibration_reports = {}
        if self.tune_on_val:
            self.tuning = self.tune(trainer, pl_module)
            choice = self.tuning
            self.calibration = self.fit_calibration(choice)
            self._applied = calibrated_operating_spec(self.inference, choice, self.calibration)
            for name, value in (("tuned_threshold", choice.threshold),
                                ("tuned_postprocess", float(choice.postprocess)),
                                ("tuned_dice", choice.dice),
                                ("temperature", self.calibration["temperature"])):  # fmt: skip
                pl_module.log(f"val/{name}", value, on_step=False, on_epoch=True,
                              sync_dist=False)  # fmt: skip
            self._store_operating_point(trainer, pl_module, self._applied, choice)
        try:
            for split in self.splits:
                self._run(trainer, pl_module, split, write=True)
        finally:
            self._applied = None

    # ------------------------------------------------------------------ evaluation

    @property
    def operating_spec(self) -> InferenceSpec:
        """The inference spec in use: the configured one, or the one tuned on val at test time."""
        return self._applied if self._applied is not None else self.inference

    def predictor(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, spec: InferenceSpec
    ) -> Predictor:
        """The one :class:`~ichseg.inference.Predictor` of this trainer's model, datamodule (its
        input spec) and precision (``autocast="auto"``)."""
        precision = str(getattr(trainer, "precision", "32-true"))
        spec = autocast_for_precision(spec, precision)
        return Predictor(pl_module, trainer.datamodule.input_spec, spec, pl_module.device)

    def tune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TuningChoice:
        """Score the val split over ``tune_thresholds`` x post-processing on / off (each patient
        predicted once) and choose (:func:`choose_on_validation`); every rank gets the same
        choice."""
        spec = self.inference
        variants = tuning_variants(spec)
        predictor = self.predictor(trainer, pl_module, spec)

        def score(scans: Iterator[Any], progress: EvaluationProgress) -> Any:
            pixels = PixelSample()
            results = score_scans_variants(predictor, scans, self.tune_thresholds,
                                           list(variants.values()), progress, pixels)  # fmt: skip
            return results, pixels

        gathered = self._score_split(trainer, pl_module, "val", score)
        merged = {
            enabled: merge_shards([parts[i] for parts, _ in gathered])
            for i, enabled in enumerate(variants)
        }
        self._tuning_pixels = PixelSample().merge(pixels for _, pixels in gathered)
        return choose_on_validation(
            merged, self.tune_thresholds, spec.threshold, has_morphology(spec), self.min_area
        )

    def fit_calibration(self, choice: TuningChoice) -> dict[str, Any]:
        """The temperature fitted on the val pixels sampled while tuning (1 without
        ``calibrate``), on top of the configured one, and the val ECE before / after it."""
        return fit_on_validation(
            self._tuning_pixels, self.inference.temperature, choice.threshold, self.calibrate
        )

    def _score_split(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        split: str,
        score: Callable[[Iterator[Any], EvaluationProgress], Any],
    ) -> list[Any]:
        """``score(scans, progress)`` this rank's share of ``split``'s scans with the model in
        eval mode, with progress bars (:class:`EvaluationProgress`); every rank's result,
        gathered on every rank."""
        datamodule: EvaluationData = trainer.datamodule
        members = list(datamodule.cv_round.patients(split))
        mine = shard_patients(members, trainer.global_rank, trainer.world_size)
        spec = datamodule.input_spec
        unit = "tile" if spec.mode == "windowed" else "slice"
        enabled = None if progress_enabled(trainer) else False
        progress = EvaluationProgress(split, len(mine), spec.tiles_per_slice, unit, enabled)
        was_training = pl_module.training
        pl_module.eval()
        try:
            local = score(progress.scans(datamodule.eval_scans(split, patients=mine)), progress)
        finally:
            progress.close()
            pl_module.train(was_training)
        return gather_objects(local, trainer.world_size)

    def _store_operating_point(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        spec: InferenceSpec,
        choice: TuningChoice,
    ) -> None:
        """Write the tuned operating point into the tested checkpoint (rank 0) and the module's
        metadata, so that ``ichseg.predict`` applies it."""
        record = operating_point_record(spec, choice, self.calibration)
        meta = getattr(pl_module, "meta", None)
        if isinstance(meta, dict) and meta:
            meta["inference"] = spec.to_dict()
            meta["operating_point"] = dict(record)
        path = getattr(trainer, "ckpt_path", None)
        if not path or not Path(path).is_file():
            return
        if trainer.global_rank == 0:
            from ichseg.checkpoint import store_operating_point

            store_operating_point(path, spec, record)
        self.operating_point_file = Path(path)

    def scored_thresholds(self, spec: InferenceSpec) -> tuple[float, ...]:
        """Table 6's thresholds, the operating point's and, after tuning, the tuned grid's (the
        same columns in every fold, whatever each one chose)."""
        levels = {*self.thresholds, spec.threshold}
        if self._applied is not None:
            levels |= set(self.tune_thresholds)
        return tuple(sorted(levels))

    def settings(self, predictor: Predictor, thresholds: Sequence[float]) -> dict[str, Any]:
        """What the report states about how it was computed (:func:`report_settings`, the tuning
        and the checkpoint it was written into)."""
        settings = report_settings(predictor, thresholds, self.min_area)
        if self._applied is not None and self.tuning is not None:
            settings["tuned_on_val"] = self.tuning.to_dict()
            if self.calibration is not None:
                settings["tuned_on_val"]["threshold_calibrated"] = self.calibration["threshold"]
        if self.operating_point_file is not None:
            settings["operating_point_file"] = str(self.operating_point_file)
        return settings

    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        split: str,
        predictor: Predictor,
        thresholds: Sequence[float],
        mask_dir: Path | None = None,
        pixels: PixelSample | None = None,
    ) -> ShardResult:
        """Score this rank's share of ``split`` and merge all ranks' results (on every rank);
        with ``pixels``, every rank's pixel sample of the same pass is merged into it."""
        use_gallery = self.n_overlays > 0 and has_tensorboard(trainer)
        gallery = OverlayGallery(self.n_overlays if use_gallery else 0)
        local = None if pixels is None else PixelSample(pixels.per_scan, pixels.seed)
        gathered = self._score_split(
            trainer, pl_module, split,
            lambda scans, progress: (
                score_scans(predictor, scans, thresholds, gallery, mask_dir, progress, local),
                gallery, local,
            ),
        )  # fmt: skip
        merged = merge_shards([part for part, _, _ in gathered])
        gallery.merge(g for _, g, _ in gathered)
        if pixels is not None:
            pixels.merge(p for _, _, p in gathered)
        self._gallery = gallery
        return merged

    def _run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, write: bool
    ) -> None:
        datamodule: EvaluationData = trainer.datamodule
        spec = self.operating_spec
        predictor = self.predictor(trainer, pl_module, spec)
        thresholds = self.scored_thresholds(spec)
        root = Path(self.output_dir or trainer.default_root_dir)
        directory = root if split == "test" else root / split
        mask_dir = directory / "masks" if write and self.save_masks else None
        pixels = PixelSample() if write else None
        merged = self.evaluate(trainer, pl_module, split, predictor, thresholds, mask_dir, pixels)
        threshold = spec.threshold
        tables = compute_tables(merged.counts, merged.patients, threshold, self.min_area)
        self.results[split] = (merged, tables)
        for name, value in scalar_metrics(tables, split).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False,
                          prog_bar=name == f"{split}/stitched_dice")  # fmt: skip
        if trainer.global_rank != 0:
            return
        settings = self.settings(predictor, thresholds)
        if getattr(datamodule.dataset, "synthetic", False):
            settings["synthetic"] = True
        fold = datamodule.fold
        epoch, step = checkpoint_position(trainer, pl_module)
        title = f"Stitched evaluation: fold {fold}, {split} split, epoch {epoch}"
        calibration, diagram = None, None
        if pixels is not None:
            calibration, diagram = split_calibration(pixels, spec.temperature, split,
                                                     self.calibration)  # fmt: skip
            self.calibration_reports[split] = calibration
            save_png(diagram, directory / calibration["diagram"])
        if write:
            result = FoldResult(
                counts=merged.counts,
                patients=merged.patients,
                settings=settings,
                split=split,
                fold=fold,
                k=datamodule.k,
                extra={
                    "epoch": epoch,
                    "global_step": step,
                    "checkpoint": json_safe(getattr(trainer, "ckpt_path", None)),
                    "release": datamodule.dataset.release,
                },
                calibration=calibration,
            )
            write_report(directory, result, merged.slice_flags, tables, title)
        log_stitched_report(trainer, split, tables, merged, settings, title, self.log_tables,
                            self._gallery, calibration, diagram)  # fmt: skip
