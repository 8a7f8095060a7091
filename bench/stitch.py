"""Benchmark: stitch full 640x640 slices with ichseg against MONAI's sliding_window_inference.

A tiny convolutional net (so that the stitching itself, not the model, is measured) runs on N
slices with 160x160 windows and stride 80 (MONAI: ``roi_size=(160, 160)``, ``overlap=0.5``,
``mode="constant"``); both run in the same process on the same device, alternating. Prints the
best of ``--repeats`` times for each, their ratio and the largest absolute difference of the two
probability maps; then the same without a model (logits = the input), which times the stitching
machinery alone. MONAI's half is skipped with a message when monai is not installed.

    python bench/stitch.py [--slices 8] [--size 640] [--batch 64] [--device auto|cpu|cuda]
                           [--mode constant|gaussian] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ichseg.inference.stitch import stitch


def tiny_net(channels: int = 1, width: int = 8) -> torch.nn.Module:
    """Two 3x3 convolutions and a 1x1: cheap, so the stitching overhead is visible."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(width, 1, 1),
    )


def timed(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """Wall time of one run (synchronised on CUDA) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def best_times(
    runs: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Best time of each run over ``repeats`` rounds, after a warm-up; the runs alternate within
    a round so that a change in machine load affects them alike."""
    results = {name: (float("inf"), run()) for name, run in runs.items()}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds, out = timed(run, device)
            results[name] = (min(seconds, results[name][0]), out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--window", type=int, default=160)
    parser.add_argument(
        "--batch", type=int, default=64, help="windows per forward pass (both libraries)"
    )
    parser.add_argument("--mode", choices=("constant", "gaussian"), default="constant")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    slices = torch.rand(args.slices, 1, args.size, args.size, device=device)
    stride = args.window // 2
    per_axis = -(-(args.size - args.window) // stride) + 1
    n_windows = args.slices * per_axis**2
    print(
        f"{args.slices} slices of {args.size}x{args.size}, {args.window}x{args.window} windows, "
        f"stride {stride} ({n_windows} windows), batch {args.batch}, mode {args.mode}, "
        f"device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, best of {args.repeats}"
    )
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        sliding_window_inference = None
        print("MONAI is not installed: skipping its half (pip install monai).")

    net = tiny_net().to(device).eval()
    models: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "tiny net": net,
        "no model (logits = input)": lambda x: x[:, :1],  # the stitching machinery alone
    }
    for label, model in models.items():
        runs: dict[str, Callable[[], torch.Tensor]] = {
            "ichseg": lambda model=model: stitch(
                model,
                slices,
                tile_size=args.window,
                tile_stride=stride,
                tile_batch_size=args.batch,
                blend=args.mode,
            )
        }
        if sliding_window_inference is not None:

            def monai_run(model=model) -> torch.Tensor:
                with torch.inference_mode():
                    out = sliding_window_inference(
                        slices,
                        roi_size=(args.window, args.window),
                        sw_batch_size=args.batch,
                        predictor=lambda x: torch.sigmoid(model(x)),
                        overlap=0.5,
                        mode=args.mode,
                    )
                return out[:, 0]

            runs["MONAI"] = monai_run
        results = best_times(runs, device, args.repeats)
        print(f"-- {label}")
        ours_s, ours = results["ichseg"]
        print(
            f"   ichseg stitch                   {ours_s:8.3f} s  "
            f"({n_windows / ours_s:9.0f} windows/s)"
        )
        if "MONAI" in results:
            theirs_s, theirs = results["MONAI"]
            print(
                f"   MONAI sliding_window_inference  {theirs_s:8.3f} s  "
                f"({n_windows / theirs_s:9.0f} windows/s)"
            )
            print(f"   ratio MONAI time / ichseg time  {theirs_s / ours_s:8.2f}")
            print(f"   max |ichseg - MONAI|            {(ours - theirs).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
