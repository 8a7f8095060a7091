"""Benchmark: the training-data pipeline (tiles, undersampling, augmentation, batches).

Generates a full-size phantom NIfTI release (75 patients, 30-40 slices of 512x512; ``--small``: 12
patients of 16 slices) in a temporary folder, unless ``--root`` points at a release, and prints:

1. augmented training windows per second per core: batches of the paper's 160x160 windows built by
   the DataModule's training dataset (crop, affine augmentation, float tensors) in one process with
   one thread; per core = windows / CPU seconds, best of 5 rounds (the machine may be shared);
2. the overhead ratio: the pipeline's time per window over ``albumentations.Affine`` alone (image +
   mask, called per window as in a plain albumentations pipeline) on the same windows;
3. peak memory of the DataModule: setup (slice store of all patients at 640x640) and one training
   epoch (or ``--batches``) with 2 loader workers, in a fresh process: the largest summed PSS of the
   process and its workers (shared pages counted once), plus the peak RSS of the main process.

Targets: >= 3000 windows/s per core, overhead <= 1.3, peak memory <= 3 GB.

    python bench/data_throughput.py [--small] [--root DIR] [--workers 2] [--batches N] [--cache]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_WINDOWS_PER_CORE = 3000.0
TARGET_OVERHEAD = 1.3
TARGET_PEAK_GB = 3.0
GB = 1024**3


# --------------------------------------------------------------------------- memory (child process)


def _pss_bytes(pid: int) -> int:
    """Proportional set size of a process from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    return found


class PeakMemory:
    """Samples the summed PSS of this process and its children in a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = _pss_bytes(me) + sum(_pss_bytes(child) for child in _children(me))
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_child(args: argparse.Namespace) -> None:
    """Set up the DataModule and iterate training batches with workers; print JSON measurements."""
    import gc

    from ichseg.lit.datamodule import CTICHDataModule

    with PeakMemory() as monitor:
        start = time.perf_counter()
        module = CTICHDataModule(
            args.root,
            fold=0,
            num_workers=args.workers,
            batch_size=32,
            augmentation={},
            exclude=(),
            cache_dir=args.cache_dir,
        )
        module.setup("fit")
        setup_seconds = time.perf_counter() - start
        loader = module.train_dataloader()
        start = time.perf_counter()
        windows = 0
        for index, batch in enumerate(loader):
            windows += int(batch["image"].shape[0])
            if args.batches and index + 1 >= args.batches:
                break
        iterate_seconds = time.perf_counter() - start
        store_bytes = module.store.images.nbytes + module.store.masks.nbytes
        slices = len(module.store)
        del batch, loader
        gc.collect()
    print(
        json.dumps(
            {
                "setup_seconds": setup_seconds,
                "iterate_seconds": iterate_seconds,
                "windows": windows,
                "slices": slices,
                "store_bytes": store_bytes,
                "peak_pss_bytes": monitor.peak,
                "main_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


# ------------------------------------------------------------------ throughput (this process)


def throughput(root: Path, seconds: float) -> dict[str, float]:
    """Windows/s per core of the training dataset, and of ``Affine`` alone on the same windows."""
    import cv2
    import numpy as np
    import torch

    from ichseg.data.tiles import crop_packed_tiles, crop_tiles
    from ichseg.lit.datamodule import CTICHDataModule

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    module = CTICHDataModule(root, fold=0, augmentation={}, exclude=(), batch_size=32)
    module.setup("fit")
    dataset, sampler = module.train_dataset()
    order = sampler.epoch_indices(0)
    batches = [order[i : i + 32].tolist() for i in range(0, len(order) - 31, 32)]

    def pipeline(batch: list[int]) -> None:
        dataset.__getitems__(batch)

    windows_of = {i: dataset.tiles(b) for i, b in enumerate(batches)}
    images = {
        i: np.ascontiguousarray(
            crop_tiles(dataset.store.images, w, dataset.grid).transpose(0, 2, 3, 1)
        )
        for i, w in windows_of.items()
    }
    masks = {
        i: crop_packed_tiles(dataset.store.masks, w, dataset.grid) for i, w in windows_of.items()
    }
    affine = dataset.augmentation.transform

    def affine_alone(i: int) -> None:
        for image, mask in zip(images[i], masks[i], strict=True):
            affine(image=image, mask=mask)

    def measure(step, keys) -> tuple[float, float]:
        """Best of 5 timed rounds (CPU time and wall time): the machine may be shared."""
        best_cpu = best_wall = 0.0
        for _ in range(5):
            done, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - wall0 < seconds / 5:
                for key in keys:
                    step(key)
                    done += 32
                    if time.perf_counter() - wall0 >= seconds / 5:
                        break
            cpu = max(time.process_time() - cpu0, 1e-9)
            best_cpu = max(best_cpu, done / cpu)
            best_wall = max(best_wall, done / (time.perf_counter() - wall0))
        return best_cpu, best_wall

    pipeline(batches[0])  # warm up
    ours_cpu, ours_wall = measure(pipeline, batches)
    alone_cpu, alone_wall = measure(affine_alone, list(windows_of))
    return {
        "pipeline_per_core": ours_cpu,
        "pipeline_wall": ours_wall,
        "affine_per_core": alone_cpu,
        "affine_wall": alone_wall,
        "overhead": alone_cpu / ours_cpu,
        "epoch_windows": float(len(order)),
    }


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run on a 12-patient phantom")
    parser.add_argument("--root", type=Path, help="an existing CT-ICH release instead of a phantom")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the memory run")
    parser.add_argument(
        "--batches", type=int, default=0, help="batches in the memory run (0: one epoch)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="time per throughput measurement"
    )
    parser.add_argument(
        "--cache", action="store_true", help="memory-map the slice store from a disk cache"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated phantom")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def make_phantom(folder: Path, small: bool) -> Path:
    """Generate the benchmark's NIfTI phantom into ``folder``; its root."""
    from ichseg.data.phantom import generate_phantom

    patients, slices = (12, 16) if small else (None, (30, 40))
    start = time.perf_counter()
    manifest = generate_phantom(
        folder, release="nifti", n_patients=patients, n_slices=slices, seed=0
    )
    print(
        f"phantom: {len(manifest.patients)} patients, {manifest.n_slices} slices of "
        f"512x512 ({manifest.n_ich_slices} with ICH), generated in "
        f"{time.perf_counter() - start:.0f} s"
    )
    return manifest.root


def run_memory_child(args: argparse.Namespace, root: Path, cache_dir: Path) -> dict | None:
    """The memory measurements from a fresh process (None, with its output printed, on failure)."""
    command = [
        sys.executable, __file__, "--memory-child", "--root", str(root),
        "--workers", str(args.workers), "--batches", str(args.batches),
    ]  # fmt: skip
    if args.cache:
        command += ["--cache-dir", str(cache_dir)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stdout + result.stderr, file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def result_rows(speed: dict, memory: dict, workers: int) -> list[tuple[str, str, str, bool | None]]:
    """(measurement, value, target, met) rows of the report."""
    return [
        (
            "augmented tiles/s per core (pipeline)",
            f"{speed['pipeline_per_core']:.0f}",
            f">= {TARGET_WINDOWS_PER_CORE:.0f}",
            speed["pipeline_per_core"] >= TARGET_WINDOWS_PER_CORE,
        ),
        (
            "albumentations Affine alone, tiles/s per core",
            f"{speed['affine_per_core']:.0f}",
            "",
            None,
        ),
        (
            "overhead ratio (pipeline / Affine alone, time per tile)",
            f"{speed['overhead']:.2f}",
            f"<= {TARGET_OVERHEAD}",
            speed["overhead"] <= TARGET_OVERHEAD,
        ),
        (
            f"peak memory, setup + {memory['windows']} tiles, {workers} workers (PSS sum)",
            f"{memory['peak_pss_bytes'] / GB:.2f} GB",
            f"<= {TARGET_PEAK_GB:.0f} GB",
            memory["peak_pss_bytes"] <= TARGET_PEAK_GB * GB,
        ),
        ("  main process peak RSS", f"{memory['main_peak_rss_bytes'] / GB:.2f} GB", "", None),
        (
            f"  slice store: {memory['slices']} slices at 640x640 (images + masks)",
            f"{memory['store_bytes'] / GB:.2f} GB",
            "",
            None,
        ),
        ("  DataModule setup time", f"{memory['setup_seconds']:.1f} s", "", None),
        (
            "  loader: tiles/s with workers (wall)",
            f"{memory['windows'] / max(memory['iterate_seconds'], 1e-9):.0f}",
            "",
            None,
        ),
    ]


def main() -> int:
    args = parse_args()
    if args.memory_child:
        memory_child(args)
        return 0
    temporary = Path(tempfile.mkdtemp(prefix="ichseg-bench-"))
    try:
        root = (
            args.root if args.root is not None else make_phantom(temporary / "phantom", args.small)
        )
        seconds = args.seconds if args.seconds is not None else (2.0 if args.small else 5.0)
        memory = run_memory_child(args, root, temporary / "cache")
        if memory is None:
            return 1
        rows = result_rows(throughput(root, seconds), memory, args.workers)
        width = max(len(r[0]) for r in rows)
        print(f"{'measurement'.ljust(width)}  {'value':>10}  {'target':>9}")
        for name, value, target, ok in rows:
            verdict = "" if ok is None else ("  ok" if ok else "  MISSED")
            print(f"{name.ljust(width)}  {value:>10}  {target:>9}{verdict}")
        return 0
    finally:
        if args.keep:
            print(f"phantom and cache kept in {temporary}")
        else:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
