"""The LightningDataModule of CT-ICH: one CV round as batches of tiles (or whole slices).

A thin layer over :class:`ichseg.data.rounds.RoundData` (folds, slice store, datasets, samplers,
evaluation view): Lightning's hooks, the loaders and the checkpointed state. docs/data-pipeline.md
has the stages and options in full.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from ichseg.data.dataset import TileDataset, collate_batch
from ichseg.data.folds import DEFAULT_EXCLUDE
from ichseg.data.phantom_spec import PhantomSpec
from ichseg.data.rounds import RENAMED_OPTIONS, Mode, RoundData, check_options, renamed_option
from ichseg.data.sampling import EpochSampler


class CTICHDataModule(RoundData, pl.LightningDataModule):
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
        mode: ``"windowed"`` (the paper's tiles) or ``"full_slice"``.
        tile_size, tile_stride: the tile grid (160 / 80 on a 640 slice: 49 tiles).
        working_size: side of the square working slices (640).
        working_mode: ``"auto"`` (NIfTI resize, JPG crop), ``"resize"`` or ``"crop"``.
        channels: CT windows stacked as channels: brain, bone, subdural (JPG: brain and bone only).
        context_slices: 2.5D input: ``k`` neighbouring slices on each side (``s - k .. s + k`` of
            the same patient, clamped at its ends) stacked as channels, slice-major; the network
            takes :attr:`in_channels` ``= len(channels) * (2k + 1)``. 0: one slice (the paper).
        batch_size, num_workers: the loaders'; ``pin_memory`` None means "when CUDA is available".
        sampling: training tiles: ``"paper"`` (one ICH-free slice per patient), ``"ratio"`` or
            ``"all"`` (undersampling), or ``"oversample"``: nnU-Net's foreground oversampling,
            ``foreground_fraction`` of every batch holds ICH (also in full-slice mode, where
            every training slice is a candidate).
        negative_ratio: negatives per positive tile for ``"ratio"``.
        foreground_fraction: share of ICH tiles (slices) in each batch for ``"oversample"``
            (nnU-Net: 0.33), at least one per batch.
        batches_per_epoch: ``"oversample"`` epoch length in batches; None: every positive tile
            once per epoch.
        val_tiles: ``"positive"`` (the paper) or ``"all"`` tiles of the val slices; in
            full-slice mode ICH slices or all slices.
        train_slices: full-slice mode: ``"ich"`` (the authors' choice) or ``"all"`` slices.
        augmentation: :func:`ichseg.data.augment.build_augmentation` options (None: off; {}: the
            paper's). Training only.
        cache_dir: where to cache the slice store (memory-mapped); None keeps it in memory.
        phantom: a :class:`~ichseg.data.phantom_spec.PhantomSpec` (or a mapping of its fields):
            generate that phantom into ``root`` in :meth:`prepare_data` when ``root`` is absent.
        val_tiles_max: at most this many validation tiles: every ICH tile and a fixed sample
            (seeded by ``seed``, the same every epoch) of the ICH-free ones
            (:func:`ichseg.data.tiles.limit_tiles`); None: all of ``val_tiles``. A CPU budget
            then goes into training rather than validation (experiment=windowed_plus_cpu).
        window, stride, undersampling, val_windows: earlier names of ``tile_size``,
            ``tile_stride``, ``sampling`` and ``val_tiles``, accepted for one release with a
            FutureWarning; when given (not None) they win over the new keys.
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
        tile_size: int = 160,
        tile_stride: int = 80,
        working_size: int = 640,
        working_mode: str = "auto",
        channels: Sequence[str] = ("brain",),
        context_slices: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        sampling: str = "paper",
        negative_ratio: float = 1.0,
        foreground_fraction: float = 0.33,
        batches_per_epoch: int | None = None,
        val_tiles: Literal["positive", "all"] = "positive",
        train_slices: Literal["ich", "all"] = "ich",
        augmentation: Mapping[str, Any] | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        phantom: PhantomSpec | Mapping[str, Any] | None = None,
        val_tiles_max: int | None = None,
        *,
        window: int | None = None,
        stride: int | None = None,
        undersampling: str | None = None,
        val_windows: Literal["positive", "all"] | None = None,
    ) -> None:
        pl.LightningDataModule.__init__(self)
        tile_size = renamed_option("window", window, tile_size)
        tile_stride = renamed_option("stride", stride, tile_stride)
        sampling = renamed_option("undersampling", undersampling, sampling)
        val_tiles = renamed_option("val_windows", val_windows, val_tiles)
        hparams = {name: value for name, value in locals().items() if name in _HPARAMS}
        check_options(
            mode, sampling, context_slices, batch_size, foreground_fraction, batches_per_epoch,
            val_tiles, train_slices, num_workers, val_tiles_max,
        )  # fmt: skip
        RoundData.__init__(
            self, root, fold, k, seed, split_seed, splits_file, splits_dir, exclude, mode,
            tile_size, tile_stride, working_size, working_mode, channels, context_slices,
            batch_size, sampling, negative_ratio, foreground_fraction, batches_per_epoch,
            val_tiles, train_slices, augmentation, cache_dir, phantom, val_tiles_max,
        )  # fmt: skip
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.save_hyperparameters(hparams)

    def prepare_data(self) -> None:
        """Generate the phantom and build the on-disk slice cache once (Lightning calls this on
        one process per node before :meth:`setup` runs on every process)."""
        self.prepare()

    def _loader(self, dataset: TileDataset, sampler: Sampler[int]) -> DataLoader:
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
        trainer = getattr(self, "trainer", None)
        if trainer is not None and isinstance(sampler, EpochSampler):
            # Lightning sets the sampler's epoch only after it has created the loader's iterator,
            # whose workers start drawing indices at once: in a resumed run they would draw those
            # of epoch 0. Start at the epoch Lightning is about to run.
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        dataset = self.eval_dataset("val")
        return self._loader(dataset, SequentialSampler(dataset))

    def test_dataloader(self) -> DataLoader:
        dataset = self.eval_dataset("test")
        return self._loader(dataset, SequentialSampler(dataset))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the same data: the round and the splits file."""
        return {
            "fold": self.fold,
            "splits_path": None if self.splits_path is None else str(self.splits_path),
        }


#: The hyperparameters saved: the constructor's arguments under their current names.
_HPARAMS = frozenset(inspect.signature(CTICHDataModule.__init__).parameters) - {
    "self",
    *RENAMED_OPTIONS,
}
