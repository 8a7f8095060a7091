"""Evaluation stage: post-processing, slice counts, the metrics and tables, scoring scans and the
reports, without Lightning or Hydra (docs/evaluation.md).

* :mod:`ichseg.eval.postprocess`: threshold, then the paper's closing / opening, scaled to the grid.
* :mod:`ichseg.eval.counts`: per-slice pixel counts (:class:`~ichseg.eval.counts.SliceCounts`).
* :mod:`ichseg.eval.metrics`, :mod:`ichseg.eval.volumes`: the paper's metrics and the volumes.
* :mod:`ichseg.eval.tables`: every table of one evaluation and the paper's numbers.
* :mod:`ichseg.eval.scoring`, :mod:`ichseg.eval.tuning`, :mod:`ichseg.eval.gallery`: scoring
  scans (what it needs of the data: :class:`~ichseg.eval.scoring.EvaluationData`), choosing the
  operating point on val, the best / worst slices.
* :mod:`ichseg.eval.calibration`: temperature scaling, the calibration error, the reliability
  diagram.
* :mod:`ichseg.eval.markdown`, :mod:`ichseg.eval.report`, :mod:`ichseg.eval.cv`: rows and
  markdown, the report files of one evaluation, the cross-validation report.

The Lightning callback is :class:`ichseg.lit.callbacks.stitched_eval.StitchedEvaluation`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "calibration", "counts", "cv", "gallery", "markdown", "metrics", "postprocess", "report",
    "scoring", "stitch", "tables", "tuning", "volumes",
]  # fmt: skip


def __getattr__(name: str) -> ModuleType:
    """Import the submodules on first use (``from ichseg.eval import metrics, report`` works)."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
