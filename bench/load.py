"""Benchmark: read a full-size phantom NIfTI release with the ichseg reader.

Generates the phantom (75 patients, 30-40 slices of 512x512, unless ``--root`` points at an existing
release), then reads every scan in a fresh subprocess and prints the time, the subprocess's peak
memory and the ratio of that peak to the raw int16 size of all scans.

Targets: at most 30 s, peak memory at most 2x the int16 size.

    python bench/load.py [--root DIR] [--patients N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 30.0
TARGET_MEMORY_RATIO = 2.0

READER = r"""
import json, resource, sys, time
import numpy as np
from ichseg.data import open_dataset

start = time.perf_counter()
dataset = open_dataset(sys.argv[1])
voxels = ich = 0
for scan in dataset:
    voxels += scan.image.size
    ich += int(np.count_nonzero(scan.mask))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_bytes": peak, "voxels": voxels, "ich_voxels": ich,
                  "patients": len(dataset)}))
"""

BASELINE = r"""
import json, resource
import numpy as np
import nibabel, PIL.Image  # the reader's own imports, without reading anything
import ichseg.data
print(json.dumps({"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_json(code: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, help="an existing NIfTI release to read instead of a phantom"
    )
    parser.add_argument(
        "--patients", type=int, default=75, help="phantom patients (default 75, the full size)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated phantom")
    args = parser.parse_args()

    workdir = None
    root = args.root
    if root is None:
        from ichseg.data.phantom import generate_phantom

        workdir = Path(tempfile.mkdtemp(prefix="ichseg-bench-load-"))
        root = workdir / "ct-ich-phantom"
        start = time.perf_counter()
        generate_phantom(root, release="nifti", n_patients=args.patients, seed=0, progress=True)
        print(
            f"generated phantom: {args.patients} patients in "
            f"{time.perf_counter() - start:.1f} s at {root}"
        )
    try:
        baseline = run_json(BASELINE)
        result = run_json(READER, str(root))
    finally:
        if workdir is not None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    int16_bytes = result["voxels"] * 2
    peak = result["peak_bytes"]
    added = peak - baseline["peak_bytes"]
    ratio = peak / int16_bytes
    print(f"patients read            {result['patients']}")
    print(f"raw int16 size           {int16_bytes / 2**20:9.1f} MiB")
    print(
        f"read time                {result['seconds']:9.2f} s     "
        f"(target <= {TARGET_SECONDS:.0f} s)"
    )
    print(
        f"peak memory (process)    {peak / 2**20:9.1f} MiB  = {ratio:.3f} x int16 size "
        f"(target <= {TARGET_MEMORY_RATIO:.0f}x)"
    )
    print(
        f"  of which imports       {baseline['peak_bytes'] / 2**20:9.1f} MiB; "
        f"reading added {added / 2**20:.1f} MiB"
    )
    ok = result["seconds"] <= TARGET_SECONDS and ratio <= TARGET_MEMORY_RATIO
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
