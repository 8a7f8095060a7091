"""Earlier home of the stitched evaluation: the callback is now
:mod:`ichseg.lit.callbacks.stitched_eval`, its Lightning-free parts :mod:`ichseg.eval.scoring`,
:mod:`ichseg.eval.tuning` and :mod:`ichseg.eval.gallery`. Their names stay importable from here
(and ``_target_: ichseg.eval.callback.StitchedEvaluation`` keeps resolving); this module imports
Lightning, so :mod:`ichseg.eval` never imports it.
"""

from ichseg.eval.gallery import OverlayGallery, _Overlay
from ichseg.eval.scoring import (
    FLAG_NAMES,
    EvaluationData,
    ShardResult,
    autocast_for_precision,
    inference_spec_of,
    mask_file,
    merge_shards,
    save_scan_mask,
    scalar_metrics,
    scan_probabilities,
    score_scan,
    score_scans,
    score_scans_variants,
    shard_patients,
)
from ichseg.eval.tuning import TUNE_THRESHOLDS, TuningChoice, choose_on_validation
from ichseg.lit.callbacks.stitched_eval import (
    SPLITS,
    StitchedEvaluation,
    checkpoint_position,
    gather_objects,
)

__all__ = [
    "FLAG_NAMES", "SPLITS", "TUNE_THRESHOLDS", "EvaluationData", "OverlayGallery", "ShardResult",
    "StitchedEvaluation", "TuningChoice", "_Overlay", "autocast_for_precision",
    "checkpoint_position", "choose_on_validation", "gather_objects", "inference_spec_of",
    "mask_file", "merge_shards", "save_scan_mask", "scalar_metrics", "scan_probabilities",
    "score_scan", "score_scans", "score_scans_variants", "shard_patients",
]  # fmt: skip
