"""The stitched evaluation's TensorBoard output: its markdown tables, reliability diagram and the
best / worst ICH slices as overlays.

Used by :class:`ichseg.lit.callbacks.stitched_eval.StitchedEvaluation` on rank 0; everything goes
to the first :class:`~pytorch_lightning.loggers.TensorBoardLogger` of the trainer, and nothing is
logged without one. The tags: docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ichseg.eval.calibration import image_tensor
from ichseg.eval.gallery import OverlayGallery
from ichseg.eval.markdown import tables_markdown
from ichseg.eval.scoring import ShardResult
from ichseg.eval.tables import EvaluationTables

__all__ = ["has_tensorboard", "log_gallery", "log_stitched_report", "tensorboard_writer"]


def has_tensorboard(trainer: pl.Trainer) -> bool:
    """Whether one of the trainer's loggers is a TensorBoard logger."""
    from pytorch_lightning.loggers import TensorBoardLogger

    return any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers)


def tensorboard_writer(trainer: pl.Trainer) -> Any:
    """The experiment (``SummaryWriter``) of the first TensorBoard logger, or None."""
    from pytorch_lightning.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_stitched_report(
    trainer: pl.Trainer,
    split: str,
    tables: EvaluationTables,
    merged: ShardResult,
    settings: Mapping[str, Any],
    title: str,
    log_tables: bool = True,
    gallery: OverlayGallery | None = None,
    calibration: Mapping[str, Any] | None = None,
    diagram: Any = None,
) -> None:
    """Log ``split``'s stitched report at the trainer's global step: the markdown tables as text
    (``log_tables``), the reliability ``diagram`` and the ``gallery``'s overlays."""
    writer = tensorboard_writer(trainer)
    if writer is None:
        return
    step = trainer.global_step
    if log_tables:
        markdown = tables_markdown(tables, title, settings, merged.patients,
                                   calibration=calibration)  # fmt: skip
        writer.add_text(f"{split}/stitched_report", markdown, step)
    if diagram is not None:
        writer.add_image(f"{split}/reliability", image_tensor(diagram), step)
    if gallery is not None:
        log_gallery(writer, split, gallery, step)


def log_gallery(writer: Any, split: str, gallery: OverlayGallery, step: int) -> None:
    """The best and the worst ICH slices of ``gallery`` as one overlay grid each (input | truth |
    prediction, padded to the largest slice) and their captions."""
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
