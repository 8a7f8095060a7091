"""Patient-grouped stratified folds and splits.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ichseg.data.folds import (
    CVRound,
    assign_folds,
    check_splits_cover,
    load_splits,
    make_folds,
    read_splits,
    save_splits,
)
from ichseg.errors import ConfigError, DatasetError, IchsegError


def ct_ich_like_labels(seed: int = 0, n_patients: int = 82) -> tuple[list[int], np.ndarray]:
    """Patient ids 49.. and (P, 6) labels with CT-ICH-like proportions (36 of 82 with ICH)."""
    rng = np.random.default_rng(seed)
    ids = list(range(49, 49 + n_patients))
    subtypes = np.zeros((n_patients, 5), dtype=bool)
    ich = rng.permutation(n_patients)[: round(n_patients * 36 / 82)]
    rates = np.array([0.15, 0.35, 0.12, 0.45, 0.3])
    for patient in ich:
        flags = rng.random(5) < rates
        if not flags.any():
            flags[rng.integers(5)] = True
        subtypes[patient] = flags
    labels = np.c_[subtypes.any(axis=1), subtypes]
    return ids, labels


def test_rounds_partition_patients_and_rotate_folds() -> None:
    ids, labels = ct_ich_like_labels()
    rounds = make_folds(ids, labels, k=5, seed=0)
    assert len(rounds) == 5
    eligible = set(ids) - {70}
    tested: list[int] = []
    validated: list[int] = []
    for r, cv_round in enumerate(rounds):
        assert cv_round.index == r
        train, val, test = set(cv_round.train), set(cv_round.val), set(cv_round.test)
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == eligible
        tested += cv_round.test
        validated += cv_round.val
        # val of round r is the test fold of round r + 1
        assert cv_round.val == rounds[(r + 1) % 5].test
    assert sorted(tested) == sorted(eligible)
    assert sorted(validated) == sorted(eligible)
    assert 70 not in tested


def test_stratification_balances_ich_and_subtypes() -> None:
    for seed in range(20):
        ids, labels = ct_ich_like_labels(seed)
        folds = assign_folds(labels, k=5, seed=seed)
        sizes = np.bincount(folds, minlength=5)
        assert sizes.max() - sizes.min() <= 1
        per_fold = np.stack([labels[folds == f].sum(axis=0) for f in range(5)])
        assert per_fold[:, 0].max() - per_fold[:, 0].min() <= 1, (
            f"seed {seed}: ICH counts {per_fold[:, 0]}"
        )
        spread = per_fold[:, 1:].max(axis=0) - per_fold[:, 1:].min(axis=0)
        assert spread.max() <= 2, f"seed {seed}: subtype counts\n{per_fold}"
        # the rarest subtype is spread as evenly as its count allows
        rarest = int(np.argmin(labels[:, 1:].sum(axis=0)))
        assert spread[rarest] <= 1


def test_all_ich_and_no_ich_edge_cases() -> None:
    all_ich = np.ones((7, 6), dtype=bool)
    folds = assign_folds(all_ich, k=5, seed=1)
    assert np.bincount(folds, minlength=5).max() - np.bincount(folds, minlength=5).min() <= 1
    no_ich = np.zeros((6, 6), dtype=bool)
    assert sorted(np.bincount(assign_folds(no_ich, k=3, seed=1))) == [2, 2, 2]


def test_same_seed_same_splits_different_seed_different() -> None:
    ids, labels = ct_ich_like_labels()
    assert make_folds(ids, labels, seed=3) == make_folds(ids, labels, seed=3)
    assert make_folds(ids, labels, seed=3) != make_folds(ids, labels, seed=4)


def test_exclusion_is_configurable_and_absent_ids_are_fine() -> None:
    ids, labels = ct_ich_like_labels()
    everyone = make_folds(ids, labels, exclude=())
    assert 70 in everyone[0].all_patients
    without = make_folds(ids, labels, exclude=(70, 71, 999))
    assert 70 not in without[0].all_patients and 71 not in without[0].all_patients


def test_too_few_patients_or_folds_is_a_clear_error() -> None:
    labels = np.zeros((4, 6), dtype=bool)
    with pytest.raises(ConfigError, match="4 patient"):
        make_folds([1, 2, 3, 4], labels, k=5)
    with pytest.raises(ConfigError, match="at least 3 folds"):
        make_folds([1, 2, 3, 4], labels, k=2)
    with pytest.raises(ConfigError, match="listed twice"):
        make_folds([1, 1, 3, 4], labels, k=3)


def test_splits_json_round_trip(tmp_path) -> None:
    ids, labels = ct_ich_like_labels()
    rounds = make_folds(ids, labels, k=5, seed=7)
    path = save_splits(tmp_path / "splits.json", rounds, {"seed": 7, "excluded": [70]})
    document = json.loads(path.read_text())
    assert document["version"] == 1 and document["k"] == 5 and document["seed"] == 7
    assert document["excluded"] == [70]
    assert set(document["rounds"][0]) == {"train", "val", "test"}
    assert load_splits(path) == rounds
    loaded, meta = read_splits(path)
    assert loaded == rounds and meta["seed"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name != "splits.json"]  # no temporary left over


def _write(tmp_path, document) -> str:
    path = tmp_path / "splits.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"version": 1}, "no 'rounds'"),
        ({"version": 2, "rounds": []}, "version 2"),
        ({"version": 1, "rounds": [{"train": [1], "test": [2]}]}, "no 'val'"),
        (
            {"version": 1, "rounds": [{"train": [1, 2], "val": [3], "test": [2]}]},
            "patient 2 is in both",
        ),
        (
            {"version": 1, "rounds": [{"train": [1], "val": ["a"], "test": [2]}]},
            "integer patient ids",
        ),
        ({"version": 1, "k": 5, "rounds": [{"train": [1], "val": [3], "test": [2]}]}, "k=5"),
    ],
)
def test_bad_splits_files_name_the_file(tmp_path, document, message) -> None:
    path = _write(tmp_path, document)
    with pytest.raises(IchsegError, match=message) as info:
        load_splits(path)
    assert path in str(info.value)


def test_missing_splits_file(tmp_path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_splits(tmp_path / "nope.json")


def test_check_splits_cover() -> None:
    rounds = [CVRound(0, train=(1, 2), val=(3,), test=(4,))]
    check_splits_cover(rounds, [1, 2, 3, 4])
    with pytest.raises(DatasetError, match="patient 5 of the dataset is missing"):
        check_splits_cover(rounds, [1, 2, 3, 4, 5], path="splits.json")
    with pytest.raises(
        DatasetError, match="patient 4 of round 0 of the splits is not in the dataset"
    ):
        check_splits_cover(rounds, [1, 2, 3])
