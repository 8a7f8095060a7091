"""Patient-grouped, stratified K-fold cross-validation and the ``splits.json`` file that stores it.

The paper's protocol (Hssayeni et al. 2020): patients are split into K = 5 folds; CV round ``r``
tests on fold ``r``, validates on fold ``(r + 1) mod K`` and trains on the other K - 2 folds
(3/1/1).
Over the K rounds every patient is tested exactly once and validated exactly once.

Folds are stratified on the patient label vector ``[has_ich, IVH, IPH, SAH, EDH, SDH]``:

* fold sizes differ by at most one patient, and so do the numbers of ICH patients per fold;
* ICH patients are placed greedily, patients with the rarest subtype first (iterative
  stratification), each into the fold that most lacks its subtypes, so subtype counts are as even as
  the counts allow;
* patients without ICH fill the remaining places at random.

Everything random comes from one ``numpy.random.Generator`` seeded with ``seed``.

``splits.json``::

    {"version": 1, "k": 5, "seed": 0, "excluded": [70],
     "rounds": [{"train": [...], "val": [...], "test": [...]}, ...]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import ConfigError, DatasetError
from ichseg.utils.atomic import atomic_write_text

SPLITS_VERSION = 1
#: Patients the paper left out: 70 is the chronic-ICH case.
DEFAULT_EXCLUDE: tuple[int, ...] = (70,)
#: Label columns used for stratification.
STRATIFY_LABELS: tuple[str, ...] = ("has_ich", "IVH", "IPH", "SAH", "EDH", "SDH")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class CVRound:
    """One cross-validation round: patient ids of its train, validation and test parts."""

    index: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def patients(self, split: str) -> tuple[int, ...]:
        """Patient ids of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if split not in SPLIT_NAMES:
            raise ConfigError(f"split must be one of {', '.join(SPLIT_NAMES)}, not {split!r}")
        return getattr(self, split)

    @property
    def all_patients(self) -> tuple[int, ...]:
        """Every patient of the round, ascending."""
        return tuple(sorted((*self.train, *self.val, *self.test)))


# --------------------------------------------------------------------------- making folds


def assign_folds(patient_labels: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Stratified fold number (0..k-1) of each patient, from its (P, 6) bool label row.

    Column 0 is "has ICH"; a patient with any subtype counts as an ICH patient even if column 0 is
    false. See the module docstring for the guarantees.
    """
    labels = np.asarray(patient_labels, dtype=bool)
    if labels.ndim != 2 or labels.shape[1] < 1:
        raise ConfigError(
            f"patient labels must be a (patients, 6) bool array, got shape {labels.shape}"
        )
    n_patients = labels.shape[0]
    if k < 1:
        raise ConfigError(f"the number of folds must be positive, got {k}")
    if n_patients < k:
        raise ConfigError(
            f"cannot split {n_patients} patient(s) into {k} folds: need at least {k} patients"
        )
    rng = np.random.default_rng(seed)
    subtypes = labels[:, 1:]
    has_ich = labels[:, 0] | subtypes.any(axis=1)

    # Per-fold capacities: sizes differ by <= 1, ICH counts differ by <= 1, and the extra ICH
    # patients go to the larger folds so that ICH <= size always holds.
    fold_order = rng.permutation(k)
    sizes = np.full(k, n_patients // k)
    sizes[fold_order[: n_patients % k]] += 1
    n_ich = int(has_ich.sum())
    ich_capacity = np.full(k, n_ich // k)
    larger_first = np.lexsort((rng.random(k), -sizes))
    ich_capacity[larger_first[: n_ich % k]] += 1

    folds = np.full(n_patients, -1, dtype=np.int64)
    ich_patients = np.flatnonzero(has_ich)
    if ich_patients.size:
        _place_ich_patients(folds, ich_patients, subtypes, ich_capacity, rng)
    other = np.flatnonzero(~has_ich)
    free = sizes - ich_capacity
    folds[rng.permutation(other)] = np.repeat(np.arange(k), free)
    return folds


def _place_ich_patients(
    folds: np.ndarray,
    patients: np.ndarray,
    subtypes: np.ndarray,
    capacity: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Greedy iterative stratification of the ICH patients over folds with fixed capacities."""
    k = capacity.size
    patient_subtypes = subtypes[patients]
    label_totals = patient_subtypes.sum(axis=0)
    # Desired count of each subtype in each fold, proportional to the fold's ICH capacity.
    share = capacity / max(int(capacity.sum()), 1)
    desired = share[:, None] * label_totals[None, :]
    placed = np.zeros_like(desired)
    remaining = capacity.astype(np.int64).copy()

    # Rarest label first: order patients by the frequency of their rarest subtype (patients
    # without a subtype flag last), ties in random order.
    frequency = np.where(patient_subtypes, label_totals[None, :], np.iinfo(np.int64).max)
    rarest = frequency.min(axis=1)
    order = np.lexsort((rng.random(patients.size), rarest))
    rarity_rank = np.argsort(np.argsort(label_totals, kind="stable"), kind="stable")

    for position in order:
        flags = patient_subtypes[position]
        open_folds = np.flatnonzero(remaining > 0)
        deficit = desired[open_folds] - placed[open_folds]
        if flags.any():
            # Deficit of the patient's rarest label decides; then the sum over all its labels.
            rarest_label = np.flatnonzero(flags)[np.argmin(rarity_rank[flags])]
            primary = deficit[:, rarest_label]
            secondary = deficit[:, flags].sum(axis=1)
        else:
            primary = np.zeros(open_folds.size)
            secondary = np.zeros(open_folds.size)
        fill = remaining[open_folds] / capacity[open_folds].clip(min=1)
        choice = np.lexsort(
            (rng.random(open_folds.size), -fill, -secondary, -np.round(primary, 9))
        )[0]
        fold = open_folds[choice]
        folds[patients[position]] = fold
        placed[fold] += flags
        remaining[fold] -= 1
    assert (remaining == 0).all() and k == capacity.size
    _improve_by_swaps(folds, patients, patient_subtypes, desired, rng)


def _improve_by_swaps(
    folds: np.ndarray,
    patients: np.ndarray,
    patient_subtypes: np.ndarray,
    desired: np.ndarray,
    rng: np.random.Generator,
    max_passes: int = 50,
) -> None:
    """Swap ICH patients between folds while that lowers the squared distance to the desired counts.

    Swaps keep every fold's size and ICH count; the greedy pass alone can leave a common subtype
    uneven when its patients also carry rarer subtypes.
    """
    assignment = folds[patients]
    flags = patient_subtypes.astype(np.float64)
    k = desired.shape[0]
    placed = np.zeros_like(desired)
    np.add.at(placed, assignment, flags)
    for _ in range(max_passes):
        improved = False
        for i in rng.permutation(patients.size):
            error = placed - desired
            d = flags[i][None, :] - flags
            gain = 2.0 * (d * (error[assignment] - error[assignment[i]][None, :]) + d * d).sum(
                axis=1
            )
            gain[assignment == assignment[i]] = np.inf
            j = int(np.argmin(gain))
            if gain[j] < -1e-9:
                fi, fj = assignment[i], assignment[j]
                placed[fi] -= d[j]
                placed[fj] += d[j]
                assignment[i], assignment[j] = fj, fi
                improved = True
        if not improved:
            break
    folds[patients] = assignment
    assert placed.shape[0] == k


def make_folds(
    patient_ids: Sequence[int],
    patient_labels: np.ndarray,
    k: int = 5,
    seed: int = 0,
    exclude: Iterable[int] = DEFAULT_EXCLUDE,
) -> list[CVRound]:
    """Stratified patient-grouped K-fold CV rounds (test fold r, val fold r+1, train the rest).

    ``patient_labels`` is (P, 6) bool in ``patient_ids`` order: [has_ich, IVH, IPH, SAH, EDH, SDH]
    (:meth:`ichseg.data.ctich.CTICHDataset.patient_labels`). Patients in ``exclude`` are left out;
    excluded ids not present are ignored.
    """
    ids = np.asarray([int(p) for p in patient_ids], dtype=np.int64)
    labels = np.asarray(patient_labels, dtype=bool)
    if labels.ndim != 2 or labels.shape[0] != ids.size:
        raise ConfigError(
            f"patient labels have shape {labels.shape}, expected ({ids.size}, 6) "
            f"for {ids.size} patients"
        )
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ConfigError(f"patient id {int(unique[counts > 1][0])} is listed twice")
    if k < 3:
        raise ConfigError(
            f"cross-validation needs at least 3 folds (train, validation, test), got k={k}"
        )
    keep = ~np.isin(ids, np.asarray(list(exclude), dtype=np.int64))
    ids, labels = ids[keep], labels[keep]
    folds = assign_folds(labels, k=k, seed=seed)
    members = [tuple(sorted(int(p) for p in ids[folds == f])) for f in range(k)]
    return rounds_from_folds(members)


def rounds_from_folds(folds: Sequence[Sequence[int]]) -> list[CVRound]:
    """CV rounds from K folds of patient ids: round r tests fold r, validates fold (r+1) mod K."""
    k = len(folds)
    rounds = []
    for r in range(k):
        val_fold = (r + 1) % k
        train = sorted(p for f in range(k) if f not in (r, val_fold) for p in folds[f])
        rounds.append(
            CVRound(
                index=r,
                train=tuple(int(p) for p in train),
                val=tuple(sorted(int(p) for p in folds[val_fold])),
                test=tuple(sorted(int(p) for p in folds[r])),
            )
        )
    return rounds


# --------------------------------------------------------------------------- splits.json


def save_splits(
    path: str | Path, rounds: Sequence[CVRound], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``rounds`` to ``path`` as ``splits.json``, atomically; ``meta`` adds ``seed``, ...

    ``version`` and ``k`` are always written from the rounds.
    """
    path = Path(path)
    document: dict[str, Any] = {
        "version": SPLITS_VERSION,
        "k": len(rounds),
        "seed": None,
        "excluded": [],
    }
    for key, value in (meta or {}).items():
        if key not in ("version", "k", "rounds"):
            document[key] = value
    document["excluded"] = sorted(int(p) for p in document.get("excluded") or [])
    document["rounds"] = [
        {"train": list(r.train), "val": list(r.val), "test": list(r.test)} for r in rounds
    ]
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    return path


def read_splits(path: str | Path) -> tuple[list[CVRound], dict[str, Any]]:
    """Read and validate ``splits.json``: the rounds and the other top-level fields (``k``, ...)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: splits file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: splits file is not valid JSON ({err})", path) from None
    except OSError as err:
        raise DatasetError(f"{path}: splits file cannot be read ({err.strerror})", path) from None
    if not isinstance(document, dict):
        raise DatasetError(
            f"{path}: splits file must hold a JSON object with a 'rounds' list", path
        )
    version = document.get("version")
    if version != SPLITS_VERSION:
        raise DatasetError(
            f"{path}: splits file version {version!r} is not supported (expected {SPLITS_VERSION})",
            path,
        )
    raw_rounds = document.get("rounds")
    if not isinstance(raw_rounds, list) or not raw_rounds:
        raise DatasetError(f"{path}: splits file has no 'rounds' list", path)
    rounds = [_parse_round(path, index, raw) for index, raw in enumerate(raw_rounds)]
    k = document.get("k", len(rounds))
    if k != len(rounds):
        raise DatasetError(f"{path}: splits file says k={k} but holds {len(rounds)} rounds", path)
    everyone = set(rounds[0].all_patients)
    for cv_round in rounds[1:]:
        if set(cv_round.all_patients) != everyone:
            raise DatasetError(
                f"{path}: round {cv_round.index} does not hold the same patients as round 0", path
            )
    meta = {key: value for key, value in document.items() if key != "rounds"}
    return rounds, meta


def load_splits(path: str | Path) -> list[CVRound]:
    """Read and validate ``splits.json``: the CV rounds."""
    return read_splits(path)[0]


def _parse_round(path: Path, index: int, raw: Any) -> CVRound:
    if not isinstance(raw, dict):
        raise DatasetError(
            f"{path}: round {index} is not an object with train, val and test lists", path
        )
    parts: dict[str, tuple[int, ...]] = {}
    for name in SPLIT_NAMES:
        if name not in raw:
            raise DatasetError(f"{path}: round {index} has no '{name}' list", path)
        values = raw[name]
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise DatasetError(
                f"{path}: '{name}' of round {index} must be a list of integer patient ids", path
            )
        if len(set(values)) != len(values):
            raise DatasetError(f"{path}: '{name}' of round {index} lists a patient twice", path)
        parts[name] = tuple(sorted(values))
    for name in ("train", "test"):
        if not parts[name]:
            raise DatasetError(f"{path}: '{name}' of round {index} is empty", path)
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = set(parts[first]) & set(parts[second])
        if shared:
            raise DatasetError(
                f"{path}: patient {min(shared)} is in both '{first}' and '{second}' "
                f"of round {index}",
                path,
            )
    return CVRound(index=index, **parts)


def check_splits_cover(
    rounds: Sequence[CVRound], patient_ids: Iterable[int], path: str | Path | None = None
) -> None:
    """Raise :class:`DatasetError` unless the rounds hold exactly the (non-excluded) patients."""
    where = f"{path}: " if path is not None else ""
    expected = {int(p) for p in patient_ids}
    for cv_round in rounds:
        present = set(cv_round.all_patients)
        missing = sorted(expected - present)
        if missing:
            raise DatasetError(
                f"{where}patient {missing[0]} of the dataset is missing from round "
                f"{cv_round.index} of the splits"
                + (f" ({len(missing)} missing in all)" if len(missing) > 1 else ""),
                path,
            )
        unknown = sorted(present - expected)
        if unknown:
            raise DatasetError(
                f"{where}patient {unknown[0]} of round {cv_round.index} of the splits "
                "is not in the dataset"
                + (f" ({len(unknown)} unknown in all)" if len(unknown) > 1 else ""),
                path,
            )
