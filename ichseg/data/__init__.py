"""Data stage: CT-ICH readers, HU windowing, the phantom dataset, folds, windows and the DataModule.

Readers and windowing need only numpy; torch-based parts (the DataModule) are imported on first use.
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
from ichseg.data.windowing import WINDOWS, Window, apply_window, stack_windows

__all__ = [
    "SUBTYPES",
    "WINDOWS",
    "CTICHDataModule",
    "CTICHDataset",
    "Demographics",
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
    if name == "CTICHDataModule":
        from ichseg.data.datamodule import CTICHDataModule

        return CTICHDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
