"""The LightningDataModule: one CV round of CT-ICH as batches of windows (or whole slices).

Stages, in order:

1. **Folds** (:mod:`ichseg.data.folds`): the round's train / val / test patients, from a reused
   ``splits.json`` or made (stratified, seeded) and written.
2. **Slice store** (:class:`SliceStore`): every slice of the round's patients, windowed (brain, and
   optionally bone / subdural) and brought to the working size (NIfTI: resize 512 -> 640, image
   bilinear, mask nearest; JPG: crop 650 -> 640), in ONE contiguous uint8 array ``(S, C, H, W)``,
   with a (bit-packed) mask array ``(S, H, W)`` and per-slice patient ids and slice numbers.
   Scans are read one at a time. With ``cache_dir`` the arrays are written once as ``.npy``
   (atomically, under a versioned key) and memory-mapped, so loader workers and later folds share
   them.
3. **Windows** (:mod:`ichseg.data.patches`): index pairs (slice, grid position) into the store;
   training windows are the positive ones plus negatives re-drawn every epoch by
   :class:`UndersampledWindowSampler` (seeded by ``(seed, epoch)``), or, with
   ``undersampling="oversample"``, batches with a fixed share of ICH windows from
   :class:`OversampledWindowSampler` (nnU-Net's foreground oversampling). With
   ``context_slices=k`` each window also carries the same window of the ``k`` neighbouring slices
   on either side as channels (2.5D), gathered from the same store by index arithmetic.
4. **Batches** (:class:`WindowDataset`): a batch of windows is cropped in one copy, augmented
   (:mod:`ichseg.data.augment`, training only) and returned as a dict of tensors:

   ``image`` float32 (B, C, h, w) in [0, 1], contiguous; ``mask`` float32 (B, 1, h, w) in {0, 1};
   ``patient``, ``slice`` (1-based slice number), ``window`` (grid position; -1 for whole slices):
   int64 (B,).

``mode="full_slice"`` uses whole working-size slices (one "window" per slice) and, by default,
trains on the ICH slices only, as the paper's full-slice experiment did.

For stitched evaluation, :meth:`CTICHDataModule.eval_scans` yields every val / test patient with its
working-size slices and its ORIGINAL-resolution mask, labels and spacing. This module knows nothing
of evaluation or of Hydra.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from ichseg.data.augment import Augmentation, build_augmentation
from ichseg.data.ctich import CTICHDataset, Demographics, SliceLabels, open_dataset
from ichseg.data.folds import (
    DEFAULT_EXCLUDE,
    CVRound,
    check_splits_cover,
    make_folds,
    read_splits,
    save_splits,
)
from ichseg.data.patches import (
    SAMPLING_RULES,
    UNDERSAMPLING_RULES,
    WindowGrid,
    check_context_slices,
    crop_context_windows,
    crop_packed_windows,
    crop_windows,
    epoch_generator,
    flat_window_ids,
    foreground_per_batch,
    input_channels,
    make_grid,
    oversampled_windows,
    pack_masks,
    training_windows,
    unpack_masks,
    validation_windows,
    window_positive_counts,
)
from ichseg.data.patches import context_rows as clamped_context_rows
from ichseg.data.windowing import WINDOWS, to_working_size
from ichseg.errors import ConfigError, DatasetError
from ichseg.specs import InputSpec

#: Bump when the cache layout or its content changes.
CACHE_VERSION = 1
JPG_CHANNELS: tuple[str, ...] = ("brain", "bone")
WORKING_MODES: dict[str, str] = {"nifti": "resize", "jpg": "crop"}
Mode = Literal["windowed", "full_slice"]
Split = Literal["train", "val", "test"]


# --------------------------------------------------------------------------- the slice store


class SliceStore:
    """Windowed working-size slices of a set of patients, held contiguously.

    ``images`` (S, C, H, W) uint8; ``masks`` (S, H, ceil(W / 8)) uint8, the bool masks packed as
    bits along rows (:meth:`mask_slices` unpacks, :func:`~ichseg.data.patches.crop_packed_windows`
    crops; 8x less memory than bool); ``patients`` and ``slice_numbers`` (S,) int32;
    ``positive_pixels`` (S,) int64 mask pixels per slice. Each patient's slices are
    consecutive rows (:meth:`rows_of`). Arrays may be memory-mapped from ``directory``; such a store
    pickles as its path, so spawned workers map the same files instead of copying them.
    """

    ARRAYS = ("images", "masks", "patients", "slice_numbers", "positive_pixels")

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        patients: np.ndarray,
        slice_numbers: np.ndarray,
        positive_pixels: np.ndarray,
        directory: Path | None = None,
    ) -> None:
        self.images = images
        self.masks = masks
        self.patients = patients
        self.slice_numbers = slice_numbers
        self.positive_pixels = positive_pixels
        self.directory = directory
        self._index_patients()

    def _index_patients(self) -> None:
        ids, first, counts = np.unique(self.patients, return_index=True, return_counts=True)
        self._rows = {
            int(p): slice(int(f), int(f + c)) for p, f, c in zip(ids, first, counts, strict=True)
        }
        # first and last row of each row's patient (for neighbouring-slice context)
        group = np.searchsorted(ids, self.patients)
        self._first_row = first.astype(np.int64)[group]
        self._last_row = (first + counts - 1).astype(np.int64)[group]

    def context_rows(self, rows: np.ndarray, context_slices: int = 0) -> np.ndarray:
        """``(n, 2k + 1)`` rows of slices ``s - k .. s + k`` of each row's patient (``k`` =
        ``context_slices``), clamped at the patient's first and last slice: index arithmetic on the
        consecutive rows of each patient, no copy of the images."""
        rows = np.asarray(rows, dtype=np.int64)
        return clamped_context_rows(
            rows, context_slices, self._first_row[rows], self._last_row[rows]
        )

    def context_images(self, rows: np.ndarray, context_slices: int = 0) -> np.ndarray:
        """``(n, (2k + 1) * C, H, W)`` uint8: the rows' slices with their neighbours as channels
        (slice-major: all CT windows of slice ``s - k``, then of ``s - k + 1``, ...)."""
        rows = np.asarray(rows, dtype=np.int64)
        neighbours = self.context_rows(rows, context_slices)
        images = self.images[neighbours.reshape(-1)]
        return images.reshape(rows.size, -1, *images.shape[-2:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """In-plane (H, W) of the slices."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def mask_slices(self, rows: np.ndarray | slice) -> np.ndarray:
        """Masks of ``rows`` unpacked: (n, H, W) bool."""
        return unpack_masks(self.masks[rows], self.size[1])

    @property
    def patient_ids(self) -> list[int]:
        """Patients in the store, ascending."""
        return sorted(self._rows)

    def rows_of(self, patient_id: int) -> slice:
        """The consecutive rows of one patient."""
        try:
            return self._rows[int(patient_id)]
        except KeyError:
            raise ConfigError(f"patient {patient_id} is not in the slice store") from None

    def rows_of_patients(self, patient_ids: Sequence[int]) -> np.ndarray:
        """Rows of several patients, in the given patient order, as an int64 array."""
        parts = [np.arange(r.start, r.stop) for r in (self.rows_of(p) for p in patient_ids)]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    @classmethod
    def open(cls, directory: Path) -> SliceStore:
        """Memory-map a cached store (read-only)."""
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in cls.ARRAYS}
        return cls(**arrays, directory=directory)

    def __getstate__(self) -> dict[str, Any]:
        if self.directory is not None:
            return {"directory": self.directory}
        return {name: getattr(self, name) for name in self.ARRAYS} | {"directory": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("directory") is not None:
            opened = SliceStore.open(Path(state["directory"]))
            self.__dict__.update(opened.__dict__)
            return
        for name in self.ARRAYS:
            setattr(self, name, state[name])
        self.directory = None
        self._index_patients()


def working_mode_for(release: str, mode: str = "auto") -> str:
    """``"resize"`` or ``"crop"``: ``mode``, or for ``"auto"`` the release's own (NIfTI / JPG)."""
    if mode == "auto":
        return WORKING_MODES[release]
    if mode not in ("resize", "crop"):
        raise ConfigError(f"working-size mode must be 'auto', 'resize' or 'crop', not {mode!r}")
    return mode


def check_channels(channels: Sequence[str], release: str) -> tuple[str, ...]:
    """Validate channel (CT window) names for a release; the JPG release has only brain and bone."""
    channels = tuple(str(c) for c in channels)
    if not channels:
        raise ConfigError("at least one input channel (CT window) is needed")
    for name in channels:
        if name not in WINDOWS:
            raise ConfigError(f"unknown channel {name!r}; choose from {', '.join(WINDOWS)}")
        if release == "jpg" and name not in JPG_CHANNELS:
            raise ConfigError(
                f"channel {name!r} needs the NIfTI release: the JPG release stores only brain "
                "and bone windows"
            )
    if len(set(channels)) != len(channels):
        raise ConfigError(f"channel list {list(channels)} repeats a channel")
    return channels


def cache_key(
    dataset: CTICHDataset,
    patients: Sequence[int],
    channels: Sequence[str],
    size: int,
    working_mode: str,
) -> str:
    """Hex key of a slice store: cache version, root, release, labels, channels, size, patients."""
    label_stat = dataset.labels_path.stat()
    description = {
        "version": CACHE_VERSION,
        "root": str(Path(dataset.root).resolve()),
        "release": dataset.release,
        "labels": [dataset.labels_path.name, label_stat.st_size, label_stat.st_mtime_ns],
        "channels": list(channels),
        "size": int(size),
        "working_mode": working_mode,
        "patients": sorted(int(p) for p in patients),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def build_slice_store(
    dataset: CTICHDataset,
    patients: Sequence[int],
    channels: Sequence[str] = ("brain",),
    size: int = 640,
    working_mode: str = "auto",
    cache_dir: str | Path | None = None,
) -> SliceStore:
    """The :class:`SliceStore` of ``patients``: from the cache if present, else built scan by scan.

    Without ``cache_dir`` the arrays live in memory; with it they are written once to
    ``cache_dir/slices-<release>-<key>/`` (atomically: a temporary folder renamed when complete) and
    memory-mapped.
    """
    channels = check_channels(channels, dataset.release)
    working_mode = working_mode_for(dataset.release, working_mode)
    patients = sorted(int(p) for p in patients)
    if cache_dir is None:
        return _fill_store(dataset, patients, channels, size, working_mode, directory=None)
    cache_dir = Path(cache_dir)
    final = (
        cache_dir
        / f"slices-{dataset.release}-{cache_key(dataset, patients, channels, size, working_mode)}"
    )
    if (final / "meta.json").is_file():
        try:
            return SliceStore.open(final)
        except (OSError, ValueError) as err:
            raise DatasetError(
                f"{final}: slice cache is unreadable ({err}); delete the folder to rebuild it",
                final,
            ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        store = _fill_store(dataset, patients, channels, size, working_mode, directory=temporary)
        meta = {
            "version": CACHE_VERSION,
            "root": str(dataset.root),
            "release": dataset.release,
            "channels": list(channels),
            "size": size,
            "working_mode": working_mode,
            "patients": patients,
            "slices": len(store),
        }
        (temporary / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        del store
        try:
            os.rename(temporary, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent build that won the race
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return SliceStore.open(final)


def _fill_store(
    dataset: CTICHDataset,
    patients: list[int],
    channels: tuple[str, ...],
    size: int,
    working_mode: str,
    directory: Path | None,
) -> SliceStore:
    """Read scans one at a time into preallocated arrays (in memory, or ``.npy`` files)."""
    counts = [dataset.n_slices(p) for p in patients]
    total = int(sum(counts))
    shapes = {
        "images": ((total, len(channels), size, size), np.uint8),
        "masks": ((total, size, (size + 7) // 8), np.uint8),
        "patients": ((total,), np.int32),
        "slice_numbers": ((total,), np.int32),
        "positive_pixels": ((total,), np.int64),
    }
    if directory is None:
        arrays = {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}
    else:
        arrays = {
            name: np.lib.format.open_memmap(
                directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape
            )
            for name, (shape, dtype) in shapes.items()
        }
    start = 0
    for patient, n_slices in zip(patients, counts, strict=True):
        scan = dataset.load(patient)
        if scan.n_slices != n_slices:
            raise DatasetError(
                f"{scan.paths.get('image')}: {scan.n_slices} slices but {n_slices} rows in the "
                "label CSV",
                scan.paths.get("image"),
            )
        rows = slice(start, start + n_slices)
        images = to_working_size(scan.windowed(channels, np.uint8), size, working_mode)
        masks = to_working_size(scan.mask_slices(), size, working_mode, is_mask=True)
        arrays["images"][rows] = images
        arrays["masks"][rows] = pack_masks(masks)
        arrays["patients"][rows] = patient
        arrays["slice_numbers"][rows] = np.arange(1, n_slices + 1)
        arrays["positive_pixels"][rows] = masks.reshape(n_slices, -1).sum(axis=1)
        start += n_slices
        del scan, images, masks
    if directory is not None:
        for array in arrays.values():
            array.flush()
    return SliceStore(**arrays, directory=directory)


def store_window_counts(
    store: SliceStore, rows: np.ndarray, grid: WindowGrid, chunk: int = 64
) -> np.ndarray:
    """``(len(rows), G)`` ICH pixels per window of the given store rows (empty slices skipped)."""
    counts = np.zeros((rows.size, len(grid)), dtype=np.int32)
    positive = np.flatnonzero(store.positive_pixels[rows] > 0)
    for start in range(0, positive.size, chunk):
        block = positive[start : start + chunk]
        counts[block] = window_positive_counts(store.mask_slices(rows[block]), grid)
    return counts


# --------------------------------------------------------------------------- datasets and samplers


class WindowDataset(Dataset):
    """Windows of a :class:`SliceStore`: item ``i`` is window ``ids[i]`` (``row * G + position``).

    ``__getitems__`` builds a whole batch at once (one crop copy, augmentation per window, one
    uint8 -> float32 conversion) and returns the batch dict; use :func:`collate_batch` as the
    loader's ``collate_fn``. ``whole_slices`` marks a one-window grid: ids report window -1.
    ``context_slices`` ``k > 0`` gives 2.5D input: the same window of the slices ``s - k .. s + k``
    of the patient (clamped at its first and last slice) stacked as channels, ``(2k + 1) * C`` in
    all (slice-major), cropped from the one store by index arithmetic; the mask is slice ``s``'s.
    """

    def __init__(
        self,
        store: SliceStore,
        grid: WindowGrid,
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
        self._seeded_for: tuple[int, int] | None = None
        if augmentation is not None:
            augmentation.reseed(seed)

    def __len__(self) -> int:
        return int(self.ids.size)

    def windows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(n, 2)`` (store row, grid position) of dataset items."""
        ids = self.ids[np.asarray(indices, dtype=np.int64)]
        return np.stack(np.divmod(ids, len(self.grid)), axis=1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        windows = self.windows(indices)
        rows, positions = windows[:, 0], windows[:, 1]
        k = self.context_slices
        if self.whole_slices:
            # (n, [2k + 1] * C, H, W) uint8
            images = self.store.context_images(rows, k) if k else self.store.images[rows]
            masks = self.store.mask_slices(rows).view(np.uint8)  # (n, H, W)
        else:
            if k:
                neighbours = self.store.context_rows(rows, k)  # (n, 2k + 1)
                images = crop_context_windows(self.store.images, windows, neighbours, self.grid)
            else:
                images = crop_windows(self.store.images, windows, self.grid)  # (n, C, h, w) uint8
            masks = crop_packed_windows(self.store.masks, windows, self.grid)  # (n, h, w) uint8
        if self.augmentation is not None:
            images, masks = self._augment(images, masks)
        image_tensor = (
            torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).mul_(1.0 / 255.0)
        )
        mask_tensor = torch.from_numpy(np.ascontiguousarray(masks)).to(torch.float32).unsqueeze_(1)
        window = np.full(rows.size, -1, dtype=np.int64) if self.whole_slices else positions
        return {
            "image": image_tensor.contiguous(),
            "mask": mask_tensor,
            "patient": torch.from_numpy(self.store.patients[rows].astype(np.int64)),
            "slice": torch.from_numpy(self.store.slice_numbers[rows].astype(np.int64)),
            "window": torch.from_numpy(np.ascontiguousarray(window, dtype=np.int64)),
        }

    def _augment(self, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment each window (image and mask with one matrix), in channels-last buffers."""
        assert self.augmentation is not None
        self._seed_worker()
        channels_last = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        out_images = np.empty_like(channels_last)
        out_masks = np.empty_like(masks)
        for i in range(images.shape[0]):
            self.augmentation(channels_last[i], masks[i], out_images[i], out_masks[i])
        return out_images.transpose(0, 3, 1, 2), out_masks

    def _seed_worker(self) -> None:
        """Give each loader worker its own augmentation stream (from the worker's torch seed)."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return
        key = (info.id, info.seed)
        if key != self._seeded_for:
            import cv2

            cv2.setNumThreads(1)
            assert self.augmentation is not None
            self.augmentation.reseed(info.seed)
            self._seeded_for = key


def collate_batch(batch: Any) -> dict[str, torch.Tensor]:
    """Collate for :class:`WindowDataset`: a batch built by ``__getitems__`` passes through."""
    if isinstance(batch, Mapping):
        return dict(batch)
    return torch.utils.data.default_collate(batch)


class EpochSampler(Sampler[int]):
    """A sampler whose indices are a function of ``(seed, epoch)`` (:meth:`epoch_indices`).

    Lightning calls :meth:`set_epoch` (also through its distributed wrapper); without it each new
    iteration advances the epoch by one. The length is that of epoch 0, the same every epoch.
    """

    def start_epochs(self) -> None:
        """Start at epoch 0; call at the end of ``__init__``, once :meth:`epoch_indices` works."""
        self.epoch = 0
        self._iterated = False
        self._length = len(self.epoch_indices(0))

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The dataset indices of ``epoch``, in the order they are yielded."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._iterated = False

    def __iter__(self) -> Iterator[int]:
        if self._iterated:
            self.epoch += 1
        self._iterated = True
        return iter(self.epoch_indices(self.epoch).tolist())

    def __len__(self) -> int:
        return self._length


class UndersampledWindowSampler(EpochSampler):
    """Training windows of one epoch: every positive window plus that epoch's sampled negatives.

    Yields dataset indices ``local_row * G + position`` (a :class:`WindowDataset` over all windows
    of the training rows). Negatives and order come from ``(seed, epoch)``: call :meth:`set_epoch`
    (Lightning does, also through its distributed wrapper); without it each new iteration advances
    the epoch by one. The length is the same every epoch.
    """

    def __init__(
        self,
        counts: np.ndarray,
        slice_patients: np.ndarray,
        rule: str = "paper",
        ratio: float = 1.0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if rule not in UNDERSAMPLING_RULES:
            raise ConfigError(
                f"undersampling rule must be one of {', '.join(UNDERSAMPLING_RULES)}, not {rule!r}"
            )
        self.counts = counts
        self.slice_patients = np.asarray(slice_patients)
        self.rule = rule
        self.ratio = float(ratio)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.start_epochs()

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The dataset indices of ``epoch``, in the order they are yielded."""
        windows = training_windows(
            self.counts, self.slice_patients, self.rule, self.ratio, self.seed, epoch
        )
        indices = flat_window_ids(windows, self.counts.shape[1])
        if self.shuffle:
            indices = indices[epoch_generator(self.seed + 1, epoch).permutation(indices.size)]
        return indices


class OversampledWindowSampler(EpochSampler):
    """Training windows of one epoch with foreground oversampling (nnU-Net): every batch of
    ``batch_size`` consecutive indices holds a fixed share (``foreground_fraction``, at least one
    window) of windows with ICH, the rest ICH-free windows drawn from every training slice.

    Yields dataset indices ``local_row * G + position`` as :class:`UndersampledWindowSampler` does;
    each epoch's draw comes from ``(seed, epoch)`` (:meth:`set_epoch`; without it each new
    iteration advances the epoch). ``batches_per_epoch`` (None: enough that every positive window
    is seen once per epoch) fixes the length, the same every epoch. Give the DataLoader the same
    ``batch_size`` and keep its ``drop_last`` off. Under DDP Lightning deals the indices out to the
    ranks, so the share holds per global batch only on average.
    """

    def __init__(
        self,
        counts: np.ndarray,
        batch_size: int,
        foreground_fraction: float = 0.33,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ) -> None:
        self.counts = counts
        self.batch_size = int(batch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.per_batch = foreground_per_batch(self.batch_size, self.foreground_fraction)
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ConfigError(f"batches_per_epoch must be positive, got {batches_per_epoch}")
        self.batches_per_epoch = batches_per_epoch
        self.seed = int(seed)
        self.start_epochs()

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The dataset indices of ``epoch``, in the order they are yielded (batch by batch)."""
        windows = oversampled_windows(
            self.counts, self.batch_size, self.foreground_fraction,
            epoch_generator(self.seed, epoch), self.batches_per_epoch,
        )  # fmt: skip
        return flat_window_ids(windows, self.counts.shape[1])


# --------------------------------------------------------------------------- evaluation view


@dataclass
class EvalScan:
    """One val / test patient for stitched evaluation.

    ``images``: working-size slices (N, C, size, size) uint8 (a view of the store); ``mask``: the
    ORIGINAL-resolution mask (H, W, N) bool as read from disk; ``working_mode`` tells how to map
    working-size maps back (:func:`ichseg.data.windowing.from_working_size`).
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


# --------------------------------------------------------------------------- the DataModule


class CTICHDataModule(pl.LightningDataModule):
    """CT-ICH, one cross-validation round, as Lightning data loaders.

    Args:
        root: the dataset folder (either release; see :func:`ichseg.data.ctich.find_release`).
        fold: the CV round (its test fold), 0..k-1.
        k: number of folds.
        seed: seed of the negative undersampling, the shuffling and the augmentation.
        split_seed: seed of the folds (kept apart so that training seeds do not move patients).
        splits_file: reuse this ``splits.json`` if it exists, else make the folds and write it here.
        splits_dir: if given, the splits used are also written to ``splits_dir/splits.json`` (the
            run's record).
        exclude: patient ids left out (the paper: 70, chronic ICH).
        mode: ``"windowed"`` (the paper's windows) or ``"full_slice"``.
        window, stride: the window grid (160 / 80 on a 640 slice: 49 windows).
        working_size: side of the square working slices (640).
        working_mode: ``"auto"`` (NIfTI resize, JPG crop), ``"resize"`` or ``"crop"``.
        channels: CT windows stacked as channels: brain, bone, subdural (JPG: brain and bone only).
        context_slices: 2.5D input: ``k`` neighbouring slices on each side (``s - k .. s + k`` of
            the same patient, clamped at its ends) stacked as channels, slice-major; the network
            takes :attr:`in_channels` ``= len(channels) * (2k + 1)``. 0: one slice (the paper).
        batch_size, num_workers: the loaders'; ``pin_memory`` None means "when CUDA is available".
        undersampling: training windows: ``"paper"`` (one ICH-free slice per patient), ``"ratio"``
            or ``"all"`` (undersampling), or ``"oversample"``: nnU-Net's foreground oversampling,
            ``foreground_fraction`` of every batch holds ICH (also in full-slice mode, where
            every training slice is a candidate).
        negative_ratio: negatives per positive window for ``"ratio"``.
        foreground_fraction: share of ICH windows (slices) in each batch for ``"oversample"``
            (nnU-Net: 0.33), at least one per batch.
        batches_per_epoch: ``"oversample"`` epoch length in batches; None: every positive window
            once per epoch.
        val_windows: ``"positive"`` (the paper) or ``"all"`` windows of the val slices; in
            full-slice mode ICH slices or all slices.
        train_slices: full-slice mode: ``"ich"`` (the authors' choice) or ``"all"`` slices.
        augmentation: :func:`ichseg.data.augment.build_augmentation` options (None: off; {}: the
            paper's). Training only.
        cache_dir: where to cache the slice store (memory-mapped); None keeps it in memory.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        fold: int = 0,
        k: int = 5,
        seed: int = 0,
        split_seed: int = 0,
        splits_file: str | os.PathLike[str] | None = None,
        splits_dir: str | os.PathLike[str] | None = None,
        exclude: Sequence[int] = DEFAULT_EXCLUDE,
        mode: Mode = "windowed",
        window: int = 160,
        stride: int = 80,
        working_size: int = 640,
        working_mode: str = "auto",
        channels: Sequence[str] = ("brain",),
        context_slices: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        undersampling: str = "paper",
        negative_ratio: float = 1.0,
        foreground_fraction: float = 0.33,
        batches_per_epoch: int | None = None,
        val_windows: Literal["positive", "all"] = "positive",
        train_slices: Literal["ich", "all"] = "ich",
        augmentation: Mapping[str, Any] | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("windowed", "full_slice"):
            raise ConfigError(f"data mode must be 'windowed' or 'full_slice', not {mode!r}")
        if undersampling not in SAMPLING_RULES:
            raise ConfigError(
                f"undersampling must be one of {', '.join(SAMPLING_RULES)}, not {undersampling!r}"
            )
        check_context_slices(context_slices)
        foreground_per_batch(int(batch_size), float(foreground_fraction))  # validates both
        if batches_per_epoch is not None and int(batches_per_epoch) < 1:
            raise ConfigError(f"batches_per_epoch must be positive, got {batches_per_epoch}")
        if val_windows not in ("positive", "all"):
            raise ConfigError(f"val_windows must be 'positive' or 'all', not {val_windows!r}")
        if train_slices not in ("ich", "all"):
            raise ConfigError(f"train_slices must be 'ich' or 'all', not {train_slices!r}")
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(
                "batch_size must be positive and num_workers non-negative, "
                f"got {batch_size} and {num_workers}"
            )
        self.root = Path(root)
        self.fold = int(fold)
        self.k = int(k)
        self.seed = int(seed)
        self.split_seed = int(split_seed)
        self.splits_file = None if splits_file is None else Path(splits_file)
        self.splits_dir = None if splits_dir is None else Path(splits_dir)
        self.exclude = tuple(int(p) for p in exclude)
        self.mode = mode
        self.working_size = int(working_size)
        self.working_mode_option = working_mode
        self.channels = tuple(channels)
        self.context_slices = int(context_slices)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.undersampling = undersampling
        self.negative_ratio = float(negative_ratio)
        self.foreground_fraction = float(foreground_fraction)
        self.batches_per_epoch = None if batches_per_epoch is None else int(batches_per_epoch)
        self.val_windows = val_windows
        self.train_slices = train_slices
        self.augmentation_options = augmentation
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        build_augmentation(augmentation)  # fail early on a bad option
        if mode == "full_slice":
            self.grid = make_grid(self.working_size, self.working_size, self.working_size)
        else:
            self.grid = make_grid(self.working_size, window, stride)
        self.save_hyperparameters()

        self.dataset: CTICHDataset | None = None
        self.rounds: list[CVRound] | None = None
        self.cv_round: CVRound | None = None
        self.splits_path: Path | None = None
        self.store: SliceStore | None = None
        self.working_mode: str | None = None
        self._rows: dict[str, np.ndarray] = {}
        self._counts: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ setup

    @property
    def is_full_slice(self) -> bool:
        return self.mode == "full_slice"

    @property
    def in_channels(self) -> int:
        """Input channels of the network: ``len(channels) * (2 * context_slices + 1)``."""
        return input_channels(len(self.channels), self.context_slices)

    @property
    def input_spec(self) -> InputSpec:
        """How this DataModule prepares slices for the network, resolved (the dataset is opened
        to resolve ``working_mode="auto"`` by its release); checkpoints store it."""
        self._open_dataset()
        return InputSpec(
            mode=self.mode,
            tile_size=int(self.hparams["window"]),
            tile_stride=int(self.hparams["stride"]),
            working_size=self.working_size,
            working_mode=self.working_mode or "resize",
            channels=self.channels,
            context_slices=self.context_slices,
        )

    def prepare_data(self) -> None:
        """Build the on-disk slice cache once (Lightning calls this on one process per node)."""
        if self.cache_dir is not None:
            self._setup_splits()
            self._setup_store()

    def setup(self, stage: str | None = None) -> None:
        """Folds, the slice store and the per-split rows and window counts (idempotent)."""
        self._setup_splits()
        self._setup_store()
        if not self._rows:
            assert self.cv_round is not None and self.store is not None
            for split in ("train", "val", "test"):
                rows = self.store.rows_of_patients(self.cv_round.patients(split))
                self._rows[split] = rows
                self._counts[split] = store_window_counts(self.store, rows, self.grid)

    def _open_dataset(self) -> CTICHDataset:
        if self.dataset is None:
            self.dataset = open_dataset(self.root)
            check_channels(self.channels, self.dataset.release)
            self.working_mode = working_mode_for(self.dataset.release, self.working_mode_option)
        return self.dataset

    def _setup_splits(self) -> None:
        if self.cv_round is not None:
            return
        dataset = self._open_dataset()
        eligible = [p for p in dataset.patient_ids if p not in set(self.exclude)]
        meta = {
            "seed": self.split_seed,
            "excluded": list(self.exclude),
            "root": str(dataset.root),
            "release": dataset.release,
        }
        if self.splits_file is not None and self.splits_file.exists():
            rounds, file_meta = read_splits(self.splits_file)
            if len(rounds) != self.k:
                raise ConfigError(
                    f"{self.splits_file}: the splits file holds {len(rounds)} CV rounds "
                    f"but k={self.k}"
                )
            check_splits_cover(rounds, eligible, self.splits_file)
            meta.update({key: file_meta.get(key) for key in ("seed", "excluded")})
            self.splits_path = self.splits_file
        else:
            labels = dataset.patient_labels()
            keep = np.isin(dataset.patient_ids, eligible)
            rounds = make_folds(
                np.asarray(dataset.patient_ids)[keep].tolist(),
                labels[keep],
                k=self.k,
                seed=self.split_seed,
                exclude=(),
            )
            if self.splits_file is not None:
                self.splits_path = save_splits(self.splits_file, rounds, meta)
        if not 0 <= self.fold < len(rounds):
            where = f" in {self.splits_path}" if self.splits_path is not None else ""
            raise ConfigError(
                f"fold {self.fold} does not exist: there are {len(rounds)} CV rounds{where}"
            )
        if self.splits_dir is not None:
            written = save_splits(self.splits_dir / "splits.json", rounds, meta)
            self.splits_path = self.splits_path or written
        self.rounds = rounds
        self.cv_round = rounds[self.fold]
        for split in ("train", "val", "test"):
            if not self.cv_round.patients(split):
                raise ConfigError(f"the {split} part of CV round {self.fold} has no patients")

    def _setup_store(self) -> None:
        if self.store is not None:
            return
        dataset = self._open_dataset()
        assert self.cv_round is not None
        self.store = build_slice_store(
            dataset,
            self.cv_round.all_patients,
            self.channels,
            self.working_size,
            self.working_mode or "auto",
            self.cache_dir,
        )

    # ------------------------------------------------------------------ per split

    def rows(self, split: Split) -> np.ndarray:
        """Store rows of a split's slices."""
        self._require_setup()
        return self._rows[split]

    def window_counts(self, split: Split) -> np.ndarray:
        """``(slices, G)`` ICH pixels per window of a split's slices (rows as :meth:`rows`)."""
        self._require_setup()
        return self._counts[split]

    def _require_setup(self) -> None:
        if not self._rows:
            raise ConfigError("call setup() on the data module before using its splits")

    def _all_window_ids(self, rows: np.ndarray) -> np.ndarray:
        """Flat store ids of every window of ``rows``, row-major."""
        g = len(self.grid)
        return (rows[:, None] * g + np.arange(g)[None, :]).reshape(-1)

    def train_dataset(self) -> tuple[WindowDataset, Sampler[int]]:
        """The training dataset and its sampler (undersampled or oversampled windows, or
        shuffled slices)."""
        rows, counts = self.rows("train"), self.window_counts("train")
        augmentation = build_augmentation(self.augmentation_options)
        k = self.context_slices
        if self.undersampling == "oversample":
            if not np.any(counts > 0):
                raise DatasetError(
                    f"{self.root}: the training patients of round {self.fold} have no ICH to "
                    "oversample",
                    self.root,
                )
            dataset = WindowDataset(
                self.store, self.grid, self._all_window_ids(rows), augmentation,
                whole_slices=self.is_full_slice, seed=self.seed, context_slices=k,
            )  # fmt: skip
            sampler = OversampledWindowSampler(
                counts, self.batch_size, self.foreground_fraction, self.seed,
                self.batches_per_epoch,
            )  # fmt: skip
            return dataset, sampler
        if self.is_full_slice:
            chosen = rows if self.train_slices == "all" else rows[counts[:, 0] > 0]
            if chosen.size == 0:
                raise DatasetError(
                    f"{self.root}: the training patients of round {self.fold} have no ICH slice",
                    self.root,
                )
            dataset = WindowDataset(
                self.store, self.grid, chosen, augmentation, whole_slices=True, seed=self.seed,
                context_slices=k,
            )  # fmt: skip
            generator = torch.Generator().manual_seed(self.seed)
            return dataset, RandomSampler(dataset, generator=generator)
        dataset = WindowDataset(
            self.store, self.grid, self._all_window_ids(rows), augmentation, seed=self.seed,
            context_slices=k,
        )  # fmt: skip
        sampler = UndersampledWindowSampler(
            counts, self.store.patients[rows], self.undersampling, self.negative_ratio, self.seed
        )
        if len(sampler) == 0:
            raise DatasetError(f"{self.root}: no training windows in round {self.fold}", self.root)
        return dataset, sampler

    def eval_dataset(
        self, split: Split, which: Literal["positive", "all"] | None = None
    ) -> WindowDataset:
        """Windows (or slices) of val / test patients, in slice-major order, without augmentation.

        ``which``: ``"positive"`` or ``"all"`` (default: ``val_windows`` for val, ``"all"`` for
        test).
        """
        which = which or (self.val_windows if split == "val" else "all")
        rows, counts = self.rows(split), self.window_counts(split)
        windows = validation_windows(counts, which)
        ids = rows[windows[:, 0]] * len(self.grid) + windows[:, 1]
        return WindowDataset(
            self.store, self.grid, ids, None, whole_slices=self.is_full_slice,
            context_slices=self.context_slices,
        )  # fmt: skip

    def _loader(self, dataset: WindowDataset, sampler: Sampler[int]) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset, sampler = self.train_dataset()
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        dataset = self.eval_dataset("val")
        return self._loader(dataset, SequentialSampler(dataset))

    def test_dataloader(self) -> DataLoader:
        dataset = self.eval_dataset("test")
        return self._loader(dataset, SequentialSampler(dataset))

    # ------------------------------------------------------------------ evaluation view

    def eval_scans(
        self, split: Split = "test", patients: Sequence[int] | None = None
    ) -> Iterator[EvalScan]:
        """Every patient of ``split`` (or only ``patients`` of it, in that order, e.g. one DDP
        rank's share): working-size slices, original-resolution mask, labels.

        Scans are re-read one at a time for their original masks; images come from the store.
        """
        self._require_setup()
        assert self.cv_round is not None and self.store is not None and self.dataset is not None
        members = self.cv_round.patients(split)
        if patients is not None:
            outside = sorted(set(int(p) for p in patients) - set(members))
            if outside:
                raise ConfigError(
                    f"patients {outside} are not in the {split} split of round {self.fold}"
                )
            members = [int(p) for p in patients]
        for patient in members:
            scan = self.dataset.load(patient)
            yield EvalScan(
                patient_id=patient,
                images=self.store.images[self.store.rows_of(patient)],
                mask=scan.mask,
                labels=scan.labels,
                spacing=scan.spacing,
                affine=scan.affine,
                demographics=scan.demographics,
                working_mode=self.working_mode or "resize",
                release=scan.release,
                source=scan.paths.get("image") if scan.release == "nifti" else None,
            )
            del scan

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the same data: the round and the splits file."""
        return {
            "fold": self.fold,
            "splits_path": None if self.splits_path is None else str(self.splits_path),
        }
