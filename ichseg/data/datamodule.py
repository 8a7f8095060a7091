"""Earlier home of the DataModule and its parts, kept as an alias for one release.

The DataModule is :class:`ichseg.lit.datamodule.CTICHDataModule` (this alias imports Lightning, so
the package ``ichseg.data`` does not import it); the slice store is :mod:`ichseg.data.store`, the
samplers :mod:`ichseg.data.sampling`, the datasets :mod:`ichseg.data.dataset`.
"""

from ichseg.data.dataset import EvalScan, TileDataset, WindowDataset, collate_batch
from ichseg.data.rounds import Mode, Split
from ichseg.data.sampling import (
    EpochSampler,
    OversampledTileSampler,
    OversampledWindowSampler,
    UndersampledTileSampler,
    UndersampledWindowSampler,
)
from ichseg.data.store import (
    CACHE_VERSION,
    JPG_CHANNELS,
    WORKING_MODES,
    SliceStore,
    build_slice_store,
    cache_key,
    check_channels,
    store_tile_counts,
    store_window_counts,
    working_mode_for,
)
from ichseg.lit.datamodule import CTICHDataModule

__all__ = [
    "CACHE_VERSION",
    "JPG_CHANNELS",
    "WORKING_MODES",
    "CTICHDataModule",
    "EpochSampler",
    "EvalScan",
    "Mode",
    "OversampledTileSampler",
    "OversampledWindowSampler",
    "SliceStore",
    "Split",
    "TileDataset",
    "UndersampledTileSampler",
    "UndersampledWindowSampler",
    "WindowDataset",
    "build_slice_store",
    "cache_key",
    "check_channels",
    "collate_batch",
    "store_tile_counts",
    "store_window_counts",
    "working_mode_for",
]
