"""The GPU benchmark run by ``bench/gpu.sh``: one phantom, every step, one line per measurement.

Steps (each prints its lines; a step that fails prints ``FAILED`` and the run exits 1):

1. training windows/s (ichseg.train's Lightning loop and a plain PyTorch loop over the same loader,
   bench/train_loop.py) of the paper U-Net (``experiment=windowed``, base 64) and of
   ``experiment=windowed_plus``, at bf16-mixed with channels_last, windowed_plus also with
   ``torch.compile``; with the GPU idle share: the plain loop's time waiting for the next batch
   over its total time (every step ends with a synchronisation);
2. the stitched evaluation (bench/evaluate.py): seconds per scan of ``windowed_plus`` (base 64,
   random weights, bf16) and its share outside the network forward;
3. prediction (bench/predict.py's path: the checkpoint loaded as ``ichseg.predict`` loads it, then
   ``Predictor.predict_hu``, file I/O left out): seconds for a 40-slice 512x512 phantom scan with
   the paper U-Net, bf16.

``--dry-run``: the same steps at tiny sizes on the CPU (float32, no compile: those lines say they
were skipped), in about a minute, for the tests.

    python bench/gpu.py [--dry-run] [--workers 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate as evaluate_bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_loop  # noqa: E402


def sizes(dry_run: bool, workers: int) -> dict[str, object]:
    """Phantom, network and loop sizes (shared by every step, so the phantom is made once)."""
    if dry_run:
        return {
            "patients": 10, "slices": 4, "size": 128, "working_size": 128, "tile_size": 32,
            "base_filters": 4, "batch_size": 8, "epochs": 1, "batches": 3, "workers": 0,
            "device": "cpu", "precision": "32-true", "repeats": 1,
            "predict_slices": 2, "predict_size": 128, "predict_base": 4,
        }  # fmt: skip
    return {
        "patients": 15, "slices": 24, "size": 512, "working_size": None, "tile_size": None,
        "base_filters": 64, "batch_size": 32, "epochs": 3, "batches": 40, "workers": workers,
        "device": "cuda", "precision": "bf16-mixed", "repeats": 1,
        "predict_slices": 40, "predict_size": 512, "predict_base": 64,
    }  # fmt: skip


def train_args(s: dict[str, object], experiment: str, compile_: bool) -> argparse.Namespace:
    argv = [
        f"--experiment={experiment}", f"--epochs={s['epochs']}", f"--batches={s['batches']}",
        f"--base-filters={s['base_filters']}", f"--batch-size={s['batch_size']}",
        f"--patients={s['patients']}", f"--slices={s['slices']}", f"--size={s['size']}",
        f"--device={s['device']}", f"--precision={s['precision']}", f"--workers={s['workers']}",
        "--channels-last", "--skip-quiet", f"--repeats={s['repeats']}",
    ]  # fmt: skip
    if s["working_size"]:
        argv.append(f"--working-size={s['working_size']}")
    if s["tile_size"]:
        argv.append(f"--tile-size={s['tile_size']}")
    if compile_:
        argv.append("--compile")
    return train_loop.parser().parse_args(argv)


def step_train(s: dict[str, object], tmp: Path, dry_run: bool) -> None:
    runs = [("paper U-Net", "windowed", False), ("windowed_plus", "windowed_plus", False),
            ("windowed_plus compiled", "windowed_plus", True)]  # fmt: skip
    for label, experiment, compile_ in runs:
        if compile_ and dry_run:
            print(f"{label}: skipped (torch.compile is measured on CUDA only)")
            continue
        args = train_args(s, experiment, compile_)
        result = train_loop.measure(args, tmp, label=label)
        light = result["lightning"]
        rate = light["windows"] / max(light["seconds"], 1e-9)
        print(f"{label}: training {rate:.1f} windows/s ({args.precision}, channels_last"
              f"{', compile' if compile_ else ''})")  # fmt: skip
        idle = 100 * result["gpu_idle_share"]
        print(f"{label}: GPU idle share waiting for the loader {idle:.1f} %"
              f"{' (CPU dry run: loader wait share)' if dry_run else ''}")  # fmt: skip


def step_evaluate(s: dict[str, object], tmp: Path) -> None:
    argv = [
        "--experiment=windowed_plus", f"--base-filters={s['base_filters']}",
        f"--patients={s['patients']}", f"--slices={s['slices']}", f"--size={s['size']}",
        f"--device={s['device']}", f"--precision={s['precision']}", "--channels-last",
    ]  # fmt: skip
    if s["working_size"]:
        argv.append(f"--working-size={s['working_size']}")
    if s["tile_size"]:
        argv.append(f"--tile-size={s['tile_size']}")
    args = evaluate_bench.parser().parse_args(argv)
    result = evaluate_bench.measure(args, tmp, label="windowed_plus")
    print(f"stitched evaluation: {result['per_patient']:.3f} s per scan")


def step_predict(s: dict[str, object], tmp: Path) -> None:
    import copy

    import predict as predict_bench

    from ichseg.data.phantom import make_head_volume
    from ichseg.models import UNet
    from ichseg.predict import load_predictor

    meta = copy.deepcopy(predict_bench.META)
    meta["net"]["base_filters"] = int(s["predict_base"])
    torch.manual_seed(0)
    net = UNet(base_filters=int(s["predict_base"]))
    state = {f"net.{name}": tensor for name, tensor in net.state_dict().items()}
    ckpt = tmp / "unet-random.ckpt"
    torch.save({"state_dict": state, "ichseg": meta}, ckpt)
    slices, size = int(s["predict_slices"]), int(s["predict_size"])
    hu, _, _ = make_head_volume(np.random.default_rng(0), slices, size, with_ich=True,
                                spacing_mm=0.45)  # fmt: skip
    device = str(s["device"])
    autocast = "bf16" if device == "cuda" else "none"
    predictor = load_predictor(ckpt, device=device, autocast=autocast, tile_batch_size=64)
    predictor.predict_hu(hu[:, :, :1])  # warm-up
    seconds = predict_bench.seconds_per_run(predictor, hu, 1 if device == "cpu" else 3)
    print(
        f"predict: {seconds:.2f} s for a {slices}-slice {size}x{size} scan "
        f"(U-Net base {s['predict_base']}, {device}, autocast {autocast})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--workers", type=int, default=8, help="loader workers (GPU run)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu bench: no CUDA GPU here (use --dry-run for the CPU rehearsal)")
        return 2
    s = sizes(args.dry_run, args.workers)
    where = "CPU dry run" if args.dry_run else torch.cuda.get_device_name()
    print(f"gpu bench: {where}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.dry_run:
        print("bf16-mixed: skipped on the CPU dry run (float32 instead)")
    steps: list[tuple[str, Callable[[], None]]] = []
    failed: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        steps = [
            ("train", lambda: step_train(s, tmp, args.dry_run)),
            ("evaluate", lambda: step_evaluate(s, tmp)),
            ("predict", lambda: step_predict(s, tmp)),
        ]
        for step, run in steps:
            begun = time.perf_counter()
            try:
                run()
            except Exception:  # report every step; the exit status says one failed
                traceback.print_exc()
                print(f"step {step}: FAILED")
                failed.append(step)
                continue
            print(f"step {step}: ok in {time.perf_counter() - begun:.1f} s")
    total = time.perf_counter() - start
    print(f"gpu bench: {'FAILED ' + ', '.join(failed) if failed else 'all steps ok'} "
          f"in {total:.1f} s")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
