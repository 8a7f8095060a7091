"""The threshold baseline's report: after each fit of a
:class:`~ichseg.lit.threshold.ThresholdModule`, print the band, send the objective surface to
TensorBoard as a heat map and write ``threshold_search.json`` (thresholds, objective, surface,
where the slices came from), ``threshold_surface.npy`` and ``threshold_surface.png`` into the run
folder. docs/threshold.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ichseg.baselines.threshold import ThresholdSearch
from ichseg.utils.atomic import atomic_path, atomic_write_text

__all__ = ["ThresholdReport", "surface_image", "write_search"]

# --------------------------------------------------------------------------- the search files

#: Anchor colours of the heat map (viridis at 0, 1/4, 1/2, 3/4, 1), linearly interpolated.
_HEAT_COLOURS = (
    np.array(
        [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
        dtype=np.float64,
    )
    / 255.0
)


def surface_image(search: ThresholdSearch, scale: int = 4) -> np.ndarray:
    """The objective surface as an RGB heat map (3, n_lower * scale, n_upper * scale) in [0, 1].

    Rows are lower thresholds (first at the top), columns upper thresholds; colours run from the
    surface's minimum (dark blue) to its maximum (yellow); the chosen pair is marked in red.
    """
    surface = np.nan_to_num(search.surface.astype(np.float64))
    low, high = float(surface.min()), float(surface.max())
    unit = (surface - low) / (high - low) if high > low else np.zeros_like(surface)
    position = unit * (len(_HEAT_COLOURS) - 1)
    index = np.minimum(position.astype(np.int64), len(_HEAT_COLOURS) - 2)
    weight = (position - index)[..., None]
    rgb = (1 - weight) * _HEAT_COLOURS[index] + weight * _HEAT_COLOURS[index + 1]
    li = int(np.searchsorted(search.lowers, search.lower))
    ui = int(np.searchsorted(search.uppers, search.upper))
    rgb[li, ui] = (1.0, 0.0, 0.0)
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def write_search(
    search: ThresholdSearch, directory: str | Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``threshold_search.json`` (thresholds, objective, surface), ``threshold_surface.npy``
    and ``threshold_surface.png`` into ``directory``, each atomically. Returns the JSON path."""
    from PIL import Image

    directory = Path(directory)
    summary = search.to_dict() | dict(extra or {})
    target = directory / "threshold_search.json"
    atomic_write_text(target, json.dumps(summary, indent=1) + "\n")
    with atomic_path(directory / "threshold_surface.npy") as tmp:
        np.save(tmp, search.surface)
    picture = np.rint(surface_image(search).transpose(1, 2, 0) * 255).astype(np.uint8)
    with atomic_path(directory / "threshold_surface.png") as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return target


class ThresholdReport(pl.Callback):
    """Report every band a :class:`~ichseg.lit.threshold.ThresholdModule` fits (rank 0 only).

    The module fits at the start of a training epoch's validation, or at the end of the epoch
    when there is none; the report follows at the first hook after that (the validation epoch's
    end, the next training epoch's start, or the end of training), at the same global step. With
    any other LightningModule it does nothing.

    Args:
        output_dir: where to write the search files (None: the trainer's ``default_root_dir``,
            the run folder; False: nowhere, the band is still printed and logged).
    """

    def __init__(self, output_dir: str | Path | bool | None = None) -> None:
        super().__init__()
        self.output_dir = str(output_dir) if isinstance(output_dir, Path) else output_dir
        self._reported: ThresholdSearch | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report_new_search(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_new_search(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_new_search(trainer, pl_module)

    def _report_new_search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        search = getattr(pl_module, "search", None)
        if not isinstance(search, ThresholdSearch) or search is self._reported:
            return
        self._reported = search
        if trainer.global_rank != 0:
            return
        record = pl_module.search_record() if hasattr(pl_module, "search_record") else {}
        self.report(search, trainer, record)

    def report(
        self, search: ThresholdSearch, trainer: pl.Trainer, record: Mapping[str, Any]
    ) -> None:
        """Print the band, send the surface to the loggers, write the search files."""
        print(
            f"[ichseg.threshold] band {search.lower}..{search.upper} (inclusive): training "
            f"{search.objective} Jaccard {search.value:.4f} over {search.n_ich_slices} ICH slices "
            f"of {search.n_slices} searched",
            file=sys.stderr,
        )
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(
                    "threshold/surface (rows lower, columns upper)",
                    torch.from_numpy(surface_image(search)),
                    trainer.global_step,
                )
        directory = self.output_dir
        if directory is None:
            directory = trainer.default_root_dir
        if directory is not False and directory is not None:
            write_search(search, directory, record)
