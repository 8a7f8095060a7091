"""Evaluation stage: stitching windows into slices, post-processing, and the metrics.

* :mod:`ichseg.eval.stitch`: run a model over every window of full slices and average the
  overlapping window probabilities (the paper's sum / count), or run it on whole slices;
  resample the result back to a scan's original grid.
* :mod:`ichseg.eval.postprocess`: threshold, then morphological closing and opening (the paper's
  10x10 / 5x5 squares, scaled with the pixel size), in scipy or in torch with identical results.
* :mod:`ichseg.eval.metrics`: per-slice counts (mergeable across folds and processes) and their
  aggregation into the paper's tables and the volume metrics beyond them.

This package knows nothing of Hydra or of the DataModule.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["metrics", "postprocess", "stitch"]


def __getattr__(name: str) -> ModuleType:
    """Import the submodules on first use (``from ichseg.eval import stitch, metrics`` works)."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
