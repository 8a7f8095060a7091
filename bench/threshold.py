"""Benchmark: the threshold baseline's exact grid search against the naive one.

Generates a full-size phantom NIfTI release (75 patients of 512x512; ``--small``: 12 patients of
16 slices of 256x256) in a temporary folder, unless ``--root`` points at a release, takes the
training patients of CV round 0 (``ichseg.data.folds`` through the DataModule, patient 70 excluded
as in the paper), windowed to uint8 brain at working size 640 in the DataModule's slice store, and
times, on one core:

1. the full search, 111 x 46 = 5,106 pairs, over every training slice: histograms (from the store:
   mask unpacking and ``np.bincount`` per slice) plus cumulative sums and the vectorised surface,
   for the default objective (``slice_mean``: only the ICH slices enter it) and for ``pooled``
   (every training slice). Best of ``--repeats``. Target: at most 5 s for the default objective;
2. the naive search (threshold every pixel for each pair, count, exact fractions) on a subset of
   ``--naive-pairs`` pairs over the same slices, scaled linearly to 5,106 pairs, and checks that
   the two agree on those pairs;

and prints both times and their ratio (the speed-up), and the chosen band.

    python bench/threshold.py [--small] [--root DIR] [--repeats 3] [--naive-pairs 12]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TARGET_SECONDS = 5.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, help="an existing CT-ICH release (default: generate a phantom)"
    )
    parser.add_argument(
        "--small", action="store_true", help="a small phantom (12 patients, 256x256)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast search")
    parser.add_argument(
        "--naive-pairs", type=int, default=12, help="pairs the naive search runs on"
    )
    return parser.parse_args()


def make_phantom(root: Path, small: bool) -> None:
    from ichseg.data.phantom import generate_phantom

    size = "12 patients of 16 slices, 256x256" if small else "75 patients, 512x512"
    print(f"generating the phantom ({size}) ...", flush=True)
    start = time.perf_counter()
    if small:
        generate_phantom(root, "nifti", n_patients=12, n_slices=16, size=256, seed=0)
    else:
        generate_phantom(root, "nifti", seed=0)
    print(f"  {time.perf_counter() - start:.0f} s")


def time_fast(store, rows: np.ndarray, repeats: int, n_pairs: int) -> dict:
    """Best-of-``repeats`` seconds and the search of each objective."""
    from ichseg.baselines.threshold import search_thresholds, store_histograms

    def fast(objective: str):
        histograms = store_histograms(store, rows, ich_only=objective == "slice_mean")
        return search_thresholds(histograms, objective=objective)

    timings = {}
    for objective in ("slice_mean", "pooled"):
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            search = fast(objective)
            best = min(best, time.perf_counter() - start)
        timings[objective] = (best, search)
        print(
            f"fast search ({objective}): {n_pairs} pairs in {best:.2f} s -> band "
            f"{search.lower}..{search.upper}, training Jaccard {search.value:.4f}"
        )
    return timings


def compare_naive(store, rows: np.ndarray, timings: dict, naive_pairs: int, n_pairs: int) -> None:
    """The naive search on a subset of pairs around the fast optimum, the same slices, scaled
    to all pairs; exits when the two disagree."""
    from ichseg.baselines.threshold import (
        UPPER_RANGE,
        naive_threshold_search,
        objective_surface,
        search_thresholds,
        store_histograms,
    )

    fast_seconds, chosen = timings["slice_mean"]
    ich_rows = rows[np.asarray(store.positive_pixels)[rows] > 0]
    images = np.asarray(store.images[ich_rows, 0])
    masks = store.mask_slices(ich_rows)
    n_upper = max(1, min(naive_pairs, UPPER_RANGE[1] - UPPER_RANGE[0] + 1))
    upper_first = min(
        max(chosen.upper - n_upper // 2, UPPER_RANGE[0]), UPPER_RANGE[1] - n_upper + 1
    )
    lower_range = (chosen.lower, chosen.lower)
    upper_range = (upper_first, upper_first + n_upper - 1)
    start = time.perf_counter()
    naive = naive_threshold_search(images, masks, lower_range, upper_range, "slice_mean")
    naive_seconds = time.perf_counter() - start
    naive_all = naive_seconds / n_upper * n_pairs
    histograms = store_histograms(store, rows, ich_only=True)
    same = np.allclose(
        objective_surface(histograms, lower_range, upper_range, "slice_mean"),
        naive.surface,
        rtol=1e-12,
        atol=0,
    ) and (naive.lower, naive.upper, naive.value) == (
        search_thresholds(histograms, lower_range, upper_range).lower,
        search_thresholds(histograms, lower_range, upper_range).upper,
        search_thresholds(histograms, lower_range, upper_range).value,
    )
    print(
        f"naive search (slice_mean): {n_upper} pairs over the same {len(ich_rows)} ICH slices "
        f"in {naive_seconds:.2f} s -> {naive_all:.0f} s for {n_pairs} pairs (scaled linearly); "
        f"agrees with the fast search on those pairs: {same}"
    )
    print(
        f"speed-up: {naive_all:.0f} s / {fast_seconds:.2f} s = "
        f"{naive_all / fast_seconds:,.0f}x "
        f"(target: fast search <= {TARGET_SECONDS:.0f} s: "
        f"{'met' if fast_seconds <= TARGET_SECONDS else 'NOT met'})"
    )
    if not same:
        raise SystemExit("the fast and naive searches disagree")


def main() -> None:
    args = parse_args()

    import torch

    torch.set_num_threads(1)
    from ichseg.baselines.threshold import LOWER_RANGE, UPPER_RANGE
    from ichseg.data.datamodule import CTICHDataModule

    temporary = None
    root = args.root
    if root is None:
        temporary = Path(tempfile.mkdtemp(prefix="ichseg-bench-threshold-"))
        root = temporary / "ct-ich"
        make_phantom(root, args.small)
    try:
        module = CTICHDataModule(root, fold=0, working_size=640, mode="full_slice")
        start = time.perf_counter()
        module.setup("fit")
        store, rows = module.store, module.rows("train")
        n_ich = int((np.asarray(store.positive_pixels)[rows] > 0).sum())
        print(
            f"round 0: {len(module.cv_round.train)} training patients, {rows.size} slices "
            f"({n_ich} with ICH) of 640x640; store built in {time.perf_counter() - start:.0f} s"
        )
        n_pairs = (LOWER_RANGE[1] - LOWER_RANGE[0] + 1) * (UPPER_RANGE[1] - UPPER_RANGE[0] + 1)
        timings = time_fast(store, rows, args.repeats, n_pairs)
        compare_naive(store, rows, timings, args.naive_pairs, n_pairs)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
