"""Training samplers whose indices are a function of ``(seed, epoch)``: undersampled tiles (the
paper) or batches with a fixed share of ICH tiles (nnU-Net's foreground oversampling).

The draws themselves are :mod:`ichseg.data.tiles`'s; docs/data-pipeline.md has the long form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from ichseg.data.tiles import (
    UNDERSAMPLING_RULES,
    epoch_generator,
    flat_tile_ids,
    foreground_per_batch,
    oversampled_tiles,
    training_tiles,
)
from ichseg.errors import ConfigError


class EpochSampler(Sampler[int]):
    """A sampler whose indices are a function of ``(seed, epoch)`` (:meth:`epoch_indices`).

    Lightning calls :meth:`set_epoch` (also through its distributed wrapper); without it each new
    iteration advances the epoch by one. The length is that of epoch 0, the same every epoch.
    ``epoch_listener`` (e.g. :meth:`ichseg.data.dataset.TileDataset.set_epoch`) is told the epoch
    each time an iteration starts, before the first index is drawn.
    """

    epoch_listener: Callable[[int], None] | None = None

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
        if self.epoch_listener is not None:
            self.epoch_listener(self.epoch)
        return iter(self.epoch_indices(self.epoch).tolist())

    def __len__(self) -> int:
        return self._length


class ShuffledSampler(EpochSampler):
    """Every index of a dataset of ``size`` items once per epoch, in an order that is a function
    of ``(seed, epoch)`` (unlike ``RandomSampler``, whose order depends on how many epochs the
    same sampler object has run: a resumed run would start over)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = int(size)
        self.seed = int(seed)
        self.start_epochs()

    def epoch_indices(self, epoch: int) -> np.ndarray:
        return epoch_generator(self.seed, epoch).permutation(self.size)


class UndersampledTileSampler(EpochSampler):
    """Training tiles of one epoch: every positive tile plus that epoch's sampled negatives.

    Yields dataset indices ``local_row * G + position`` (a :class:`TileDataset` over all tiles
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
        tiles = training_tiles(
            self.counts, self.slice_patients, self.rule, self.ratio, self.seed, epoch
        )
        indices = flat_tile_ids(tiles, self.counts.shape[1])
        if self.shuffle:
            indices = indices[epoch_generator(self.seed + 1, epoch).permutation(indices.size)]
        return indices


class OversampledTileSampler(EpochSampler):
    """Training tiles of one epoch with foreground oversampling (nnU-Net): every batch of
    ``batch_size`` consecutive indices holds a fixed share (``foreground_fraction``, at least one
    tile) of tiles with ICH, the rest ICH-free tiles drawn from every training slice.

    Yields dataset indices ``local_row * G + position`` as :class:`UndersampledTileSampler` does;
    each epoch's draw comes from ``(seed, epoch)`` (:meth:`set_epoch`; without it each new
    iteration advances the epoch). ``batches_per_epoch`` (None: enough that every positive tile
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
        tiles = oversampled_tiles(
            self.counts, self.batch_size, self.foreground_fraction,
            epoch_generator(self.seed, epoch), self.batches_per_epoch,
        )  # fmt: skip
        return flat_tile_ids(tiles, self.counts.shape[1])


#: Earlier names, kept for one release.
UndersampledWindowSampler = UndersampledTileSampler
OversampledWindowSampler = OversampledTileSampler
