"""Stitched full-slice evaluation as a Lightning callback: where the paper's numbers come from.

:class:`StitchedEvaluation` scores EVERY slice of the round's val / test patients, one patient at
a time (only per-slice counts are kept, never a fold's probability maps):

1. ``datamodule.eval_scans(split, patients=...)`` gives the patient's working-size uint8 slices,
   its original-resolution mask, labels, spacing and demographics;
2. slices -> float in [0, 1] on the model's device -> :func:`ichseg.inference.stitch.stitch`
   (windowed
   mode: the datamodule's window / stride grid, probabilities averaged where windows overlap) or
   :func:`ichseg.inference.stitch.full_slice` (full-slice mode: no stitching);
3. :func:`ichseg.inference.stitch.to_original_grid` with the scan's working mode (NIfTI:
   resize, JPG:
   crop);
4. :func:`ichseg.eval.metrics.score_probabilities` at every threshold (default 0.5 ... 0.9) with
   the configured post-processing (the paper's: closing 10, then opening 5), its sizes and the
   detection area minimum given at ``reference_size`` (640, the paper's slices) and scaled to the
   scored grid, and the voxel volume from the header spacing.

Under DDP the patients are sharded by rank (patient ``i`` of the split goes to rank
``i % world_size``, :func:`shard_patients`), the per-rank results are gathered with
``torch.distributed.all_gather_object`` and merged with :func:`merge_shards` (concatenated, then
de-duplicated by (patient, slice)), so every slice is scored exactly once and every rank holds the
same merged counts; rank 0 writes the files and the TensorBoard entries.

When: at the end of each test epoch for every split in ``splits`` (default ``["test"]``), and, if
``every_n_val_epochs > 0``, at the end of every ``every_n_val_epochs``-th validation epoch of
fitting (the val split, scalars only), so that a ``ModelCheckpoint`` can monitor
``val/stitched_dice`` (give it ``every_n_epochs`` equal to ``every_n_val_epochs``). With
``tune_on_val``, the test epoch first scores the VAL split over a grid of thresholds with and
without the post-processing (:func:`score_scans_variants`: each patient predicted once, counted per
variant), picks the operating point by the paper's Dice on val (:func:`choose_on_validation`) and
scores the test split with it. 2.5D models get their neighbouring slices from the datamodule's
``context_slices`` (:func:`scan_probabilities`).

Logged scalars (``<split>`` is ``test`` or ``val``; distinct from the LightningModule's window-level
``test/dice`` / ``test/jaccard``):

==================================  ==============================================================
``<split>/stitched_dice``            the paper's Dice: mean over patients with ICH of the mean slice
                                     Dice over their ICH slices, at ``threshold`` (Table 5)
``<split>/stitched_jaccard``         the same for Jaccard
``<split>/stitched_dice_3d``         per-patient volume Dice (nnU-Net empty rule), mean
``<split>/stitched_sensitivity@t``   pooled slice sensitivity at each threshold ``t`` (Table 6)
``<split>/stitched_specificity@t``   pooled slice specificity at each threshold
``<split>/stitched_accuracy@t``      pooled slice accuracy at each threshold
``<split>/stitched_abs_error_ml``    mean absolute volume error (mL), patients with ICH
``<split>/stitched_fp_ml``           mean predicted volume (mL) on patients without ICH
``<split>/stitched_outside_ml``      mean predicted volume (mL) outside the true bleed, all patients
==================================  ==============================================================

Undefined values (e.g. no patient with ICH) are logged as NaN. With a ``TensorBoardLogger``, the
markdown tables are logged as text (``<split>/stitched_report``) and overlays of the best and
worst ICH slices (by slice Dice at ``threshold``) as images.

Files (test time, rank 0, written atomically) in ``output_dir`` (default the trainer's
``default_root_dir``, i.e. the Hydra run folder); a split other than ``test`` goes into a
sub-folder named after it: ``report.json`` (settings, fold, patients, every table; NaN -> null),
``report.md``, ``slices.csv`` (one row per slice) and ``counts.npz`` (:meth:`SliceCounts.save`),
which ``python -m ichseg.report`` merges across folds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ichseg.errors import ConfigError, DatasetError
from ichseg.eval.metrics import (
    DEFAULT_THRESHOLDS,
    PAPER_MIN_AREA,
    SUBTYPE_NAMES,
    EvaluationTables,
    SliceCounts,
    score_probabilities,
    segmentation_table,
    slice_dice,
    voxel_volume_ml,
)
from ichseg.eval.postprocess import PostprocessConfig
from ichseg.eval.report import (
    FoldResult,
    PatientInfo,
    compute_tables,
    json_safe,
    tables_markdown,
    write_report,
)
from ichseg.inference.predictor import Predictor
from ichseg.inference.stitch import to_original_grid
from ichseg.specs import InferenceSpec

SPLITS: tuple[str, ...] = ("val", "test")
#: Thresholds tried on the validation split when ``tune_on_val`` is set.
TUNE_THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
#: Columns of the per-slice label flags carried with the counts: the five subtypes, then fracture.
FLAG_NAMES: tuple[str, ...] = (*SUBTYPE_NAMES, "fracture")


# --------------------------------------------------------------------------- results of a shard


@dataclass
class ShardResult:
    """Counts of some patients' slices, their patient facts and per-slice label flags.

    ``slice_flags`` is ``(N, 6)`` bool aligned with the rows of ``counts`` (:data:`FLAG_NAMES`).
    """

    counts: SliceCounts
    patients: dict[int, PatientInfo] = field(default_factory=dict)
    slice_flags: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.slice_flags is None:
            self.slice_flags = np.zeros((len(self.counts), len(FLAG_NAMES)), dtype=bool)
        self.slice_flags = np.asarray(self.slice_flags, dtype=bool).reshape(
            len(self.counts), len(FLAG_NAMES)
        )

    @classmethod
    def empty(cls, thresholds: Sequence[float]) -> ShardResult:
        return cls(SliceCounts.empty(thresholds))


def shard_patients(patients: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The patients rank ``rank`` scores: the ``i``-th patient goes to rank ``i % world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not within a world of size {world_size}")
    return [int(p) for p in list(patients)[rank::world_size]]


def merge_shards(parts: Iterable[ShardResult]) -> ShardResult:
    """All ranks' results as one: concatenated, one row per (patient, slice), sorted by both.

    Rows repeated across parts must agree (:meth:`SliceCounts.deduplicate` raises otherwise).
    """
    parts = list(parts)
    if not parts:
        raise ConfigError("nothing to merge: no shard results given")
    counts = SliceCounts.concatenate([part.counts for part in parts])
    flags = np.concatenate([part.slice_flags for part in parts], axis=0)
    counts.deduplicate()  # checks that repeated slices agree
    keys = np.stack([counts.patient, counts.slice_index], axis=1)
    first = np.unique(keys, axis=0, return_index=True)[1] if len(counts) else np.zeros(0, int)
    patients: dict[int, PatientInfo] = {}
    for part in parts:
        patients.update(part.patients)
    return ShardResult(counts.select(first), dict(sorted(patients.items())), flags[first])


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (just ``[obj]`` without DDP)."""
    distributed = torch.distributed
    if world_size <= 1 or not (distributed.is_available() and distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * distributed.get_world_size()
    distributed.all_gather_object(gathered, obj)
    return gathered


# --------------------------------------------------------------------------- scoring


@dataclass
class _Overlay:
    """One slice kept for the best / worst overlays (original grid)."""

    dice: float
    gt_pixels: int
    patient: int
    slice_number: int
    image: np.ndarray  # (H, W) uint8
    truth: np.ndarray  # (H, W) bool
    prediction: np.ndarray  # (H, W) bool


class OverlayGallery:
    """The ``n`` best and ``n`` worst ICH slices seen so far, by slice Dice (bounded memory)."""

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self.best: list[_Overlay] = []
        self.worst: list[_Overlay] = []

    @staticmethod
    def _best_key(item: _Overlay) -> tuple[float, int]:
        return (-item.dice, -item.gt_pixels)

    @staticmethod
    def _worst_key(item: _Overlay) -> tuple[float, int]:
        return (item.dice, -item.gt_pixels)

    def candidates(self, dice: np.ndarray, gt_pixels: np.ndarray) -> np.ndarray:
        """Rows of one patient's slices that could enter the gallery (ICH slices only)."""
        positive = np.flatnonzero(~np.isnan(dice))
        if positive.size == 0 or self.n == 0:
            return positive[:0]
        order = np.lexsort((-gt_pixels[positive], dice[positive]))  # worst first
        chosen = np.concatenate([order[: self.n], order[::-1][: self.n]])
        return positive[np.unique(chosen)]

    def add(self, items: Iterable[_Overlay]) -> None:
        """Offer slices; each (patient, slice) is kept once."""
        unique = {(i.patient, i.slice_number): i for i in [*items, *self.best, *self.worst]}
        pool = list(unique.values())
        self.best = sorted(pool, key=self._best_key)[: self.n]
        self.worst = sorted(pool, key=self._worst_key)[: self.n]

    def merge(self, others: Iterable[OverlayGallery]) -> None:
        """Add the slices of other ranks' galleries."""
        for other in others:
            if other is not self:
                self.add(other.best + other.worst)


def scan_probabilities(predictor: Predictor, scan: Any, progress: Any = None) -> np.ndarray:
    """``(N, H, W)`` float32 probabilities of one scan's slices on its ORIGINAL grid (the
    predictor's recipe: tiles blended, or whole slices, then back to the scan's grid)."""
    if scan.images.shape[0] != scan.n_slices:
        raise DatasetError(
            f"patient {scan.patient_id}: {scan.images.shape[0]} working-size slices but "
            f"{scan.n_slices} mask slices"
        )
    return predictor.probabilities(scan.images, scan.original_shape, progress)


def _patient_facts(scan: Any) -> tuple[np.ndarray, PatientInfo]:
    """Per-slice label flags ``(N, 6)`` and the patient's :class:`PatientInfo`."""
    labels = scan.labels
    flags = np.concatenate([labels.subtypes, labels.fracture[:, None]], axis=1)
    subtypes = tuple(n for n, f in zip(SUBTYPE_NAMES, labels.patient_subtypes(), strict=True) if f)
    demographics = scan.demographics
    info = PatientInfo(
        patient=int(scan.patient_id),
        age=None if demographics is None else demographics.age,
        gender=None if demographics is None else demographics.gender,
        subtypes=subtypes,
    )
    return flags, info


def _truth(scan: Any) -> np.ndarray:
    """The scan's ground truth ``(N, H, W)`` bool on its original grid."""
    return np.moveaxis(np.asarray(scan.mask, dtype=bool), -1, 0)


def _count_scan(
    native: np.ndarray,
    scan: Any,
    predictor: Predictor,
    thresholds: Sequence[float],
    config: PostprocessConfig,
) -> SliceCounts:
    """Slice counts of original-grid probabilities at every threshold with ``config``'s
    morphology, scaled to the scan's grid as the predictor scales it."""
    voxel_ml = math.nan if scan.spacing is None else voxel_volume_ml(scan.spacing)
    scale = predictor.scale(scan.original_shape)
    return score_probabilities(
        native, _truth(scan), scan.patient_id, np.arange(1, scan.n_slices + 1), thresholds,
        config, scale, voxel_ml,
    )  # fmt: skip


def mask_file(directory: Path, patient: int) -> Path:
    """Where ``save_masks`` writes a patient's evaluated mask: ``<directory>/<patient>_ich.nii.gz``
    (three digits, as CT-ICH names its scans, so that it sits beside ``ichseg.predict``'s)."""
    return Path(directory) / f"{int(patient):03d}_ich.nii.gz"


def save_scan_mask(scan: Any, mask: np.ndarray, directory: Path) -> Path:
    """Write an evaluated ``(N, H, W)`` mask in the scan's space (its NIfTI header; the JPG
    release: its affine) as uint8 ``(H, W, N)``."""
    from ichseg.io.nifti import write_like

    target = mask_file(directory, scan.patient_id)
    data = np.ascontiguousarray(np.moveaxis(mask, 0, -1).astype(np.uint8))
    write_like(scan.source, data, target, "ichseg evaluated ICH mask", scan.affine)
    return target


def score_scan(
    predictor: Predictor,
    scan: Any,
    thresholds: Sequence[float],
    gallery: OverlayGallery | None = None,
    mask_dir: Path | None = None,
    progress: Any = None,
) -> ShardResult:
    """Predict every slice of one :class:`~ichseg.data.datamodule.EvalScan` and count it at
    every threshold with the predictor's post-processing.

    Returns the slice counts (slices numbered from 1, as in the label CSV), the patient's facts
    and per-slice label flags; offers the patient's best / worst ICH slices (at the predictor's
    threshold) to ``gallery``; with ``mask_dir`` writes the mask at that threshold
    (:func:`save_scan_mask`).
    """
    spec = predictor.inference_spec
    native = scan_probabilities(predictor, scan, progress)  # (N, H, W) float32 numpy
    counts = _count_scan(native, scan, predictor, thresholds, spec.postprocess_config())
    flags, info = _patient_facts(scan)
    if mask_dir is not None:
        save_scan_mask(scan, predictor.mask(native), mask_dir)
    if gallery is not None and gallery.n > 0:
        dice = slice_dice(counts, spec.threshold)
        rows = gallery.candidates(dice, counts.gt_pixels)
        if rows.size:
            truth = _truth(scan)
            predicted = predictor.mask(native[rows])
            shown = to_original_grid(scan.images[rows, :1].astype(np.float32), scan.original_shape,
                                     scan.working_mode)[:, 0]  # fmt: skip
            gallery.add(
                _Overlay(float(dice[r]), int(counts.gt_pixels[r]), int(scan.patient_id), int(r + 1),
                         np.clip(np.rint(img), 0, 255).astype(np.uint8), truth[r], pred)
                for r, img, pred in zip(rows, shown, predicted, strict=True)
            )  # fmt: skip
    return ShardResult(counts, {info.patient: info}, flags)


def score_scans(
    predictor: Predictor,
    scans: Iterable[Any],
    thresholds: Sequence[float],
    gallery: OverlayGallery | None = None,
    mask_dir: Path | None = None,
    progress: Any = None,
) -> ShardResult:
    """:func:`score_scan` for each scan in turn (one patient in memory at a time), merged."""
    parts = [score_scan(predictor, scan, thresholds, gallery, mask_dir, progress) for scan in scans]
    return merge_shards(parts) if parts else ShardResult.empty(thresholds)


def score_scans_variants(
    predictor: Predictor,
    scans: Iterable[Any],
    thresholds: Sequence[float],
    configs: Sequence[PostprocessConfig],
    progress: Any = None,
) -> list[ShardResult]:
    """Each scan predicted ONCE and counted under each post-processing of ``configs`` (each at
    every threshold): one merged :class:`ShardResult` per config."""
    per_scan = []
    for scan in scans:
        native = scan_probabilities(predictor, scan, progress)
        flags, info = _patient_facts(scan)
        per_scan.append([
            ShardResult(_count_scan(native, scan, predictor, thresholds, config),
                        {info.patient: info}, flags)
            for config in configs
        ])  # fmt: skip
    if not per_scan:
        return [ShardResult.empty(thresholds) for _ in configs]
    return [merge_shards([parts[i] for parts in per_scan]) for i in range(len(configs))]


# --------------------------------------------------------------------------- tuning on val


@dataclass(frozen=True)
class TuningChoice:
    """The threshold and post-processing picked on the validation split, and the grid scored.

    ``grid`` rows: ``{"threshold", "postprocess" (bool), "dice"}`` with the paper's Dice on val
    (NaN when val has no patient with ICH).
    """

    threshold: float
    postprocess: bool
    dice: float
    grid: tuple[dict[str, Any], ...]
    patients: tuple[int, ...]
    fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": "val",
            "rule": "highest paper Dice on val; ties: without post-processing, then the threshold "
            "closest to the configured one",
            "threshold": self.threshold,
            "postprocess": self.postprocess,
            "val_dice": self.dice,
            "fallback": self.fallback,
            "patients": list(self.patients),
            "grid": [dict(row) for row in self.grid],
        }


def choose_on_validation(
    results: Mapping[bool, ShardResult],
    thresholds: Sequence[float],
    default_threshold: float,
    default_postprocess: bool,
    min_area: float = PAPER_MIN_AREA,
) -> TuningChoice:
    """Pick threshold and post-processing (on / off) by the paper's Dice over the val patients.

    ``results`` maps "post-processing on?" to the val counts under it (at every threshold of
    ``thresholds``). nnU-Net's rule: post-processing is kept only when it improves the validation
    Dice, so ties go to "off", then to the threshold closest to ``default_threshold``. Without a
    val patient with ICH nothing can be chosen: the defaults are kept (``fallback``).
    """
    grid = []
    for enabled, result in results.items():
        for level in thresholds:
            dice = float(segmentation_table(result.counts, level, min_area).dice.mean)
            grid.append({"threshold": float(level), "postprocess": bool(enabled), "dice": dice})
    patients = tuple(sorted(int(p) for r in results.values() for p in r.patients))
    patients = tuple(dict.fromkeys(patients))
    defined = [row for row in grid if math.isfinite(row["dice"])]
    if not defined:
        return TuningChoice(float(default_threshold), bool(default_postprocess), math.nan,
                            tuple(grid), patients, fallback=True)  # fmt: skip
    best = min(
        defined,
        key=lambda row: (-row["dice"], row["postprocess"],
                         abs(row["threshold"] - default_threshold), row["threshold"]),
    )  # fmt: skip
    return TuningChoice(best["threshold"], best["postprocess"], best["dice"], tuple(grid), patients)


def checkpoint_position(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, int]:
    """``(epoch, global_step)`` of the weights being scored: those recorded in the checkpoint
    that was loaded for testing (``pl_module.loaded_position``), else the trainer's."""
    loaded = getattr(pl_module, "loaded_position", None)
    if getattr(trainer, "ckpt_path", None) and loaded is not None:
        return int(loaded[0]), int(loaded[1])
    return int(trainer.current_epoch), int(trainer.global_step)


def scalar_metrics(tables: EvaluationTables, prefix: str) -> dict[str, float]:
    """The logged scalars (module docstring) from the tables."""
    volume = tables.volume
    scalars = {
        f"{prefix}/stitched_dice": tables.segmentation.dice.mean,
        f"{prefix}/stitched_jaccard": tables.segmentation.jaccard.mean,
        f"{prefix}/stitched_dice_3d": volume.dice_3d.mean,
        f"{prefix}/stitched_abs_error_ml": volume.abs_error_ml.mean,
        f"{prefix}/stitched_fp_ml": volume.false_positive_ml.mean,
        f"{prefix}/stitched_outside_ml": volume.outside_ml.mean,
    }
    for row in tables.detection:
        for name in ("sensitivity", "specificity", "accuracy"):
            scalars[f"{prefix}/stitched_{name}@{row.threshold:g}"] = getattr(row, name)
    return {name: float(value) for name, value in scalars.items()}


# --------------------------------------------------------------------------- the callback


def inference_spec_of(value: InferenceSpec | Mapping[str, Any] | None) -> InferenceSpec:
    """An :class:`InferenceSpec` from a spec, a mapping of its fields, or None (the defaults)."""
    if value is None:
        return InferenceSpec()
    if isinstance(value, InferenceSpec):
        return value
    return InferenceSpec.from_dict(value)


def autocast_for_precision(spec: InferenceSpec, precision: str) -> InferenceSpec:
    """``autocast="auto"`` resolved by the trainer's precision (bf16-mixed: bf16, 16-mixed:
    fp16, otherwise none); other values as they are."""
    if spec.autocast != "auto":
        return spec
    autocast = {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(precision, "none")
    return replace(spec, autocast=autocast)


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
            space) as ``masks/<patient>_ich.nii.gz`` beside the report (test time only).
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
        #: The last evaluation of each split: ``{split: (ShardResult, EvaluationTables)}``.
        self.results: dict[str, tuple[ShardResult, EvaluationTables]] = {}
        #: The last choice made on val (``tune_on_val``), or None.
        self.tuning: TuningChoice | None = None
        #: The checkpoint the last tuned operating point was written into, or None.
        self.operating_point_file: Path | None = None
        self._applied: InferenceSpec | None = None
        self._gallery: OverlayGallery | None = None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail early when the trainer has no datamodule with ``eval_scans`` and ``input_spec``."""
        needed = stage == "test" or (stage == "fit" and self.every_n_val_epochs > 0)
        datamodule = trainer.datamodule
        if needed and not (hasattr(datamodule, "eval_scans") and hasattr(datamodule, "input_spec")):
            raise ConfigError(
                "StitchedEvaluation needs a datamodule with eval_scans(split) and input_spec "
                "(CTICHDataModule): pass datamodule= to the trainer or remove the callback"
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.every_n_val_epochs
        if not every or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        # the same epochs as ModelCheckpoint(every_n_epochs=every)
        if (trainer.current_epoch + 1) % every == 0:
            self._run(trainer, pl_module, "val", write=False)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.operating_point_file = None
        if self.tune_on_val:
            self.tuning = self.tune(trainer, pl_module)
            choice = self.tuning
            self._applied = self.inference.with_operating_point(choice.threshold,
                                                                choice.postprocess)  # fmt: skip
            for name, value in (("threshold", choice.threshold),
                                ("postprocess", float(choice.postprocess)),
                                ("dice", choice.dice)):  # fmt: skip
                pl_module.log(f"val/tuned_{name}", value, on_step=False, on_epoch=True,
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
        datamodule = trainer.datamodule
        spec = self.inference
        has_morphology = spec.postprocess and bool(spec.postprocess_config().steps(1.0))
        variants = {False: replace(spec, postprocess=False).postprocess_config()}
        if has_morphology:
            variants[True] = spec.postprocess_config()
        members = list(datamodule.cv_round.patients("val"))
        mine = shard_patients(members, trainer.global_rank, trainer.world_size)
        predictor = self.predictor(trainer, pl_module, spec)
        was_training = pl_module.training
        pl_module.eval()
        try:
            local = score_scans_variants(
                predictor, datamodule.eval_scans("val", patients=mine), self.tune_thresholds,
                list(variants.values()),
            )  # fmt: skip
        finally:
            pl_module.train(was_training)
        gathered = gather_objects(local, trainer.world_size)
        merged = {
            enabled: merge_shards([parts[i] for parts in gathered])
            for i, enabled in enumerate(variants)
        }
        return choose_on_validation(
            merged, self.tune_thresholds, spec.threshold, has_morphology, self.min_area
        )

    def _store_operating_point(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        spec: InferenceSpec,
        choice: TuningChoice,
    ) -> None:
        """Write the tuned operating point into the tested checkpoint (rank 0) and the module's
        metadata, so that ``ichseg.predict`` applies it."""
        record = {
            "source": "tuned on val",
            "threshold": spec.threshold,
            "postprocess": spec.postprocess,
            "val_dice": None if math.isnan(choice.dice) else choice.dice,
            "fallback": choice.fallback,
            "patients": list(choice.patients),
        }
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
        """What the report states about how it was computed."""
        spec, data = predictor.inference_spec, predictor.input_spec
        post = spec.postprocess_config()
        settings = {
            "threshold": spec.threshold,
            "thresholds": list(thresholds),
            "min_area": self.min_area,
            "reference_size": spec.reference_size,
            "postprocess": {
                "closing_size": post.closing_size,
                "opening_size": post.opening_size,
                "order": post.order,
                "convention": post.convention,
            },  # fmt: skip
            "mode": data.mode,
            "window": data.tile_size,
            "stride": data.tile_stride,
            "working_size": data.working_size,
            "blend_mode": spec.blend,
            "context_slices": data.context_slices,
            "input": data.to_dict(),
            "inference": spec.to_dict(),
        }
        if self._applied is not None and self.tuning is not None:
            settings["tuned_on_val"] = self.tuning.to_dict()
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
    ) -> ShardResult:
        """Score this rank's share of ``split`` and merge all ranks' results (on every rank)."""
        datamodule = trainer.datamodule
        members = list(datamodule.cv_round.patients(split))
        mine = shard_patients(members, trainer.global_rank, trainer.world_size)
        use_gallery = self.n_overlays > 0 and self._has_tensorboard(trainer)
        gallery = OverlayGallery(self.n_overlays if use_gallery else 0)
        was_training = pl_module.training
        pl_module.eval()
        try:
            local = score_scans(
                predictor, datamodule.eval_scans(split, patients=mine), thresholds, gallery,
                mask_dir,
            )  # fmt: skip
        finally:
            pl_module.train(was_training)
        gathered = gather_objects((local, gallery), trainer.world_size)
        merged = merge_shards([part for part, _ in gathered])
        gallery.merge(g for _, g in gathered)
        self._gallery = gallery
        return merged

    def _run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, write: bool
    ) -> None:
        datamodule = trainer.datamodule
        spec = self.operating_spec
        predictor = self.predictor(trainer, pl_module, spec)
        thresholds = self.scored_thresholds(spec)
        root = Path(self.output_dir or trainer.default_root_dir)
        directory = root if split == "test" else root / split
        mask_dir = directory / "masks" if write and self.save_masks else None
        merged = self.evaluate(trainer, pl_module, split, predictor, thresholds, mask_dir)
        threshold = spec.threshold
        tables = compute_tables(merged.counts, merged.patients, threshold, self.min_area)
        self.results[split] = (merged, tables)
        for name, value in scalar_metrics(tables, split).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False,
                          prog_bar=name == f"{split}/stitched_dice")  # fmt: skip
        if trainer.global_rank != 0:
            return
        settings = self.settings(predictor, thresholds)
        fold = getattr(datamodule, "fold", None)
        epoch, step = checkpoint_position(trainer, pl_module)
        title = f"Stitched evaluation: fold {fold}, {split} split, epoch {epoch}"
        if write:
            result = FoldResult(
                counts=merged.counts,
                patients=merged.patients,
                settings=settings,
                split=split,
                fold=fold,
                k=getattr(datamodule, "k", None),
                extra={
                    "epoch": epoch,
                    "global_step": step,
                    "checkpoint": json_safe(getattr(trainer, "ckpt_path", None)),
                    "release": getattr(getattr(datamodule, "dataset", None), "release", None),
                },
            )
            write_report(directory, result, merged.slice_flags, tables, title)
        self._log_tensorboard(trainer, split, tables, merged, settings, title)

    # ------------------------------------------------------------------ TensorBoard

    @staticmethod
    def _has_tensorboard(trainer: pl.Trainer) -> bool:
        from pytorch_lightning.loggers import TensorBoardLogger

        return any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers)

    @staticmethod
    def _tensorboard(trainer: pl.Trainer) -> Any:
        """The experiment (``SummaryWriter``) of the first TensorBoard logger, or None."""
        from pytorch_lightning.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _log_tensorboard(
        self,
        trainer: pl.Trainer,
        split: str,
        tables: EvaluationTables,
        merged: ShardResult,
        settings: Mapping[str, Any],
        title: str,
    ) -> None:
        writer = self._tensorboard(trainer)
        if writer is None:
            return
        step = trainer.global_step
        if self.log_tables:
            markdown = tables_markdown(tables, title, settings, merged.patients)
            writer.add_text(f"{split}/stitched_report", markdown, step)
        gallery = self._gallery
        if gallery is None:
            return
        from ichseg.utils.overlay import overlay_grid

        for name, items in (("best", gallery.best), ("worst", gallery.worst)):
            if not items:
                continue
            height = max(item.image.shape[0] for item in items)
            width = max(item.image.shape[1] for item in items)

            def padded(array: np.ndarray, h: int = height, w: int = width) -> torch.Tensor:
                out = np.zeros((h, w), dtype=array.dtype)
                out[: array.shape[0], : array.shape[1]] = array
                return torch.from_numpy(out)[None]

            images = torch.stack([padded(i.image) for i in items]).float() / 255.0
            truth = torch.stack([padded(i.truth) for i in items])
            prediction = torch.stack([padded(i.prediction) for i in items])
            writer.add_image(
                f"{split}/stitched_{name}_slices (input | truth | prediction)",
                overlay_grid(images, truth, prediction),
                step,
            )
            caption = ", ".join(
                f"patient {i.patient} slice {i.slice_number}: Dice {i.dice:.3f}" for i in items
            )
            writer.add_text(f"{split}/stitched_{name}_slices", caption, step)
