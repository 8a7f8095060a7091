"""Data stage: CT-ICH readers, HU windowing, the phantom dataset, folds, tiles, the slice store,
samplers, datasets and one CV round's data (:class:`~ichseg.data.rounds.RoundData`), no Lightning.

Readers and windowing need only numpy; torch-based parts are imported on first use, and
``CTICHDataModule`` (now :mod:`ichseg.lit.datamodule`) is resolved lazily; docs/data-pipeline.md.
"""

from __future__ import annotations

from typing import Any

from ichseg.data.ctich import (
    SUBTYPES,
    CTICHDataset,
    Demographics,
    Scan,
    SliceLabels,
    find_release,
    open_dataset,
    read_demographics,
    read_slice_labels,
)
from ichseg.data.phantom_spec import PhantomSpec
from ichseg.data.windowing import WINDOWS, Window, apply_window, stack_windows

__all__ = [
    "SUBTYPES",
    "WINDOWS",
    "CTICHDataModule",
    "CTICHDataset",
    "Demographics",
    "PhantomSpec",
    "Scan",
    "SliceLabels",
    "Window",
    "apply_window",
    "find_release",
    "open_dataset",
    "read_demographics",
    "read_slice_labels",
    "stack_windows",
]


def __getattr__(name: str) -> Any:
    """``CTICHDataModule`` from :mod:`ichseg.lit.datamodule`, imported on first use (Lightning)."""
    if name == "CTICHDataModule":
        from ichseg.lit.datamodule import CTICHDataModule

        return CTICHDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
