"""Benchmark: seconds per full-size scan (40 slices of 512x512) with the paper's U-Net.

A random-weights checkpoint of the paper's network (``UNet()``: base 64, depth 4, 31 M weights) is
written the way ``ichseg.train`` writes one (``state_dict`` with ``net.`` keys and the ``ichseg``
metadata: 160x160 windows, stride 80, working size 640, brain window) and loaded with
:func:`ichseg.predict.load_predictor`. A phantom head of 40 slices of 512x512 HU is predicted
with :meth:`ichseg.inference.Predictor.predict_hu`: windowing, resizing 512 -> 640, 49 windows per
slice through the network, stitching, resizing back, threshold, closing and opening (file I/O not
included).

* CPU: the full U-Net runs a few windows per second on a laptop-class CPU, so only
  ``--cpu-slices`` slices are timed and the time is scaled to the whole scan (printed as such).
* GPU (when CUDA is available; otherwise skipped with a message): the whole scan, best of
  ``--repeats`` after a warm-up, with bf16 autocast (``amp``) and in float32.
* The pipeline without the network (the input passed through as logits) on the whole scan, to
  show what pre- and post-processing cost.

When both devices ran, the GPU / CPU time ratio is printed.

    python bench/predict.py [--slices 40] [--size 512] [--cpu-slices 2] [--batch 64]
                            [--device auto|cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ichseg.data.phantom import make_head_volume
from ichseg.inference import Predictor
from ichseg.models import UNet
from ichseg.predict import load_predictor

META = {
    "format": "ichseg-checkpoint",
    "version": 1,
    "net": {
        "_target_": "ichseg.models.UNet",
        "in_channels": 1,
        "out_channels": 1,
        "base_filters": 64,
        "depth": 4,
        "dropout": 0.5,
        "norm": "none",
    },
    "data": {
        "mode": "windowed",
        "window": 160,
        "stride": 80,
        "working_size": 640,
        "channels": ["brain"],
    },
    "threshold": 0.5,
}


def write_checkpoint(path: Path) -> int:
    """A random-weights checkpoint of the paper's U-Net; returns the number of weights."""
    torch.manual_seed(0)
    net = UNet()
    state = {f"net.{name}": tensor for name, tensor in net.state_dict().items()}
    torch.save({"state_dict": state, "ichseg": META}, path)
    return sum(p.numel() for p in net.parameters())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_run(predictor: Predictor, hu: np.ndarray, repeats: int) -> float:
    """Best wall time of ``Predictor.predict_hu`` over ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(predictor.device)
        start = time.perf_counter()
        predictor.predict_hu(hu)
        synchronize(predictor.device)
        best = min(best, time.perf_counter() - start)
    return best


class Passthrough(torch.nn.Module):
    """Logits from the first input channel: no network cost, only the pipeline around it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :1] * 8.0 - 4.0


def without_network(predictor: Predictor) -> Predictor:
    """The same predictor with :class:`Passthrough` in place of the U-Net (pipeline overhead)."""
    return Predictor(
        Passthrough(), predictor.input_spec, predictor.inference_spec, predictor.device
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=40, help="slices of the scan")
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the scan")
    parser.add_argument(
        "--cpu-slices", type=int, default=2, help="slices timed on the CPU (scaled)"
    )
    parser.add_argument("--batch", type=int, default=64, help="windows per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="GPU runs (best is kept)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    hu, _, _ = make_head_volume(rng, args.slices, args.size, with_ich=True, spacing_mm=0.45)
    print(f"scan: {args.slices} slices of {args.size}x{args.size} HU (phantom head)")
    windows_per_scan = args.slices * 49
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "unet-random.ckpt"
        n_weights = write_checkpoint(ckpt)
        print(
            f"model: paper U-Net, {n_weights / 1e6:.1f} M weights, random weights; "
            f"160x160 windows, stride 80, working size 640 ({windows_per_scan} windows per scan)"
        )
        results: dict[str, float] = {}

        if args.device in ("auto", "cpu"):
            predictor = load_predictor(ckpt, device="cpu", tile_batch_size=args.batch)
            count = max(1, min(args.cpu_slices, args.slices))
            part = np.ascontiguousarray(hu[:, :, :count])
            warm = torch.rand(2, 1, 160, 160)
            with torch.inference_mode():
                predictor.net(warm)  # one small forward to initialise the CPU kernels
            seconds = seconds_per_run(predictor, part, 1) * args.slices / count
            results["cpu"] = seconds
            print(
                f"cpu ({torch.get_num_threads()} threads): {seconds:.1f} s per scan, "
                f"{windows_per_scan / seconds:.1f} windows/s "
                f"(timed on {count} of {args.slices} slices and scaled x{args.slices / count:g})"
            )
            overhead = seconds_per_run(without_network(predictor), hu, 1)
            print(f"cpu pipeline without the network (whole scan): {overhead:.2f} s")

        if args.device in ("auto", "cuda"):
            if not torch.cuda.is_available():
                print("cuda: skipped (no CUDA GPU on this machine)")
            else:
                name = torch.cuda.get_device_name()
                for amp in (True, False):
                    predictor = load_predictor(
                        ckpt, device="cuda", autocast="bf16" if amp else "none",
                        tile_batch_size=args.batch,
                    )  # fmt: skip
                    predictor.predict_hu(hu)  # warm-up: kernels, allocator
                    seconds = seconds_per_run(predictor, hu, args.repeats)
                    label = f"cuda {'bf16' if amp else 'fp32'}"
                    results[label] = seconds
                    print(
                        f"{label} ({name}): {seconds:.2f} s per scan, "
                        f"{windows_per_scan / seconds:.0f} windows/s "
                        f"(whole scan, best of {args.repeats})"
                    )
                overhead = seconds_per_run(without_network(predictor), hu, args.repeats)
                print(f"cuda pipeline without the network (whole scan): {overhead:.2f} s")

        if "cpu" in results:
            for label, seconds in results.items():
                if label.startswith("cuda"):
                    ratio = seconds / results["cpu"]
                    print(f"{label} / cpu time ratio: {ratio:.4f} ({1 / ratio:.0f}x faster)")


if __name__ == "__main__":
    main()
