"""Choosing the operating point on the validation split: the threshold and whether the closing /
opening is applied, by the paper's Dice on val (:func:`choose_on_validation`, nnU-Net's rule:
post-processing only when it helps). See docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ichseg.eval.metrics import PAPER_MIN_AREA, segmentation_table
from ichseg.eval.postprocess import PostprocessConfig
from ichseg.eval.scoring import ShardResult
from ichseg.specs import InferenceSpec

#: Thresholds tried on the validation split when ``tune_on_val`` is set.
TUNE_THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)


def tuning_variants(spec: InferenceSpec) -> dict[bool, PostprocessConfig]:
    """The post-processings tried on val, by "post-processing on?": off always, on when the spec
    has any morphology (its :meth:`~ichseg.specs.InferenceSpec.postprocess_config`)."""
    variants = {False: spec.with_operating_point(spec.threshold, False).postprocess_config()}
    if has_morphology(spec):
        variants[True] = spec.postprocess_config()
    return variants


def has_morphology(spec: InferenceSpec) -> bool:
    """The spec's post-processing is on and has a closing or opening step."""
    return spec.postprocess and bool(spec.postprocess_config().steps(1.0))


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
