"""Evaluation stage: stitching windows into slices, post-processing, and the metrics.

* :mod:`ichseg.inference.stitch`: run a model over every window of full slices and average the
  overlapping window probabilities (the paper's sum / count), or run it on whole slices;
  resample the result back to a scan's original grid.
* :mod:`ichseg.eval.postprocess`: threshold, then morphological closing and opening (the paper's
  10x10 / 5x5 squares, scaled with the pixel size), in scipy or in torch with identical results.
* :mod:`ichseg.eval.metrics`: per-slice counts (mergeable across folds and processes) and their
  aggregation into the paper's tables and the volume metrics beyond them.
* :mod:`ichseg.eval.report`: the tables as plain rows and markdown with the paper's numbers beside
  them, the report files of one evaluation, and the merge of cross-validation folds.
* :mod:`ichseg.eval.callback`: :class:`~ichseg.eval.callback.StitchedEvaluation`, the Lightning
  callback that scores every val / test slice on the original grid and writes the report.

This package knows nothing of Hydra; only the callback uses the DataModule (its ``eval_scans``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["callback", "metrics", "postprocess", "report", "stitch"]


def __getattr__(name: str) -> ModuleType:
    """Import the submodules on first use (``from ichseg.eval import stitch, metrics`` works)."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
