"""Benchmark: seconds per patient of the stitched evaluation and its share outside the network.

The function the ``StitchedEvaluation`` callback runs on a split (:func:`ichseg.eval.scoring.
score_scans` over the DataModule's ``eval_scans``, with the callback's inference spec and
thresholds) on a phantom (generated in a temporary folder) with a random-weights U-Net of the
configured experiment. The network's ``forward`` is wrapped with a timer (synchronised on CUDA);
the time outside it (slice store reads, tiling, blending, resizing back, thresholds, closing /
opening, counting) is total minus forward. Target: <= 15 % outside the forward.

    python bench/evaluate.py [--experiment demo] [--base-filters 8] [--patients 10] [--slices 8]
                             [--split test] [--device cpu|cuda] [--precision 32-true|bf16-mixed]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from train_loop import build_data, build_model, compose  # noqa: E402

TARGET_OUTSIDE = 0.15


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--experiment", default="demo", help="the experiment config (demo, windowed_plus)"
    )
    p.add_argument("--base-filters", type=int, default=8, help="U-Net base filters")
    p.add_argument("--patients", type=int, default=10, help="phantom patients")
    p.add_argument("--slices", type=int, default=8, help="phantom slices per patient")
    p.add_argument("--size", type=int, default=256, help="phantom in-plane size")
    p.add_argument("--working-size", type=int, default=None, help="data.working_size")
    p.add_argument("--tile-size", type=int, default=None, help="data.tile_size (stride: half)")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", default="32-true", help="Lightning precision (bf16 autocast)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--root", default=None, help="phantom folder (default: a temporary one)")
    return p


class ForwardTimer:
    """Wraps ``net.forward``: calls and seconds spent in it (synchronised on CUDA)."""

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.device = device
        self._forward = net.forward
        net.forward = self  # type: ignore[method-assign]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._sync()
        start = time.perf_counter()
        out = self._forward(*args, **kwargs)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def measure(args: argparse.Namespace, tmp: Path, label: str = "") -> dict[str, float]:
    """Score one split as the callback does; print and return seconds per patient and shares."""
    from hydra.utils import instantiate

    from ichseg.eval.gallery import OverlayGallery
    from ichseg.eval.scoring import autocast_for_precision, score_scans
    from ichseg.inference.predictor import Predictor

    ns = argparse.Namespace(**{**vars(args), "batch_size": 16, "workers": 0, "compile": False})
    cfg = compose(ns, tmp)
    datamodule = build_data(cfg)
    device = torch.device(args.device)
    module = build_model(cfg)
    module.setup("test")
    module.to(device).eval()
    callback = instantiate(cfg.callbacks.stitched_eval)
    spec = autocast_for_precision(callback.operating_spec, str(args.precision))
    thresholds = callback.scored_thresholds(spec)
    predictor = Predictor(module, datamodule.input_spec, spec, device)
    patients = list(datamodule.cv_round.patients(args.split))
    tag = f"{label}: " if label else ""

    # warm-up on the first patient (kernels, allocator), not timed
    first = next(datamodule.eval_scans(args.split, patients=patients[:1]))
    score_scans(predictor, [first], thresholds, OverlayGallery(0), None)

    timer = ForwardTimer(module.net, device)
    slices = 0

    def scans() -> Any:
        nonlocal slices
        for scan in datamodule.eval_scans(args.split, patients=patients):
            slices += len(scan.slices) if hasattr(scan, "slices") else 0
            yield scan

    start = time.perf_counter()
    with torch.no_grad():
        score_scans(predictor, scans(), thresholds, OverlayGallery(0), None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    per_patient = total / max(len(patients), 1)
    outside = max(total - timer.seconds, 0.0) / max(total, 1e-9)
    verdict = "ok" if outside <= TARGET_OUTSIDE else "above target"
    print(
        f"{tag}stitched evaluation: {per_patient:.3f} s per patient "
        f"({len(patients)} {args.split} patients in {total:.2f} s, {timer.calls} forward calls)"
    )
    print(
        f"{tag}network forward: {timer.seconds:.2f} s; outside the forward: "
        f"{total - timer.seconds:.2f} s = {100 * outside:.1f} % "
        f"(target <= {100 * TARGET_OUTSIDE:.0f} %: {verdict})"
    )
    return {"per_patient": per_patient, "outside_share": outside, "patients": len(patients)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    print(
        f"stitched evaluation: experiment={args.experiment}, base filters {args.base_filters}, "
        f"random weights, {args.device} ({torch.get_num_threads()} threads), {args.precision}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
