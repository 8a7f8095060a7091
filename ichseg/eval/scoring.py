"""Scoring scans on their original grid into slice counts, without Lightning: one patient at a time
(:func:`score_scan`, :func:`score_scans`, :func:`score_scans_variants`), the sharding of patients
over processes and the merge of their results (:func:`shard_patients`, :func:`merge_shards`), the
evaluated masks, the report's settings and the logged scalars. What evaluation needs of the data is
:class:`EvaluationData`. See docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ichseg.errors import ConfigError, DatasetError
from ichseg.eval.calibration import PixelSample
from ichseg.eval.counts import SliceCounts, score_probabilities
from ichseg.eval.gallery import OverlayGallery, offer_scan
from ichseg.eval.metrics import SUBTYPE_NAMES
from ichseg.eval.postprocess import PostprocessConfig
from ichseg.eval.tables import EvaluationTables, PatientInfo
from ichseg.eval.volumes import voxel_volume_ml
from ichseg.inference.predictor import Predictor
from ichseg.specs import InferenceSpec, InputSpec

#: Columns of the per-slice label flags carried with the counts: the five subtypes, then fracture.
FLAG_NAMES: tuple[str, ...] = (*SUBTYPE_NAMES, "fracture")


# --------------------------------------------------------------------------- what it needs of data


class PatientSplits(Protocol):
    """A cross-validation round: the patients of each split."""

    def patients(self, split: str) -> Sequence[int]: ...


class Release(Protocol):
    """The opened dataset: which CT-ICH release it is (``"nifti"`` or ``"jpg"``)."""

    @property
    def release(self) -> str: ...


@runtime_checkable
class EvaluationData(Protocol):
    """What the stitched evaluation reads of its data (the DataModule provides it).

    ``eval_scans`` yields one :class:`~ichseg.data.datamodule.EvalScan` per patient (``patient_id``,
    ``images`` ``(N, C, S, S)`` uint8, ``mask`` ``(H, W, N)`` bool, ``labels``, ``spacing``,
    ``affine``, ``demographics``, ``working_mode``, ``source``); ``input_spec`` is how slices are
    prepared for the network; ``fold`` / ``k`` / ``cv_round`` name the round and its splits;
    ``dataset.release`` goes into the report.
    """

    @property
    def input_spec(self) -> InputSpec: ...

    @property
    def fold(self) -> int: ...

    @property
    def k(self) -> int: ...

    @property
    def cv_round(self) -> PatientSplits: ...

    @property
    def dataset(self) -> Release: ...

    def eval_scans(self, split: str, patients: Sequence[int] | None = None) -> Iterator[Any]: ...


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


# --------------------------------------------------------------------------- scoring


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
    """Where ``save_masks`` writes a patient's evaluated mask:
    ``<directory>/<patient>_ich_seg.nii.gz`` (three digits, as CT-ICH names its scans, so that
    it sits beside ``ichseg.predict``'s)."""
    return Path(directory) / f"{int(patient):03d}_ich_seg.nii.gz"


def save_scan_mask(scan: Any, mask: np.ndarray, directory: Path) -> Path:
    """Write an evaluated ``(N, H, W)`` mask in the scan's space (its NIfTI header; the JPG
    release: its affine) as uint8 ``(H, W, N)``."""
    from ichseg.io.nifti import write_like

    target = mask_file(directory, scan.patient_id)
    data = np.ascontiguousarray(np.moveaxis(mask, 0, -1).astype(np.uint8))
    write_like(scan.source, data, target, "ichseg evaluated ICH mask", scan.affine)
    return target


def _scan_results(
    native: np.ndarray,
    scan: Any,
    predictor: Predictor,
    thresholds: Sequence[float],
    configs: Sequence[PostprocessConfig],
) -> list[ShardResult]:
    """One scan's original-grid probabilities counted under each post-processing of ``configs``
    (each at every threshold), with the patient's facts and label flags."""
    flags, info = _patient_facts(scan)
    return [
        ShardResult(_count_scan(native, scan, predictor, thresholds, config),
                    {info.patient: info}, flags)
        for config in configs
    ]  # fmt: skip


def score_scan(
    predictor: Predictor,
    scan: Any,
    thresholds: Sequence[float],
    gallery: OverlayGallery | None = None,
    mask_dir: Path | None = None,
    progress: Any = None,
    pixels: PixelSample | None = None,
) -> ShardResult:
    """Predict every slice of one :class:`~ichseg.data.datamodule.EvalScan` and count it at
    every threshold with the predictor's post-processing.

    Returns the slice counts (slices numbered from 1, as in the label CSV), the patient's facts
    and per-slice label flags; offers the patient's best / worst ICH slices (at the predictor's
    threshold) to ``gallery``; with ``mask_dir`` writes the mask at that threshold
    (:func:`save_scan_mask`); adds a seeded sample of its probabilities and ground truth to
    ``pixels`` (calibration, from the same pass).
    """
    config = predictor.inference_spec.postprocess_config()
    native = scan_probabilities(predictor, scan, progress)  # (N, H, W) float32 numpy
    if pixels is not None:
        pixels.add(scan.patient_id, native, _truth(scan))
    (result,) = _scan_results(native, scan, predictor, thresholds, [config])
    if mask_dir is not None:
        save_scan_mask(scan, predictor.mask(native), mask_dir)
    if gallery is not None:
        offer_scan(gallery, predictor, scan, native, result.counts)
    return result


def score_scans(
    predictor: Predictor,
    scans: Iterable[Any],
    thresholds: Sequence[float],
    gallery: OverlayGallery | None = None,
    mask_dir: Path | None = None,
    progress: Any = None,
    pixels: PixelSample | None = None,
) -> ShardResult:
    """:func:`score_scan` for each scan in turn (one patient in memory at a time), merged."""
    parts = [
        score_scan(predictor, scan, thresholds, gallery, mask_dir, progress, pixels)
        for scan in scans
    ]
    return merge_shards(parts) if parts else ShardResult.empty(thresholds)


def score_scans_variants(
    predictor: Predictor,
    scans: Iterable[Any],
    thresholds: Sequence[float],
    configs: Sequence[PostprocessConfig],
    progress: Any = None,
    pixels: PixelSample | None = None,
) -> list[ShardResult]:
    """Each scan predicted ONCE and counted under each post-processing of ``configs`` (each at
    every threshold): one merged :class:`ShardResult` per config; a seeded sample of each scan's
    probabilities and ground truth goes into ``pixels``."""
    per_scan = []
    for scan in scans:
        native = scan_probabilities(predictor, scan, progress)
        if pixels is not None:
            pixels.add(scan.patient_id, native, _truth(scan))
        per_scan.append(_scan_results(native, scan, predictor, thresholds, configs))
    if not per_scan:
        return [ShardResult.empty(thresholds) for _ in configs]
    return [merge_shards([parts[i] for parts in per_scan]) for i in range(len(configs))]


# --------------------------------------------------------------------------- what is reported


def report_settings(
    predictor: Predictor, thresholds: Sequence[float], min_area: float
) -> dict[str, Any]:
    """What the report states about how it was computed (the predictor's specs)."""
    spec, data = predictor.inference_spec, predictor.input_spec
    post = spec.postprocess_config()
    return {
        "threshold": spec.threshold,
        "thresholds": list(thresholds),
        "min_area": min_area,
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
        # every probability and threshold of the report is on this temperature's scale
        "temperature": spec.temperature,
    }


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
