"""One cross-validation round of CT-ICH as datasets, without Lightning: folds, the slice store, the
per-split rows and tile counts, the training / evaluation datasets and the evaluation view.

:class:`RoundData` holds it all; :class:`ichseg.lit.datamodule.CTICHDataModule` adds only the
Lightning hooks and loaders on top. docs/data-pipeline.md has the long form.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Sampler

from ichseg.data.augment import build_augmentation
from ichseg.data.ctich import CTICHDataset, open_dataset
from ichseg.data.dataset import EvalScan, TileDataset
from ichseg.data.folds import (
    DEFAULT_EXCLUDE,
    CVRound,
    check_splits_cover,
    make_folds,
    read_splits,
    save_splits,
)
from ichseg.data.phantom_spec import PhantomSpec, ensure_phantom
from ichseg.data.sampling import (
    EpochSampler,
    OversampledTileSampler,
    ShuffledSampler,
    UndersampledTileSampler,
)
from ichseg.data.store import (
    SliceStore,
    build_slice_store,
    check_channels,
    store_tile_counts,
    working_mode_for,
)
from ichseg.data.tiles import (
    SAMPLING_RULES,
    check_context_slices,
    foreground_per_batch,
    input_channels,
    make_grid,
    validation_tiles,
)
from ichseg.errors import ConfigError, DatasetError
from ichseg.io.orientation import CTICH_ORIENTATION
from ichseg.specs import InputSpec

Mode = Literal["windowed", "full_slice"]
Split = Literal["train", "val", "test"]
#: Earlier constructor keywords and their new names (accepted for one release, with a warning).
RENAMED_OPTIONS: dict[str, str] = {
    "window": "tile_size",
    "stride": "tile_stride",
    "undersampling": "sampling",
    "val_windows": "val_tiles",
}


def renamed_option(old: str, old_value: Any, new_value: Any) -> Any:
    """The value of an option that was renamed: ``old_value`` (with a FutureWarning naming the new
    key) when the earlier keyword ``old`` was given, else ``new_value``."""
    if old_value is None:
        return new_value
    new = RENAMED_OPTIONS[old]
    warnings.warn(
        f"the data option {old!r} is now {new!r}; {old!r} is accepted for one more release",
        FutureWarning,
        stacklevel=3,
    )
    return old_value


def check_options(
    mode: str,
    sampling: str,
    context_slices: Any,
    batch_size: int,
    foreground_fraction: float,
    batches_per_epoch: int | None,
    val_tiles: str,
    train_slices: str,
    num_workers: int = 0,
    val_tiles_max: int | None = None,
) -> None:
    """Raise :class:`ConfigError` for an invalid option of :class:`RoundData` (or the loaders)."""
    if mode not in ("windowed", "full_slice"):
        raise ConfigError(f"data mode must be 'windowed' or 'full_slice', not {mode!r}")
    if sampling not in SAMPLING_RULES:
        raise ConfigError(
            f"sampling (undersampling) must be one of {', '.join(SAMPLING_RULES)}, not {sampling!r}"
        )
    check_context_slices(context_slices)
    foreground_per_batch(int(batch_size), float(foreground_fraction))  # validates both
    if batches_per_epoch is not None and int(batches_per_epoch) < 1:
        raise ConfigError(f"batches_per_epoch must be positive, got {batches_per_epoch}")
    if val_tiles not in ("positive", "all"):
        raise ConfigError(f"val_tiles must be 'positive' or 'all', not {val_tiles!r}")
    if val_tiles_max is not None and (
        isinstance(val_tiles_max, bool)
        or not isinstance(val_tiles_max, (int, np.integer))
        or val_tiles_max < 1
    ):
        raise ConfigError(
            f"val_tiles_max must be a positive number of tiles or null (all), got {val_tiles_max!r}"
        )
    if train_slices not in ("ich", "all"):
        raise ConfigError(f"train_slices must be 'ich' or 'all', not {train_slices!r}")
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(
            "batch_size must be positive and num_workers non-negative, "
            f"got {batch_size} and {num_workers}"
        )


class RoundData:
    """CT-ICH, one cross-validation round, as datasets and samplers (no Lightning).

    The options are :class:`ichseg.lit.datamodule.CTICHDataModule`'s (documented there), less the
    loaders' ``num_workers`` / ``pin_memory``. :meth:`setup` makes the folds, the slice store and
    the per-split rows and tile counts; :meth:`prepare` generates the phantom and fills the cache.
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
    ) -> None:
        check_options(
            mode, sampling, context_slices, batch_size, foreground_fraction, batches_per_epoch,
            val_tiles, train_slices, val_tiles_max=val_tiles_max,
        )  # fmt: skip
        if int(k) < 2 or not 0 <= int(fold) < int(k):
            raise ConfigError(
                f"fold={fold} does not exist: k={k} CV rounds are numbered 0 to {int(k) - 1}"
                if int(k) >= 2 else f"k={k}: cross-validation needs at least 2 rounds"
            )  # fmt: skip
        self.root = Path(root)
        self.fold, self.k, self.seed, self.split_seed = (
            int(fold),
            int(k),
            int(seed),
            int(split_seed),
        )
        self.splits_file = None if splits_file is None else Path(splits_file)
        self.splits_dir = None if splits_dir is None else Path(splits_dir)
        self.exclude = tuple(int(p) for p in exclude)
        self.mode = mode
        self.tile_size, self.tile_stride = int(tile_size), int(tile_stride)
        self.working_size = int(working_size)
        self.working_mode_option = working_mode
        self.channels = tuple(channels)
        self.context_slices = int(context_slices)
        self.batch_size = int(batch_size)
        self.sampling = sampling
        self.negative_ratio = float(negative_ratio)
        self.foreground_fraction = float(foreground_fraction)
        self.batches_per_epoch = None if batches_per_epoch is None else int(batches_per_epoch)
        self.val_tiles = val_tiles
        self.val_tiles_max = None if val_tiles_max is None else int(val_tiles_max)
        self.train_slices = train_slices
        self.augmentation_options = augmentation
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.phantom = PhantomSpec.coerce(phantom)
        build_augmentation(augmentation)  # fail early on a bad option
        size = self.working_size
        self.grid = (
            make_grid(size, size, size)
            if mode == "full_slice"
            else make_grid(size, self.tile_size, self.tile_stride)
        )
        self.dataset: CTICHDataset | None = None
        self.rounds: list[CVRound] | None = None
        self.cv_round: CVRound | None = None
        self.splits_path: Path | None = None
        self.store: SliceStore | None = None
        self.working_mode: str | None = None
        self._rows: dict[str, np.ndarray] = {}
        self._counts: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ earlier names

    @property
    def undersampling(self) -> str:
        """Earlier name of :attr:`sampling`."""
        return self.sampling

    @property
    def val_windows(self) -> str:
        """Earlier name of :attr:`val_tiles`."""
        return self.val_tiles

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
        """How these data prepare slices for the network, resolved (``working_mode="auto"`` by the
        release: the dataset's, or the phantom's before it is generated); checkpoints store it."""
        if self.dataset is None and self.phantom is not None and not self.root.exists():
            release = self.phantom.release
            check_channels(self.channels, release)
            working_mode = working_mode_for(release, self.working_mode_option)
            orientation = CTICH_ORIENTATION if release == "nifti" else None  # the phantom's
        else:
            orientation = self._open_dataset().orientation()
            working_mode = self.working_mode or "resize"
        return InputSpec(
            mode=self.mode,
            tile_size=self.tile_size,
            tile_stride=self.tile_stride,
            working_size=self.working_size,
            working_mode=working_mode,
            channels=self.channels,
            context_slices=self.context_slices,
            orientation=orientation,
        )

    def prepare(self) -> None:
        """Generate the phantom (if one is configured and absent) and build the on-disk slice
        cache once; for one process before the others :meth:`setup` (Lightning's prepare_data)."""
        ensure_phantom(self.root, self.phantom)
        if self.cache_dir is not None:
            self._setup_splits()
            self._setup_store()

    def setup(self, stage: str | None = None) -> None:
        """Folds, the slice store and the per-split rows and tile counts (idempotent)."""
        self._setup_splits()
        self._setup_store()
        if not self._rows:
            assert self.cv_round is not None and self.store is not None
            for split in ("train", "val", "test"):
                rows = self.store.rows_of_patients(self.cv_round.patients(split))
                self._rows[split] = rows
                self._counts[split] = store_tile_counts(self.store, rows, self.grid)
        if stage == "fit":
            self._require_validation_ich()

    def _require_validation_ich(self) -> None:
        """Training picks its best checkpoint on validation ICH: refuse a round without any."""
        assert self.cv_round is not None
        dataset = self._open_dataset()
        has_ich = dict(
            zip(dataset.patient_ids, dataset.patient_labels()[:, 0].tolist(), strict=True)
        )
        val = list(self.cv_round.patients("val"))
        if not any(has_ich.get(p, False) for p in val):
            raise ConfigError(
                f"data.fold={self.fold}: none of the {len(val)} validation patients of this CV "
                f"round has ICH ({sum(has_ich.values())} of the {len(has_ich)} patients do), so no "
                "best checkpoint can be chosen; use another split (data.splits_file, data.k, "
                "data.split_seed) or more patients"
            )

    def _open_dataset(self) -> CTICHDataset:
        if self.dataset is None:
            ensure_phantom(self.root, self.phantom)  # a no-op once prepare() has run
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
                f"fold={self.fold} does not exist: there are {len(rounds)} CV rounds{where}"
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

    def tile_counts(self, split: Split) -> np.ndarray:
        """``(slices, G)`` ICH pixels per tile of a split's slices (rows as :meth:`rows`)."""
        self._require_setup()
        return self._counts[split]

    #: Earlier name of :meth:`tile_counts`, kept for one release.
    window_counts = tile_counts

    def _require_setup(self) -> None:
        if not self._rows:
            raise ConfigError("call setup() on the data module before using its splits")

    def _all_tile_ids(self, rows: np.ndarray) -> np.ndarray:
        """Flat store ids of every tile of ``rows``, row-major."""
        g = len(self.grid)
        return (rows[:, None] * g + np.arange(g)[None, :]).reshape(-1)

    def _no_training_data(self, what: str) -> DatasetError:
        message = f"{self.root}: the training patients of round {self.fold} have no {what}"
        return DatasetError(message, self.root)

    def train_dataset(self) -> tuple[TileDataset, Sampler[int]]:
        """The training dataset and its sampler (undersampled or oversampled tiles, or shuffled
        slices); the sampler's epoch drives the dataset's augmentation
        (:meth:`TileDataset.set_epoch`), so both are functions of ``(seed, epoch)``."""
        dataset, sampler = self._train_dataset()
        sampler.epoch_listener = dataset.set_epoch
        return dataset, sampler

    def _train_dataset(self) -> tuple[TileDataset, EpochSampler]:
        rows, counts = self.rows("train"), self.tile_counts("train")
        augmentation = build_augmentation(self.augmentation_options)
        k = self.context_slices
        if self.sampling == "oversample":
            if not np.any(counts > 0):
                raise self._no_training_data("ICH to oversample")
            dataset = TileDataset(
                self.store, self.grid, self._all_tile_ids(rows), augmentation,
                whole_slices=self.is_full_slice, seed=self.seed, context_slices=k,
            )  # fmt: skip
            sampler = OversampledTileSampler(
                counts, self.batch_size, self.foreground_fraction, self.seed,
                self.batches_per_epoch,
            )  # fmt: skip
            return dataset, sampler
        if self.is_full_slice:
            chosen = rows if self.train_slices == "all" else rows[counts[:, 0] > 0]
            if chosen.size == 0:
                raise self._no_training_data("ICH slice")
            dataset = TileDataset(
                self.store, self.grid, chosen, augmentation, whole_slices=True, seed=self.seed,
                context_slices=k,
            )  # fmt: skip
            return dataset, ShuffledSampler(len(dataset), self.seed)
        dataset = TileDataset(
            self.store, self.grid, self._all_tile_ids(rows), augmentation, seed=self.seed,
            context_slices=k,
        )  # fmt: skip
        sampler = UndersampledTileSampler(
            counts, self.store.patients[rows], self.sampling, self.negative_ratio, self.seed
        )
        if len(sampler) == 0:
            raise DatasetError(f"{self.root}: no training tiles in round {self.fold}", self.root)
        return dataset, sampler

    def eval_dataset(
        self, split: Split, which: Literal["positive", "all"] | None = None
    ) -> TileDataset:
        """Tiles (or slices) of val / test patients, in slice-major order, without augmentation.

        ``which``: ``"positive"`` or ``"all"`` (default: ``val_tiles`` for val, capped at
        ``val_tiles_max`` by a fixed seeded sample, and ``"all"`` for test).
        """
        limit = None
        if split == "val" and which is None:
            which, limit = self.val_tiles, self.val_tiles_max
        which = which or "all"
        rows, counts = self.rows(split), self.tile_counts(split)
        tiles = validation_tiles(counts, which, limit, self.seed)
        ids = rows[tiles[:, 0]] * len(self.grid) + tiles[:, 1]
        return TileDataset(
            self.store, self.grid, ids, None, whole_slices=self.is_full_slice,
            context_slices=self.context_slices,
        )  # fmt: skip

    # ------------------------------------------------------------------ evaluation view

    def eval_scans(
        self, split: Split = "test", patients: Sequence[int] | None = None
    ) -> Iterator[EvalScan]:
        """Every patient of ``split`` (or only ``patients`` of it, in that order, e.g. one DDP
        rank's share): working-size slices, original-resolution mask, labels.

        Everything comes from the slice store (built once with it): no file is read.
        """
        self._require_setup()
        assert self.cv_round is not None and self.store is not None
        members = self.cv_round.patients(split)
        if patients is not None:
            outside = sorted(set(int(p) for p in patients) - set(members))
            if outside:
                raise ConfigError(
                    f"patients {outside} are not in the {split} split of round {self.fold}"
                )
            members = [int(p) for p in patients]
        working_mode = self.working_mode or "resize"
        for patient in members:
            yield EvalScan.from_store(self.store, patient, working_mode)
