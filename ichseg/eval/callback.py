"""Stitched full-slice evaluation as a Lightning callback: where the paper's numbers come from.

:class:`StitchedEvaluation` scores EVERY slice of the round's val / test patients, one patient at
a time (only per-slice counts are kept, never a fold's probability maps):

1. ``datamodule.eval_scans(split, patients=...)`` gives the patient's working-size uint8 slices,
   its original-resolution mask, labels, spacing and demographics;
2. slices -> float in [0, 1] on the model's device -> :func:`ichseg.eval.stitch.stitch` (windowed
   mode: the datamodule's window / stride grid, probabilities averaged where windows overlap) or
   :func:`ichseg.eval.stitch.full_slice` (full-slice mode: no stitching);
3. :func:`ichseg.eval.stitch.to_original_grid` with the scan's working mode (NIfTI: resize, JPG:
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
from ichseg.eval.postprocess import (
    PAPER,
    THRESHOLD_ONLY,
    WORKING_SIZE,
    PostprocessConfig,
    grid_scale,
    postprocess,
)
from ichseg.eval.report import (
    FoldResult,
    PatientInfo,
    compute_tables,
    json_safe,
    tables_markdown,
    write_report,
)
from ichseg.eval.stitch import BLEND_MODES, full_slice, stitch, to_original_grid

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


def _cast_inputs(
    model: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` fed inputs in ``dtype`` (a network held in bf16 / fp16 weights)."""
    if dtype == torch.float32:
        return model
    return lambda images: model(images.to(dtype))


@dataclass
class ScoringOptions:
    """How slices are predicted and scored (see :class:`StitchedEvaluation`)."""

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    postprocess: PostprocessConfig = PAPER
    reference_size: int = WORKING_SIZE
    mode: str = "windowed"
    window: int = 160
    stride: int = 80
    blend_mode: str = "constant"
    sigma_scale: float = 0.125
    window_batch_size: int = 64
    slice_batch_size: int = 2
    amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    context_slices: int = 0


def scan_probabilities(
    model: Callable[[torch.Tensor], torch.Tensor],
    scan: Any,
    options: ScoringOptions,
    device: torch.device,
) -> np.ndarray:
    """``(N, H, W)`` float32 probabilities of one scan's slices on its ORIGINAL grid.

    Windows stitched (or whole slices, in full-slice mode), with ``options.context_slices``
    neighbouring slices as extra channels for 2.5D models, then resampled to the scan's grid.
    """
    n_slices = scan.n_slices
    if scan.images.shape[0] != n_slices:
        raise DatasetError(
            f"patient {scan.patient_id}: {scan.images.shape[0]} working-size slices but "
            f"{n_slices} mask slices"
        )
    # one copy of the patient's uint8 slices (the store may be a read-only memory map)
    images = torch.from_numpy(np.array(scan.images, dtype=np.uint8, order="C"))
    images = images.to(device, non_blocking=True).to(torch.float32).div_(255.0)
    common = {
        "amp": options.amp, "amp_dtype": options.amp_dtype, "device": device,
        "context_slices": options.context_slices,
    }  # fmt: skip
    if options.mode == "full_slice":
        maps = full_slice(model, images, batch_size=options.slice_batch_size, **common)
    else:
        maps = stitch(
            model, images, options.window, options.stride,
            window_batch_size=options.window_batch_size, mode=options.blend_mode,  # type: ignore[arg-type]
            sigma_scale=options.sigma_scale, **common,
        )  # fmt: skip
    del images
    return to_original_grid(maps, scan.original_shape, scan.working_mode)


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


def _truth_and_scale(scan: Any, options: ScoringOptions) -> tuple[np.ndarray, float]:
    """The scan's ground truth ``(N, H, W)`` bool on its original grid, and that grid's scale for
    the morphology and the area minimum (sizes at ``options.reference_size``)."""
    truth = np.moveaxis(np.asarray(scan.mask, dtype=bool), -1, 0)
    scale = grid_scale(
        scan.original_shape, scan.images.shape[-1], scan.working_mode, options.reference_size
    )
    return truth, scale


def _count_scan(
    native: np.ndarray, scan: Any, options: ScoringOptions, config: PostprocessConfig
) -> SliceCounts:
    """Slice counts of original-grid probabilities at every threshold with ``config``'s
    morphology (sizes at ``options.reference_size``)."""
    truth, scale = _truth_and_scale(scan, options)
    voxel_ml = math.nan if scan.spacing is None else voxel_volume_ml(scan.spacing)
    return score_probabilities(
        native, truth, scan.patient_id, np.arange(1, scan.n_slices + 1), options.thresholds,
        config, scale, voxel_ml,
    )  # fmt: skip


def score_scan_variants(
    model: Callable[[torch.Tensor], torch.Tensor],
    scan: Any,
    options: ScoringOptions,
    device: torch.device,
    configs: Sequence[PostprocessConfig],
) -> list[ShardResult]:
    """One scan predicted ONCE and counted under each post-processing of ``configs`` (each at
    every threshold of ``options``): one :class:`ShardResult` per config."""
    native = scan_probabilities(model, scan, options, device)
    flags, info = _patient_facts(scan)
    return [
        ShardResult(_count_scan(native, scan, options, config), {info.patient: info}, flags)
        for config in configs
    ]


def score_scan(
    model: Callable[[torch.Tensor], torch.Tensor],
    scan: Any,
    options: ScoringOptions,
    device: torch.device,
    threshold: float = 0.5,
    gallery: OverlayGallery | None = None,
) -> ShardResult:
    """Predict every slice of one :class:`~ichseg.data.datamodule.EvalScan` and count it.

    Returns the slice counts (slices numbered from 1, as in the label CSV), the patient's facts
    and per-slice label flags; offers the patient's best / worst ICH slices to ``gallery``.
    """
    native = scan_probabilities(model, scan, options, device)  # (N, H, W) float32 numpy
    counts = _count_scan(native, scan, options, options.postprocess)
    flags, info = _patient_facts(scan)
    if gallery is not None and gallery.n > 0:
        dice = slice_dice(counts, threshold)
        rows = gallery.candidates(dice, counts.gt_pixels)
        if rows.size:
            truth, scale = _truth_and_scale(scan, options)
            predicted = postprocess(native[rows], options.postprocess.with_threshold(threshold),
                                    scale)  # fmt: skip
            shown = to_original_grid(scan.images[rows, :1].astype(np.float32), scan.original_shape,
                                     scan.working_mode)[:, 0]  # fmt: skip
            gallery.add(
                _Overlay(float(dice[r]), int(counts.gt_pixels[r]), int(scan.patient_id), int(r + 1),
                         np.clip(np.rint(img), 0, 255).astype(np.uint8), truth[r], pred)
                for r, img, pred in zip(rows, shown, predicted, strict=True)
            )  # fmt: skip
    return ShardResult(counts, {info.patient: info}, flags)


def score_scans(
    model: Callable[[torch.Tensor], torch.Tensor],
    scans: Iterable[Any],
    options: ScoringOptions,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    gallery: OverlayGallery | None = None,
) -> ShardResult:
    """:func:`score_scan` for each scan in turn (one patient in memory at a time), merged."""
    parts = [
        score_scan(model, scan, options, torch.device(device), threshold, gallery) for scan in scans
    ]
    return merge_shards(parts) if parts else ShardResult.empty(options.thresholds)


def score_scans_variants(
    model: Callable[[torch.Tensor], torch.Tensor],
    scans: Iterable[Any],
    options: ScoringOptions,
    configs: Sequence[PostprocessConfig],
    device: torch.device | str = "cpu",
) -> list[ShardResult]:
    """:func:`score_scan_variants` for each scan in turn, merged per config."""
    per_scan = [
        score_scan_variants(model, scan, options, torch.device(device), configs) for scan in scans
    ]
    if not per_scan:
        return [ShardResult.empty(options.thresholds) for _ in configs]
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


def _postprocess_config(
    value: bool | Mapping[str, Any] | PostprocessConfig | None,
) -> PostprocessConfig:
    """``True``/``None`` -> the paper's; ``False`` -> threshold only; a mapping -> its fields
    (``enabled: false`` switches the morphology off)."""
    if isinstance(value, PostprocessConfig):
        return value
    if value is None or value is True:
        return PAPER
    if value is False:
        return THRESHOLD_ONLY
    if not isinstance(value, Mapping):
        raise ConfigError(f"postprocess must be true, false or a mapping, not {value!r}")
    options = dict(value)
    enabled = options.pop("enabled", True)
    options.pop("threshold", None)  # the thresholds are the callback's own
    known = {"closing_size", "opening_size", "order", "convention"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown post-processing option(s) {unknown}; "
            f"expected enabled, {', '.join(sorted(known))}"
        )
    config = PostprocessConfig(**options)
    if not enabled:
        config = PostprocessConfig(
            closing_size=0, opening_size=0, order=config.order, convention=config.convention
        )
    return config


class StitchedEvaluation(pl.Callback):
    """Score every slice of the round's val / test patients on the original grid (module docstring).

    Args:
        splits: splits evaluated at test time (``"test"``, ``"val"``).
        every_n_val_epochs: also evaluate the val split at the end of every n-th validation epoch
            of fitting and log ``val/stitched_dice`` etc. (0: only at test).
        thresholds: probability thresholds scored (Table 6; default 0.5 ... 0.9).
        threshold: the threshold of Table 5, the subtype / age / volume tables and the overlays
            (None: the LightningModule's ``threshold``, else 0.5); added to ``thresholds``.
        min_area: slice-detection minimum area in pixels at ``reference_size`` (the paper: 400 at
            640), scaled by area to the scored grid; 0 means "any predicted pixel".
        postprocess: the morphology: ``True`` (the paper's closing 10 then opening 5), ``False``
            (threshold only), or a mapping ``{enabled, closing_size, opening_size, order,
            convention}`` (sizes at ``reference_size``).
        reference_size: the slice size at which morphology sizes and ``min_area`` are given (640).
        blend_mode: ``"constant"`` (the paper's averaging) or ``"gaussian"`` window weights.
        sigma_scale: Gaussian width as a fraction of the window.
        window_batch_size: windows per forward pass when stitching.
        slice_batch_size: whole slices per forward pass in full-slice mode.
        output_dir: where the report files go (None: the trainer's ``default_root_dir``).
        log_tables: log the markdown tables to TensorBoard as text.
        n_overlays: best and worst ICH slices shown as TensorBoard images (0: none).
        amp: autocast the forward pass on CUDA; ``"auto"`` follows the trainer's precision.
        tune_on_val: at test time, first score the VAL split at every threshold of
            ``tune_thresholds`` with and without the post-processing, pick the pair with the
            highest paper Dice on val (ties: without post-processing, as nnU-Net keeps it only
            when it helps; then the threshold closest to ``threshold``) and apply it to every
            split scored; the choice and the grid go into the report (``settings.tuned_on_val``)
            and the logs (``val/tuned_threshold``, ``val/tuned_postprocess``,
            ``val/tuned_dice``). The test split never influences the choice.
        tune_thresholds: the thresholds tried on val (default 0.3 ... 0.7).
    """

    def __init__(
        self,
        splits: Sequence[str] = ("test",),
        every_n_val_epochs: int = 0,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        threshold: float | None = 0.5,
        min_area: float = PAPER_MIN_AREA,
        postprocess: bool | Mapping[str, Any] | PostprocessConfig | None = True,
        reference_size: int = WORKING_SIZE,
        blend_mode: str = "constant",
        sigma_scale: float = 0.125,
        window_batch_size: int = 64,
        slice_batch_size: int = 2,
        output_dir: str | os.PathLike[str] | None = None,
        log_tables: bool = True,
        n_overlays: int = 4,
        amp: bool | str = "auto",
        tune_on_val: bool = False,
        tune_thresholds: Sequence[float] = TUNE_THRESHOLDS,
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
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise ConfigError(f"the threshold must be a probability in [0, 1], got {threshold}")
        if min_area < 0:
            raise ConfigError(f"min_area must be 0 or more pixels, got {min_area}")
        if reference_size < 1:
            raise ConfigError(f"reference_size must be a positive slice size, got {reference_size}")
        if blend_mode not in BLEND_MODES:
            raise ConfigError(
                f"blend_mode must be one of {', '.join(BLEND_MODES)}, not {blend_mode!r}"
            )
        if window_batch_size < 1 or slice_batch_size < 1:
            raise ConfigError(
                "window_batch_size and slice_batch_size must be at least 1, got "
                f"{window_batch_size} and {slice_batch_size}"
            )
        if amp not in (True, False, "auto"):
            raise ConfigError(f"amp must be true, false or 'auto', not {amp!r}")
        tune_levels = [float(t) for t in tune_thresholds]
        if not tune_levels or any(not 0.0 <= t <= 1.0 for t in tune_levels):
            raise ConfigError(f"tune_thresholds must be probabilities in [0, 1], got {tune_levels}")
        self.every_n_val_epochs = int(every_n_val_epochs)
        self.thresholds = tuple(sorted(set(levels)))
        self.threshold = None if threshold is None else float(threshold)
        self.min_area = float(min_area)
        self.postprocess = _postprocess_config(postprocess)
        self.reference_size = int(reference_size)
        self.blend_mode = blend_mode
        self.sigma_scale = float(sigma_scale)
        self.window_batch_size = int(window_batch_size)
        self.slice_batch_size = int(slice_batch_size)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.log_tables = bool(log_tables)
        self.n_overlays = int(n_overlays)
        self.amp = amp
        self.tune_on_val = bool(tune_on_val)
        self.tune_thresholds = tuple(sorted(set(tune_levels)))
        #: The last evaluation of each split: ``{split: (ShardResult, EvaluationTables)}``.
        self.results: dict[str, tuple[ShardResult, EvaluationTables]] = {}
        #: The last choice made on val (``tune_on_val``), or None.
        self.tuning: TuningChoice | None = None
        self._applied: TuningChoice | None = None
        self._gallery: OverlayGallery | None = None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail early when the trainer has no datamodule with ``eval_scans``."""
        needed = stage == "test" or (stage == "fit" and self.every_n_val_epochs > 0)
        if needed and not hasattr(trainer.datamodule, "eval_scans"):
            raise ConfigError(
                "StitchedEvaluation needs a datamodule with eval_scans(split) (CTICHDataModule): "
                "pass datamodule= to the trainer or remove the callback"
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.every_n_val_epochs
        if not every or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        # the same epochs as ModelCheckpoint(every_n_epochs=every)
        if (trainer.current_epoch + 1) % every == 0:
            self._run(trainer, pl_module, "val", write=False)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tune_on_val:
            self.tuning = self.tune(trainer, pl_module)
            self._applied = self.tuning
            choice = self.tuning
            for name, value in (("threshold", choice.threshold),
                                ("postprocess", float(choice.postprocess)),
                                ("dice", choice.dice)):  # fmt: skip
                pl_module.log(f"val/tuned_{name}", value, on_step=False, on_epoch=True,
                              sync_dist=False)  # fmt: skip
        try:
            for split in self.splits:
                self._run(trainer, pl_module, split, write=True)
        finally:
            self._applied = None

    # ------------------------------------------------------------------ evaluation

    def main_threshold(self, pl_module: pl.LightningModule) -> float:
        if self._applied is not None:
            return self._applied.threshold
        if self.threshold is not None:
            return self.threshold
        return float(getattr(pl_module, "threshold", 0.5))

    @property
    def postprocess_off(self) -> PostprocessConfig:
        """The configured post-processing without its morphology (threshold only)."""
        post = self.postprocess
        return PostprocessConfig(
            closing_size=0, opening_size=0, order=post.order, convention=post.convention
        )

    def active_postprocess(self) -> PostprocessConfig:
        """The post-processing in use: the configured one, or "off" when tuning on val chose so."""
        if self._applied is not None and not self._applied.postprocess:
            return self.postprocess_off
        return self.postprocess

    def tune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TuningChoice:
        """Score the val split over ``tune_thresholds`` x post-processing on / off and choose
        (:func:`choose_on_validation`); every rank gets the same choice."""
        datamodule = trainer.datamodule
        default = self.main_threshold(pl_module)
        options = self.scoring_options(trainer, datamodule, default)
        options.thresholds = self.tune_thresholds
        has_morphology = bool(self.postprocess.steps(1.0))
        variants = {False: self.postprocess_off}
        if has_morphology:
            variants[True] = self.postprocess
        members = list(datamodule.cv_round.patients("val"))
        mine = shard_patients(members, trainer.global_rank, trainer.world_size)
        dtype = next(
            (p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            local = score_scans_variants(
                _cast_inputs(pl_module, dtype), datamodule.eval_scans("val", patients=mine),
                options, list(variants.values()), pl_module.device,
            )  # fmt: skip
        finally:
            pl_module.train(was_training)
        gathered = gather_objects(local, trainer.world_size)
        merged = {
            enabled: merge_shards([parts[i] for parts in gathered])
            for i, enabled in enumerate(variants)
        }
        return choose_on_validation(
            merged, self.tune_thresholds, default, has_morphology, self.min_area
        )

    def scoring_options(
        self, trainer: pl.Trainer, datamodule: Any, threshold: float
    ) -> ScoringOptions:
        """The :class:`ScoringOptions` of this trainer (precision) and datamodule (mode, grid)."""
        precision = str(getattr(trainer, "precision", "32-true"))
        amp = self.amp if self.amp != "auto" else precision in ("bf16-mixed", "16-mixed")
        grid = getattr(datamodule, "grid", None)
        levels = {*self.thresholds, threshold}
        if self._applied is not None:  # the same columns in every fold, whatever each one chose
            levels |= set(self.tune_thresholds)
        return ScoringOptions(
            thresholds=tuple(sorted(levels)),
            postprocess=self.active_postprocess(),
            reference_size=self.reference_size,
            mode=str(getattr(datamodule, "mode", "windowed")),
            window=int(grid.window) if grid is not None else 160,
            stride=int(grid.stride) if grid is not None else 80,
            blend_mode=self.blend_mode,
            sigma_scale=self.sigma_scale,
            window_batch_size=self.window_batch_size,
            slice_batch_size=self.slice_batch_size,
            amp=bool(amp),
            amp_dtype=torch.float16 if precision.startswith("16") else torch.bfloat16,
            context_slices=int(getattr(datamodule, "context_slices", 0) or 0),
        )

    def settings(
        self, options: ScoringOptions, threshold: float, working_size: int | None
    ) -> dict[str, Any]:
        """What the report states about how it was computed."""
        post = options.postprocess
        settings = {
            "threshold": threshold,
            "thresholds": list(options.thresholds),
            "min_area": self.min_area,
            "reference_size": self.reference_size,
            "postprocess": {
                "closing_size": post.closing_size,
                "opening_size": post.opening_size,
                "order": post.order,
                "convention": post.convention,
            },  # fmt: skip
            "mode": options.mode,
            "window": options.window,
            "stride": options.stride,
            "working_size": working_size,
            "blend_mode": options.blend_mode,
            "context_slices": options.context_slices,
        }
        if self._applied is not None:
            settings["tuned_on_val"] = self._applied.to_dict()
        return settings

    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        split: str,
        options: ScoringOptions,
        threshold: float,
    ) -> ShardResult:
        """Score this rank's share of ``split`` and merge all ranks' results (on every rank)."""
        datamodule = trainer.datamodule
        members = list(datamodule.cv_round.patients(split))
        mine = shard_patients(members, trainer.global_rank, trainer.world_size)
        use_gallery = self.n_overlays > 0 and self._has_tensorboard(trainer)
        gallery = OverlayGallery(self.n_overlays if use_gallery else 0)
        dtype = next(
            (p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32
        )
        model = _cast_inputs(pl_module, dtype)
        was_training = pl_module.training
        pl_module.eval()
        try:
            local = score_scans(
                model, datamodule.eval_scans(split, patients=mine), options, pl_module.device,
                threshold, gallery,
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
        threshold = self.main_threshold(pl_module)
        options = self.scoring_options(trainer, datamodule, threshold)
        merged = self.evaluate(trainer, pl_module, split, options, threshold)
        tables = compute_tables(merged.counts, merged.patients, threshold, self.min_area)
        self.results[split] = (merged, tables)
        for name, value in scalar_metrics(tables, split).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False,
                          prog_bar=name == f"{split}/stitched_dice")  # fmt: skip
        if trainer.global_rank != 0:
            return
        settings = self.settings(options, threshold, getattr(datamodule, "working_size", None))
        fold = getattr(datamodule, "fold", None)
        title = f"Stitched evaluation: fold {fold}, {split} split, epoch {trainer.current_epoch}"
        if write:
            result = FoldResult(
                counts=merged.counts,
                patients=merged.patients,
                settings=settings,
                split=split,
                fold=fold,
                k=getattr(datamodule, "k", None),
                extra={
                    "epoch": trainer.current_epoch,
                    "global_step": trainer.global_step,
                    "checkpoint": json_safe(getattr(trainer, "ckpt_path", None)),
                    "release": getattr(getattr(datamodule, "dataset", None), "release", None),
                },
            )
            root = Path(self.output_dir or trainer.default_root_dir)
            directory = root if split == "test" else root / split
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
