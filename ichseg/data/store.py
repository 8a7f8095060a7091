"""The slice store: a CV round's slices, windowed and at working size, in one contiguous array.

Besides the working-size images and (bit-packed) masks it keeps, per patient, what stitched
evaluation needs from the original scan: its original-grid mask (bit-packed), slice labels,
spacing, affine, demographics, release and source file, so that evaluation reads no file again.
With a cache folder the arrays are written once as ``.npy`` and memory-mapped
(docs/data-pipeline.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.data.ctich import CTICHDataset, Demographics, Scan, SliceLabels
from ichseg.data.tiles import TileGrid, pack_masks, tile_positive_counts, unpack_masks
from ichseg.data.tiles import context_rows as clamped_context_rows
from ichseg.data.windowing import WINDOWS, to_working_size
from ichseg.errors import ConfigError, DatasetError
from ichseg.utils.atomic import make_temp_dir

#: Bump when the cache layout or its content changes (2: the original-grid masks and scan records).
CACHE_VERSION = 2
JPG_CHANNELS: tuple[str, ...] = ("brain", "bone")
WORKING_MODES: dict[str, str] = {"nifti": "resize", "jpg": "crop"}
#: Columns of the per-slice label array: the five subtypes, no hemorrhage, fracture.
LABEL_COLUMNS = 7
RECORDS_FILE = "scans.json"


@dataclass(frozen=True)
class ScanRecord:
    """One patient's scan facts kept in the store for evaluation (its mask and labels are arrays
    of the store): original mask shape (H, W, N), spacing, affine, demographics, release, source."""

    mask_shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    affine: np.ndarray | None
    demographics: Demographics | None
    release: str
    source: Path | None  # the CT's NIfTI file (None for the JPG release)

    @classmethod
    def of_scan(cls, scan: Scan) -> ScanRecord:
        """The record of a decoded scan."""
        return cls(
            mask_shape=tuple(int(n) for n in scan.mask.shape),  # type: ignore[arg-type]
            spacing=scan.spacing,
            affine=scan.affine,
            demographics=scan.demographics,
            release=scan.release,
            source=scan.paths.get("image") if scan.release == "nifti" else None,
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (floats round-trip exactly)."""
        demographics = self.demographics
        return {
            "mask_shape": list(self.mask_shape),
            "spacing": None if self.spacing is None else list(self.spacing),
            "affine": None if self.affine is None else np.asarray(self.affine).tolist(),
            "demographics": None if demographics is None else asdict(demographics),
            "release": self.release,
            "source": None if self.source is None else str(self.source),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScanRecord:
        """Inverse of :meth:`to_json`."""
        spacing, affine, demographics = data["spacing"], data["affine"], data["demographics"]
        return cls(
            mask_shape=tuple(int(n) for n in data["mask_shape"]),  # type: ignore[arg-type]
            spacing=None if spacing is None else tuple(float(z) for z in spacing),  # type: ignore[arg-type]
            affine=None if affine is None else np.asarray(affine, dtype=np.float64),
            demographics=None if demographics is None else Demographics(**demographics),
            release=str(data["release"]),
            source=None if data["source"] is None else Path(data["source"]),
        )


class SliceStore:
    """Windowed working-size slices of a set of patients, held contiguously.

    ``images`` (S, C, H, W) uint8; ``masks`` (S, H, ceil(W / 8)) uint8, the bool masks packed as
    bits along rows (:meth:`mask_slices` unpacks, :func:`~ichseg.data.tiles.crop_packed_tiles`
    crops; 8x less memory than bool); ``patients`` and ``slice_numbers`` (S,) int32;
    ``positive_pixels`` (S,) int64 mask pixels per slice. Each patient's slices are consecutive
    rows (:meth:`rows_of`). For evaluation: ``slice_labels`` (S, 7) bool, ``original_masks`` every
    patient's original-grid mask bit-packed and concatenated (patients ascending, byte offsets in
    ``original_offsets``), and one :class:`ScanRecord` per patient (:meth:`original_mask`,
    :meth:`labels_of`, :meth:`record`). Arrays may be memory-mapped from ``directory``; such a
    store pickles as its path, so spawned workers map the same files instead of copying them.
    """

    ARRAYS = (
        "images",
        "masks",
        "patients",
        "slice_numbers",
        "positive_pixels",
        "slice_labels",
        "original_masks",
        "original_offsets",
    )

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        patients: np.ndarray,
        slice_numbers: np.ndarray,
        positive_pixels: np.ndarray,
        slice_labels: np.ndarray | None = None,
        original_masks: np.ndarray | None = None,
        original_offsets: np.ndarray | None = None,
        records: dict[int, ScanRecord] | None = None,
        directory: Path | None = None,
    ) -> None:
        self.images = images
        self.masks = masks
        self.patients = patients
        self.slice_numbers = slice_numbers
        self.positive_pixels = positive_pixels
        self.slice_labels = slice_labels
        self.original_masks = original_masks
        self.original_offsets = original_offsets
        self.records = {} if records is None else dict(records)
        self.directory = directory
        self._index_patients()

    def _index_patients(self) -> None:
        ids, first, counts = np.unique(self.patients, return_index=True, return_counts=True)
        self._rows = {
            int(p): slice(int(f), int(f + c)) for p, f, c in zip(ids, first, counts, strict=True)
        }
        self._order = {int(p): i for i, p in enumerate(ids)}
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

    # ------------------------------------------------------------------ evaluation view

    def record(self, patient_id: int) -> ScanRecord:
        """The :class:`ScanRecord` of one patient."""
        self.rows_of(patient_id)  # a clear error for a patient outside the store
        if int(patient_id) not in self.records:
            raise ConfigError("this slice store holds no scan records (build it anew)")
        return self.records[int(patient_id)]

    def original_mask(self, patient_id: int) -> np.ndarray:
        """The patient's mask on the original grid, (H, W, N) bool, unpacked from the store."""
        shape = self.record(patient_id).mask_shape
        assert self.original_masks is not None and self.original_offsets is not None
        index = self._order[int(patient_id)]
        start, stop = int(self.original_offsets[index]), int(self.original_offsets[index + 1])
        bits = np.unpackbits(self.original_masks[start:stop], count=int(np.prod(shape)))
        return bits.view(np.bool_).reshape(shape)

    def labels_of(self, patient_id: int) -> SliceLabels:
        """The patient's per-slice labels (the label CSV's), from the store."""
        if self.slice_labels is None:
            raise ConfigError("this slice store holds no slice labels (build it anew)")
        flags = np.array(self.slice_labels[self.rows_of(patient_id)], dtype=bool)
        return SliceLabels(
            subtypes=flags[:, :5].copy(),
            no_hemorrhage=flags[:, 5].copy(),
            fracture=flags[:, 6].copy(),
        )

    # ------------------------------------------------------------------ files and pickling

    @classmethod
    def open(cls, directory: Path) -> SliceStore:
        """Memory-map a cached store (read-only)."""
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in cls.ARRAYS}
        records = json.loads((directory / RECORDS_FILE).read_text())
        loaded = {int(p): ScanRecord.from_json(r) for p, r in records.items()}
        return cls(**arrays, records=loaded, directory=directory)

    def __getstate__(self) -> dict[str, Any]:
        if self.directory is not None:
            return {"directory": self.directory}
        arrays = {name: getattr(self, name) for name in self.ARRAYS}
        return arrays | {"records": self.records, "directory": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("directory") is not None:
            opened = SliceStore.open(Path(state["directory"]))
            self.__dict__.update(opened.__dict__)
            return
        for name in self.ARRAYS:
            setattr(self, name, state[name])
        self.records = state["records"]
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
    key = cache_key(dataset, patients, channels, size, working_mode)
    final = cache_dir / f"slices-{dataset.release}-{key}"
    if (final / "meta.json").is_file():
        try:
            return SliceStore.open(final)
        except (OSError, ValueError, KeyError) as err:
            raise DatasetError(
                f"{final}: slice cache is unreadable ({err}); delete the folder to rebuild it",
                final,
            ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = make_temp_dir(cache_dir, prefix=f".{final.name}.")
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


def _allocate(
    shapes: dict[str, tuple[tuple[int, ...], Any]], directory: Path | None
) -> dict[str, np.ndarray]:
    """Empty arrays of ``shapes``: in memory, or ``.npy`` files in ``directory`` (memory-mapped)."""
    if directory is None:
        return {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}
    return {
        name: np.lib.format.open_memmap(
            directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape
        )
        for name, (shape, dtype) in shapes.items()
    }


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
    arrays = _allocate(
        {
            "images": ((total, len(channels), size, size), np.uint8),
            "masks": ((total, size, (size + 7) // 8), np.uint8),
            "patients": ((total,), np.int32),
            "slice_numbers": ((total,), np.int32),
            "positive_pixels": ((total,), np.int64),
            "slice_labels": ((total, LABEL_COLUMNS), np.bool_),
        },
        directory,
    )
    originals: list[np.ndarray] = []
    records: dict[int, ScanRecord] = {}
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
        labels = scan.labels
        arrays["slice_labels"][rows] = np.column_stack(
            [labels.subtypes, labels.no_hemorrhage, labels.fracture]
        )
        originals.append(np.packbits(np.asarray(scan.mask, dtype=bool).reshape(-1)))
        records[patient] = ScanRecord.of_scan(scan)
        start += n_slices
        del scan, images, masks
    arrays |= _pack_originals(originals, directory)
    if directory is not None:
        for array in arrays.values():
            array.flush()
        records_json = {str(p): r.to_json() for p, r in records.items()}
        (directory / RECORDS_FILE).write_text(json.dumps(records_json) + "\n")
    return SliceStore(**arrays, records=records, directory=directory)


def _pack_originals(parts: list[np.ndarray], directory: Path | None) -> dict[str, np.ndarray]:
    """The packed original masks concatenated (``original_masks``) and their byte offsets."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([part.size for part in parts])
    arrays = _allocate(
        {
            "original_masks": ((int(offsets[-1]),), np.uint8),
            "original_offsets": ((offsets.size,), np.int64),
        },
        directory,
    )
    for index, part in enumerate(parts):
        arrays["original_masks"][offsets[index] : offsets[index + 1]] = part
    arrays["original_offsets"][:] = offsets
    return arrays


def store_tile_counts(
    store: SliceStore, rows: np.ndarray, grid: TileGrid, chunk: int = 64
) -> np.ndarray:
    """``(len(rows), G)`` ICH pixels per tile of the given store rows (empty slices skipped)."""
    counts = np.zeros((rows.size, len(grid)), dtype=np.int32)
    positive = np.flatnonzero(store.positive_pixels[rows] > 0)
    for start in range(0, positive.size, chunk):
        block = positive[start : start + chunk]
        counts[block] = tile_positive_counts(store.mask_slices(rows[block]), grid)
    return counts


#: Earlier name of :func:`store_tile_counts`, kept for one release.
store_window_counts = store_tile_counts
