"""Batches of tiles (or whole slices) of a slice store, and the evaluation view of one scan.

:class:`TileDataset` builds a whole batch per ``__getitems__`` call (one crop copy, augmentation,
one uint8 -> float32 conversion); :class:`EvalScan` is what stitched evaluation gets per patient.
docs/data-pipeline.md has the long form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ichseg.data.augment import Augmentation
from ichseg.data.ctich import Demographics, SliceLabels
from ichseg.data.store import SliceStore
from ichseg.data.tiles import TileGrid, crop_context_tiles, crop_packed_tiles, crop_tiles
from ichseg.utils.rng import derived_seed


class TileDataset(Dataset):
    """Tiles of a :class:`SliceStore`: item ``i`` is tile ``ids[i]`` (``row * G + position``).

    ``__getitems__`` builds a whole batch at once (one crop copy, augmentation per tile, one
    uint8 -> float32 conversion) and returns the batch dict; use :func:`collate_batch` as the
    loader's ``collate_fn``. The batch's ``tile`` is each tile's grid position (also under its
    earlier key ``window``, for one release); ``whole_slices`` marks a one-tile grid: it is -1.
    ``context_slices`` ``k > 0`` gives 2.5D input: the same tile of the slices ``s - k .. s + k``
    of the patient (clamped at its first and last slice) stacked as channels, ``(2k + 1) * C`` in
    all (slice-major), cropped from the one store by index arithmetic; the mask is slice ``s``'s.

    Augmentation randomness is a function of ``(seed, epoch, the batch's indices)`` only: each
    ``__getitems__`` call reseeds the augmentation from them, whichever loader worker (or the
    main process) builds the batch. So the number of workers and resuming a run change nothing.
    :meth:`set_epoch` sets the epoch (the training samplers call it when an epoch starts; it is
    held in shared memory, so persistent loader workers see it).
    """

    def __init__(
        self,
        store: SliceStore,
        grid: TileGrid,
        ids: np.ndarray,
        augmentation: Augmentation | None = None,
        whole_slices: bool = False,
        seed: int = 0,
        context_slices: int = 0,
    ) -> None:
        self.store = store
        self.grid = grid
        self.ids = np.asarray(ids, dtype=np.int64)
        self.augmentation = augmentation
        self.whole_slices = whole_slices
        self.context_slices = int(context_slices)
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64)
        if augmentation is not None:
            self._epoch.share_memory_()  # read by persistent loader workers
        self._cv2_single_threaded = False

    @property
    def epoch(self) -> int:
        """The epoch whose augmentations the dataset draws (see :meth:`set_epoch`)."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch`` from now on (also in running loader workers)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return int(self.ids.size)

    def tiles(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(n, 2)`` (store row, grid position) of dataset items."""
        ids = self.ids[np.asarray(indices, dtype=np.int64)]
        return np.stack(np.divmod(ids, len(self.grid)), axis=1)

    #: Earlier name of :meth:`tiles`, kept for one release.
    windows = tiles

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        tiles = self.tiles(indices)
        rows, positions = tiles[:, 0], tiles[:, 1]
        k = self.context_slices
        if self.whole_slices:
            # (n, [2k + 1] * C, H, W) uint8
            images = self.store.context_images(rows, k) if k else self.store.images[rows]
            masks = self.store.mask_slices(rows).view(np.uint8)  # (n, H, W)
        else:
            if k:
                neighbours = self.store.context_rows(rows, k)  # (n, 2k + 1)
                images = crop_context_tiles(self.store.images, tiles, neighbours, self.grid)
            else:
                images = crop_tiles(self.store.images, tiles, self.grid)  # (n, C, h, w) uint8
            masks = crop_packed_tiles(self.store.masks, tiles, self.grid)  # (n, h, w) uint8
        if self.augmentation is not None:
            images, masks = self._augment(images, masks, indices)
        image_tensor = (
            torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).mul_(1.0 / 255.0)
        )
        mask_tensor = torch.from_numpy(np.ascontiguousarray(masks)).to(torch.float32).unsqueeze_(1)
        tile = np.full(rows.size, -1, dtype=np.int64) if self.whole_slices else positions
        tile_tensor = torch.from_numpy(np.ascontiguousarray(tile, dtype=np.int64))
        return {
            "image": image_tensor.contiguous(),
            "mask": mask_tensor,
            "patient": torch.from_numpy(self.store.patients[rows].astype(np.int64)),
            "slice": torch.from_numpy(self.store.slice_numbers[rows].astype(np.int64)),
            "tile": tile_tensor,
            "window": tile_tensor,  # the earlier name of "tile", for one release
        }

    def _augment(
        self, images: np.ndarray, masks: np.ndarray, indices: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment each tile (image and mask with one matrix), in channels-last buffers, with
        random draws from ``(seed, epoch, indices)``."""
        assert self.augmentation is not None
        self._single_threaded_in_workers()
        keys = np.asarray(indices, dtype=np.int64).tolist()
        self.augmentation.reseed(derived_seed(self.seed, self.epoch, len(keys), *keys))
        channels_last = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        out_images = np.empty_like(channels_last)
        out_masks = np.empty_like(masks)
        for i in range(images.shape[0]):
            self.augmentation(channels_last[i], masks[i], out_images[i], out_masks[i])
        return out_images.transpose(0, 3, 1, 2), out_masks

    def _single_threaded_in_workers(self) -> None:
        """One OpenCV thread per loader worker (the workers are the parallelism)."""
        if self._cv2_single_threaded or torch.utils.data.get_worker_info() is None:
            return
        import cv2

        cv2.setNumThreads(1)
        self._cv2_single_threaded = True


def collate_batch(batch: Any) -> dict[str, torch.Tensor]:
    """Collate for :class:`TileDataset`: a batch built by ``__getitems__`` passes through."""
    if isinstance(batch, Mapping):
        return dict(batch)
    return torch.utils.data.default_collate(batch)


@dataclass
class EvalScan:
    """One val / test patient for stitched evaluation.

    ``images``: working-size slices (N, C, size, size) uint8 (a view of the store); ``mask``: the
    ORIGINAL-resolution mask (H, W, N) bool as read from disk (kept bit-packed in the store);
    ``working_mode`` tells how to map working-size maps back
    (:func:`ichseg.data.windowing.from_working_size`).
    """

    patient_id: int
    images: np.ndarray
    mask: np.ndarray
    labels: SliceLabels
    spacing: tuple[float, float, float] | None
    affine: np.ndarray | None
    demographics: Demographics | None
    working_mode: str
    release: str
    source: Path | None = None  # the CT's NIfTI file (None for the JPG release)

    @property
    def original_shape(self) -> tuple[int, int]:
        """In-plane (H, W) of the original scan."""
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    @property
    def n_slices(self) -> int:
        return int(self.mask.shape[2])

    @classmethod
    def from_store(cls, store: SliceStore, patient_id: int, working_mode: str) -> EvalScan:
        """One patient's evaluation view, all from the store (no file is read): its working-size
        slices, original-grid mask, labels and scan record."""
        record = store.record(patient_id)
        return cls(
            patient_id=int(patient_id),
            images=store.images[store.rows_of(patient_id)],
            mask=store.original_mask(patient_id),
            labels=store.labels_of(patient_id),
            spacing=record.spacing,
            affine=record.affine,
            demographics=record.demographics,
            working_mode=working_mode,
            release=record.release,
            source=record.source,
        )


#: Earlier name of :class:`TileDataset`, kept for one release.
WindowDataset = TileDataset
