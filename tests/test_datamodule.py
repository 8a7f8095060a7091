"""The CT-ICH DataModule on small phantoms of both releases."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ichseg.data.ctich import open_dataset
from ichseg.data.folds import load_splits
from ichseg.data.phantom import generate_phantom
from ichseg.data.phantom_spec import PhantomSpec
from ichseg.data.sampling import UndersampledTileSampler
from ichseg.data.store import SliceStore
from ichseg.data.windowing import to_working_size
from ichseg.errors import ConfigError
from ichseg.lit.datamodule import CTICHDataModule

N_PATIENTS, N_SLICES = 10, 8
# Phantom in-plane sizes: NIfTI 96 is resized to 128, JPG 130 is cropped to 128 (as 512 -> 640 and
# 650 -> 640 for the real releases). Windows 32 / stride 16 give the paper's 7x7 grid on 128.
PHANTOM_SIZE = {"nifti": 96, "jpg": 130}
SMALL = {"working_size": 128, "tile_size": 32, "tile_stride": 16, "exclude": (), "batch_size": 16}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("phantoms")
    return {
        release: generate_phantom(
            base / release,
            release=release,
            n_patients=N_PATIENTS,
            n_slices=N_SLICES,
            size=size,
            seed=0,
        ).root
        for release, size in PHANTOM_SIZE.items()
    }


def make(roots, release="nifti", **kwargs) -> CTICHDataModule:
    options = {**SMALL, **kwargs}
    module = CTICHDataModule(roots[release], **options)
    module.setup("fit")
    return module


@pytest.mark.parametrize("release", ["nifti", "jpg"])
def test_training_batches_are_cuda_ready(roots, release) -> None:
    module = make(roots, release, channels=("brain", "bone"), augmentation={})
    assert module.working_mode == {"nifti": "resize", "jpg": "crop"}[release]
    batch = next(iter(module.train_dataloader()))
    image, mask = batch["image"], batch["mask"]
    assert image.shape == (16, 2, 32, 32) and image.dtype == torch.float32 and image.is_contiguous()
    assert mask.shape == (16, 1, 32, 32) and mask.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for key in ("patient", "slice", "tile"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (16,)
    assert set(batch["patient"].tolist()) <= set(module.cv_round.train)
    assert ((batch["tile"] >= 0) & (batch["tile"] < 49)).all()
    assert (batch["slice"] >= 1).all()


def test_windows_match_the_store_without_augmentation(roots) -> None:
    module = make(roots)
    store, grid = module.store, module.grid
    batch = next(iter(module.val_dataloader()))
    for i in range(len(batch["tile"])):
        row = store.rows_of(int(batch["patient"][i])).start + int(batch["slice"][i]) - 1
        r, c = grid.corners[int(batch["tile"][i])]
        expected = store.images[row, :, r : r + 32, c : c + 32] / 255.0
        np.testing.assert_allclose(batch["image"][i].numpy(), expected, atol=1e-6)
        np.testing.assert_array_equal(
            batch["mask"][i, 0].numpy(), store.mask_slices(row)[r : r + 32, c : c + 32]
        )
        assert batch["mask"][i].sum() > 0  # val windows are the positive ones (the paper)


def test_no_patient_leakage_and_splits_file(roots, tmp_path) -> None:
    module = make(roots, splits_dir=tmp_path / "run", fold=2)
    cv_round = module.cv_round
    assert not set(cv_round.train) & set(cv_round.val)
    assert not set(cv_round.train) & set(cv_round.test)
    assert not set(cv_round.val) & set(cv_round.test)
    seen = {}
    for split, loader in (
        ("train", module.train_dataloader()),
        ("val", module.val_dataloader()),
        ("test", module.test_dataloader()),
    ):
        seen[split] = set(torch.cat([b["patient"] for b in loader]).tolist())
        assert seen[split] <= set(cv_round.patients(split))
    assert seen["test"] == set(cv_round.test)  # every test slice is there
    assert load_splits(tmp_path / "run" / "splits.json")[2] == cv_round


def test_splits_file_is_reused(roots, tmp_path) -> None:
    splits = tmp_path / "splits.json"
    first = make(roots, splits_file=splits, split_seed=1)
    assert splits.exists()
    second = make(roots, splits_file=splits, split_seed=99)  # the file wins over the seed
    assert second.rounds == first.rounds
    with pytest.raises(ConfigError, match="k=3"):
        make(roots, splits_file=splits, k=3)


def test_all_positive_windows_are_trained_and_negatives_follow_the_epoch(roots) -> None:
    module = make(roots)
    dataset, sampler = module.train_dataset()
    assert isinstance(sampler, UndersampledTileSampler)
    counts = module.tile_counts("train")
    positives = set(np.flatnonzero(counts.reshape(-1) > 0).tolist())
    assert positives, "the phantom's training patients have ICH"
    epoch0 = sampler.epoch_indices(0)
    epoch1 = sampler.epoch_indices(1)
    assert positives <= set(epoch0.tolist()) and positives <= set(epoch1.tolist())
    assert len(epoch0) == len(epoch1) == len(sampler)
    assert set(epoch0.tolist()) != set(epoch1.tolist())  # negatives re-drawn
    sampler.set_epoch(1)
    assert list(sampler) == epoch1.tolist()
    # paper rule: negatives are whole ICH-free slices, at most one per training patient
    negatives = np.array(sorted(set(epoch0.tolist()) - positives))
    negative_rows = np.unique(negatives // 49)
    assert len(negatives) == 49 * len(negative_rows) <= 49 * len(module.cv_round.train)
    # and the ratio rule
    ratio = make(roots, sampling="ratio", negative_ratio=2.0)
    _, ratio_sampler = ratio.train_dataset()
    assert len(ratio_sampler) == 3 * len(positives)


def test_full_slice_mode(roots) -> None:
    module = make(roots, mode="full_slice", batch_size=4)
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 1, 128, 128)
    assert (batch["tile"] == -1).all()
    assert (batch["mask"].flatten(1).sum(dim=1) > 0).all()  # ICH slices only, by default
    ich_slices = int((module.tile_counts("train")[:, 0] > 0).sum())
    assert len(module.train_dataloader().dataset) == ich_slices
    everything = make(roots, mode="full_slice", train_slices="all")
    assert len(everything.train_dataloader().dataset) == len(everything.rows("train"))


@pytest.mark.parametrize("release", ["nifti", "jpg"])
def test_eval_scans_have_original_resolution_masks(roots, release) -> None:
    module = make(roots, release)
    reader = open_dataset(roots[release])
    scans = list(module.eval_scans("test"))
    assert [s.patient_id for s in scans] == list(module.cv_round.test)
    for scan in scans:
        original = reader.load(scan.patient_id)
        assert (
            scan.mask.shape
            == original.mask.shape
            == (PHANTOM_SIZE[release], PHANTOM_SIZE[release], N_SLICES)
        )
        np.testing.assert_array_equal(scan.mask, original.mask)
        assert scan.images.shape == (N_SLICES, 1, 128, 128) and scan.images.dtype == np.uint8
        assert scan.labels.n_slices == N_SLICES
        assert scan.working_mode == module.working_mode
        # the store holds the reader's slices at working size (JPG: cropped, NIfTI: resized)
        expected = to_working_size(original.mask_slices(), 128, scan.working_mode, is_mask=True)
        np.testing.assert_array_equal(
            module.store.mask_slices(module.store.rows_of(scan.patient_id)), expected
        )
        expected_images = to_working_size(original.windowed(("brain",)), 128, scan.working_mode)
        np.testing.assert_array_equal(scan.images, expected_images)
    if release == "nifti":
        assert scans[0].spacing is not None


def test_jpg_release_has_only_brain_and_bone(roots) -> None:
    with pytest.raises(ConfigError, match="subdural"):
        make(roots, "jpg", channels=("brain", "subdural"))
    module = make(roots, "nifti", channels=("brain", "bone", "subdural"))
    assert module.store.images.shape[1] == 3


def test_cache_is_memory_mapped_reused_and_pickled_by_path(roots, tmp_path) -> None:
    first = make(roots, cache_dir=tmp_path / "cache")
    assert isinstance(first.store.images, np.memmap)
    folders = [p for p in (tmp_path / "cache").iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")
    second = make(roots, cache_dir=tmp_path / "cache", fold=1)
    assert second.store.directory == first.store.directory
    np.testing.assert_array_equal(second.store.images, make(roots).store.images)
    copy = pickle.loads(pickle.dumps(first.store))
    assert isinstance(copy, SliceStore) and isinstance(copy.images, np.memmap)
    assert len(pickle.dumps(first.store)) < 1000


def test_workers_give_the_same_windows_as_one_process(roots) -> None:
    serial = make(roots, num_workers=0)
    parallel = make(roots, num_workers=2)
    a = torch.cat([b["tile"] + 1000 * b["slice"] for b in serial.train_dataloader()])
    b = torch.cat([b["tile"] + 1000 * b["slice"] for b in parallel.train_dataloader()])
    assert torch.equal(a, b)


def test_val_tiles_max_validates_on_the_same_sample_holding_every_ich_tile(roots) -> None:
    full = make(roots, val_tiles="all")
    capped = make(roots, val_tiles="all", val_tiles_max=60)
    every = {tuple(k) for k in _loader_keys(full.val_dataloader())}
    first, again = (_loader_keys(capped.val_dataloader()) for _ in range(2))
    assert len(every) > 60 and len(first) == 60 and first == again
    assert set(first) <= every
    positives = {k for k, has_ich in _loader_keys(full.val_dataloader(), ich=True) if has_ich}
    assert positives and positives <= set(first)
    # the test split is never capped: the stitched evaluation needs every tile
    assert len(capped.eval_dataset("test")) == len(full.eval_dataset("test"))
    with pytest.raises(ConfigError, match="val_tiles_max"):
        make(roots, val_tiles_max=0)


def _loader_keys(loader, ich: bool = False) -> list:
    """``(patient, slice, tile)`` of every item of ``loader`` (with ``has ICH`` when ``ich``)."""
    keys = []
    for batch in loader:
        columns = (batch[key].tolist() for key in ("patient", "slice", "tile"))
        triples = list(zip(*columns, strict=True))
        flags = (batch["mask"].flatten(1).amax(1) > 0).tolist()
        keys += list(zip(triples, flags, strict=True)) if ich else triples
    return keys


def test_bad_options(roots) -> None:
    with pytest.raises(ConfigError, match="rotat"):
        CTICHDataModule(roots["nifti"], augmentation={"rotat": 3})
    with pytest.raises(ConfigError, match="sampling"):
        CTICHDataModule(roots["nifti"], sampling="some")
    with pytest.raises(ConfigError, match="fold=7 does not exist"):
        make(roots, fold=7)


@pytest.mark.filterwarnings("ignore:.*validation_step.*", "ignore:.*LeafSpec.*")
def test_lightning_fit_resamples_negatives_each_epoch(roots, tmp_path) -> None:
    import pytorch_lightning as pl

    seen: dict[int, set[int]] = {}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def training_step(self, batch, _):
            ids = (batch["patient"] * 100_000 + batch["slice"] * 100 + batch["tile"]).tolist()
            seen.setdefault(self.current_epoch, set()).update(ids)
            return torch.nn.functional.binary_cross_entropy_with_logits(
                self.conv(batch["image"]), batch["mask"]
            )

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = CTICHDataModule(roots["nifti"], **SMALL, augmentation={})
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(Module(), datamodule=module)
    assert set(seen) == {0, 1}
    assert len(seen[0]) == len(seen[1]) and seen[0] != seen[1]


@pytest.mark.parametrize("release", ["nifti", "jpg"])
def test_eval_scans_read_no_file(roots, release, tmp_path, monkeypatch) -> None:
    expected = {s.patient_id: s for s in (*make(roots, release).eval_scans("val"),)}
    for cache_dir in (None, tmp_path / "cache"):
        module = make(roots, release, cache_dir=cache_dir)

        def no_reading(patient_id):
            raise AssertionError(f"evaluation read patient {patient_id} from disk")

        monkeypatch.setattr(module.dataset, "load", no_reading)
        for split in ("val", "test"):
            scans = list(module.eval_scans(split))
            assert [s.patient_id for s in scans] == list(module.cv_round.patients(split))
        for scan in module.eval_scans("val"):
            before = expected[scan.patient_id]
            np.testing.assert_array_equal(scan.mask, before.mask)
            assert scan.spacing == before.spacing and scan.release == before.release
            assert scan.source == before.source and scan.demographics == before.demographics
        monkeypatch.undo()


@pytest.mark.parametrize("release", ["nifti", "jpg"])
def test_the_store_keeps_the_scans_original_masks_labels_and_headers(roots, release) -> None:
    module = make(roots, release)
    reader = open_dataset(roots[release])
    for patient in module.store.patient_ids:
        scan = reader.load(patient)
        mask = module.store.original_mask(patient)
        assert mask.dtype == np.bool_ and mask.shape == scan.mask.shape
        np.testing.assert_array_equal(mask, scan.mask)
        labels = module.store.labels_of(patient)
        for field in ("subtypes", "no_hemorrhage", "fracture"):
            np.testing.assert_array_equal(getattr(labels, field), getattr(scan.labels, field))
        record = module.store.record(patient)
        assert record.spacing == scan.spacing and record.demographics == scan.demographics
        if scan.affine is None:
            assert record.affine is None
        else:
            np.testing.assert_array_equal(record.affine, scan.affine)


def test_a_cache_of_the_earlier_layout_is_not_reused(roots, tmp_path) -> None:
    from ichseg.data import store

    dataset = open_dataset(roots["nifti"])
    key = store.cache_key(dataset, [1, 2], ("brain",), 128, "resize")
    original = store.CACHE_VERSION
    try:
        store.CACHE_VERSION = 1
        assert store.cache_key(dataset, [1, 2], ("brain",), 128, "resize") != key
    finally:
        store.CACHE_VERSION = original
    assert original >= 2


def test_earlier_keywords_warn_and_map_to_the_tile_names(roots) -> None:
    with pytest.warns(FutureWarning) as caught:
        module = CTICHDataModule(
            roots["nifti"], working_size=128, window=32, stride=16, undersampling="ratio",
            val_windows="all", exclude=(),
        )  # fmt: skip
    messages = [str(w.message) for w in caught]
    for old, new in [("window", "tile_size"), ("stride", "tile_stride"),
                     ("undersampling", "sampling"), ("val_windows", "val_tiles")]:  # fmt: skip
        assert any(f"'{old}' is now '{new}'" in m for m in messages)
    assert (module.tile_size, module.tile_stride) == (32, 16) and len(module.grid) == 49
    assert module.sampling == module.undersampling == "ratio"
    assert module.val_tiles == module.val_windows == "all"
    assert module.hparams["tile_size"] == 32 and "window" not in module.hparams
    assert module.input_spec.tile_size == 32


def test_earlier_names_are_aliases() -> None:
    import ichseg.data
    from ichseg.data import datamodule, dataset, sampling, store

    assert ichseg.data.CTICHDataModule is datamodule.CTICHDataModule is CTICHDataModule
    assert datamodule.UndersampledWindowSampler is sampling.UndersampledTileSampler
    assert datamodule.OversampledWindowSampler is sampling.OversampledTileSampler
    assert datamodule.WindowDataset is dataset.TileDataset
    assert datamodule.store_window_counts is store.store_tile_counts
    assert CTICHDataModule.window_counts is CTICHDataModule.tile_counts


def test_prepare_data_generates_the_phantom(tmp_path) -> None:
    root = tmp_path / "phantom"
    spec = {"release": "nifti", "patients": 6, "slices": 4, "size": 64, "seed": 0}
    module = CTICHDataModule(root, k=3, exclude=(), working_size=64, tile_size=32, tile_stride=16,
                             phantom=spec)  # fmt: skip
    assert module.phantom == PhantomSpec(**spec)
    assert module.input_spec.working_mode == "resize" and not root.exists()  # nothing generated
    module.prepare_data()
    assert len(open_dataset(root).patient_ids) == 6
    module.setup("fit")
    assert len(module.store.patient_ids) == 6


def test_phantom_spec_is_validated() -> None:
    assert PhantomSpec.coerce({"slices": [3, 5]}).slice_range == (3, 5)
    assert PhantomSpec.coerce(None) is None
    for bad in ({"release": "dicom"}, {"patients": 0}, {"slices": [5, 3]}, {"sizes": 3}):
        with pytest.raises(ConfigError, match="phantom"):
            PhantomSpec.coerce(bad)


def test_a_batch_names_the_tile_position_tile_and_keeps_the_earlier_key(roots) -> None:
    batch = next(iter(make(roots).train_dataloader()))
    assert batch["tile"] is batch["window"] and batch["tile"].dtype == torch.int64
