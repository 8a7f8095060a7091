"""Benchmark: training windows per second of ichseg.train's loop against a plain PyTorch loop.

One phantom (generated in a temporary folder), one DataModule (``experiment=demo``: 256x256
slices, 64x64 windows, augmentation on) and, in the same run:

1. ``lightning``: the ``pl.Trainer`` that ``ichseg.train`` builds from the config (its logger,
   progress bar and learning-rate monitor; no validation, no checkpoints) fitting the
   ``ICHSegmentationModule``;
2. ``lightning, logging off``: the same without logger, progress bar and callbacks;
3. ``plain``: a hand-written loop over the same loader (same dataset, sampler and augmentation),
   the same network and initial weights, the same optimiser and the module's own loss.

Each run trains ``--epochs`` epochs of ``--batches`` batches from the same initial weights; the
variants run interleaved ``--repeats`` times and the fastest run of each is kept. Printed:
the rates, the ratio plain / lightning (target <= 1.10) and where the time goes: in the plain loop
the time waiting for the loader and in the step; in Lightning the time inside ``training_step`` +
backward + optimiser (between ``on_train_batch_start`` and ``on_train_batch_end``) and the rest
(fetching, hooks, logging). On CUDA every plain step ends with a synchronisation (Lightning's loss
check synchronises too), so the loader wait is the time the GPU idles.

    python bench/train_loop.py [--epochs 3] [--batches 10] [--base-filters 16] [--batch-size 16]
                               [--device cpu|cuda] [--precision 32-true|bf16-mixed]
                               [--channels-last] [--compile] [--workers 0] [--experiment demo]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

TARGET_RATIO = 1.10


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--batches", type=int, default=10, help="training batches per epoch")
    p.add_argument("--base-filters", type=int, default=16, help="U-Net base filters")
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch")
    p.add_argument(
        "--experiment", default="demo", help="the experiment config (demo, windowed_plus)"
    )
    p.add_argument("--patients", type=int, default=10, help="phantom patients")
    p.add_argument("--slices", type=int, default=8, help="phantom slices per patient")
    p.add_argument("--size", type=int, default=256, help="phantom in-plane size")
    p.add_argument(
        "--working-size",
        type=int,
        default=None,
        help="data.working_size (default: the experiment's)",
    )
    p.add_argument("--tile-size", type=int, default=None, help="data.tile_size (stride: half)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", default="32-true", help="Lightning precision (bf16-mixed on GPU)")
    p.add_argument("--channels-last", action="store_true", help="model.channels_last=true")
    p.add_argument("--compile", action="store_true", help="model.compile=true (torch.compile)")
    p.add_argument("--workers", type=int, default=0, help="loader workers")
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant (best kept)")
    p.add_argument("--skip-quiet", action="store_true", help="skip the logging-off Lightning run")
    p.add_argument("--root", default=None, help="phantom folder (default: a temporary one)")
    return p


def compose(args: argparse.Namespace, tmp: Path, extra: Sequence[str] = ()) -> Any:
    """The ``ichseg.train`` config of this benchmark (a phantom under ``tmp``)."""
    from ichseg.cli.train import compose_config

    overrides = [
        f"experiment={args.experiment}",
        "data=phantom",
        f"paths.log_dir={tmp}",
        f"data.phantom.patients={args.patients}",
        f"data.phantom.slices={args.slices}",
        f"data.phantom.size={args.size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"model.net.base_filters={args.base_filters}",
        f"model.channels_last={str(args.channels_last).lower()}",
        f"model.compile={str(args.compile).lower()}",
        "model.image_log_every_n_epochs=0",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        *extra,
    ]
    if args.root:
        overrides.append(f"data.root={args.root}")
    if args.working_size:
        overrides.append(f"data.working_size={args.working_size}")
    if args.tile_size:
        overrides += [f"data.tile_size={args.tile_size}", f"data.tile_stride={args.tile_size // 2}"]
    if args.experiment != "demo":
        overrides.append("data.exclude=[]")
    return compose_config(overrides, output_dir=tmp / "run")


def build_data(cfg: Any) -> Any:
    from ichseg.cli.train import build_datamodule

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_model(cfg: Any) -> Any:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(cfg.model)


class BatchTimer(pl.Callback):
    """Windows trained, wall time of the loop, and time inside the batch hooks' span."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.windows = 0
        self.inside = 0.0
        self.total = 0.0
        self._start = 0.0
        self._batch = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync()
        self.inside += time.perf_counter() - self._batch
        self.windows += len(batch["image"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync()
        self.total = time.perf_counter() - self._start


def run_lightning(
    cfg: Any, datamodule: Any, args: argparse.Namespace, quiet: bool
) -> dict[str, float]:
    """Fit with the Trainer ichseg.train instantiates (validation and checkpoints off)."""
    from hydra.utils import instantiate

    from ichseg.cli.train import instantiate_dict

    model = build_model(cfg)
    device = torch.device(args.device)
    timer = BatchTimer(device)
    callbacks: list[Any] = [timer]
    loggers: list[Any] = []
    if not quiet:
        names = ("progress_bar", "lr_monitor")
        section = cfg.get("callbacks") or {}
        callbacks += [instantiate(section[n]) for n in names if n in section]
        loggers = instantiate_dict(cfg.get("logger"))
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        max_epochs=args.epochs,
        min_epochs=1,
        limit_train_batches=args.batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=not quiet,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    return {"windows": timer.windows, "seconds": timer.total, "inside": timer.inside}


def _optimiser(model: Any) -> tuple[Any, Any]:
    config = model.configure_optimizers()
    if isinstance(config, dict):
        scheduler = config["lr_scheduler"]
        if scheduler.get("interval") != "step":
            return config["optimizer"], None
        return config["optimizer"], scheduler["scheduler"]
    return config, None


def run_plain(cfg: Any, datamodule: Any, args: argparse.Namespace) -> dict[str, float]:
    """The same epochs as a hand-written loop: loader, forward, loss, backward, step."""
    device = torch.device(args.device)
    model = build_model(cfg)
    model.setup("fit")  # channels_last / compile, as Lightning's setup hook does
    model.to(device)
    model.train()
    optimiser, scheduler = _optimiser(model)
    bf16 = "bf16" in str(args.precision)
    loader = datamodule.train_dataloader()
    sampler = loader.sampler
    windows = 0
    waiting = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(args.batches):
            before = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            waiting += time.perf_counter() - before
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(images)
            loss = model.loss(logits.float(), masks.float())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if scheduler is not None:
                scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            windows += len(images)
        del batches
    seconds = time.perf_counter() - start
    return {"windows": windows, "seconds": seconds, "waiting": waiting}


def warm_up(cfg: Any, datamodule: Any, args: argparse.Namespace) -> None:
    """One short plain epoch: the phantom cache, kernels and allocator, before anything is timed."""
    short = argparse.Namespace(**{**vars(args), "epochs": 1, "batches": 5})
    run_plain(cfg, datamodule, short)


def measure(args: argparse.Namespace, tmp: Path, label: str = "") -> dict[str, Any]:
    """Run the variants and print their lines; returns the numbers."""
    cfg = compose(args, tmp)
    datamodule = build_data(cfg)
    tag = f"{label}: " if label else ""
    warm_up(cfg, datamodule, args)
    results: dict[str, Any] = {}

    def keep(name: str, result: dict[str, float]) -> None:
        # best of the repeats: the machine may be shared
        if name not in results or result["seconds"] < results[name]["seconds"]:
            results[name] = result

    for _ in range(max(1, args.repeats)):  # interleaved, so that load changes hit every variant
        keep("lightning", run_lightning(cfg, datamodule, args, quiet=False))
        if not args.skip_quiet:
            keep("quiet", run_lightning(cfg, datamodule, args, quiet=True))
        keep("plain", run_plain(cfg, datamodule, args))

    def rate(r: dict[str, float]) -> float:
        return r["windows"] / max(r["seconds"], 1e-9)

    light, plain = results["lightning"], results["plain"]
    print(f"{tag}lightning (ichseg.train loop): {rate(light):.1f} windows/s "
          f"({light['windows']} windows in {light['seconds']:.2f} s)")  # fmt: skip
    if "quiet" in results:
        quiet = results["quiet"]
        print(f"{tag}lightning, logging off: {rate(quiet):.1f} windows/s "
              f"({quiet['windows']} windows in {quiet['seconds']:.2f} s)")  # fmt: skip
    print(f"{tag}plain pytorch loop: {rate(plain):.1f} windows/s "
          f"({plain['windows']} windows in {plain['seconds']:.2f} s)")  # fmt: skip
    ratio = rate(plain) / max(rate(light), 1e-9)
    verdict = "ok" if ratio <= TARGET_RATIO else "above target"
    print(f"{tag}ratio plain / lightning: {ratio:.3f} (target <= {TARGET_RATIO:.2f}: {verdict})")
    step_plain = plain["seconds"] - plain["waiting"]
    print(
        f"{tag}plain: loader wait {plain['waiting']:.2f} s "
        f"({100 * plain['waiting'] / max(plain['seconds'], 1e-9):.1f} %), "
        f"step {step_plain:.2f} s"
    )
    outside = light["seconds"] - light["inside"]
    print(
        f"{tag}lightning: step (training_step + backward + optimiser) {light['inside']:.2f} s, "
        f"outside the step (loader, hooks, logging) {outside:.2f} s "
        f"({100 * outside / max(light['seconds'], 1e-9):.1f} %)"
    )
    extra = light["seconds"] * plain["windows"] / max(light["windows"], 1) - plain["seconds"]
    line = f"{tag}lightning extra time per plain run: {extra:+.2f} s"
    if "quiet" in results:
        q = results["quiet"]
        logging = light["seconds"] - q["seconds"] * light["windows"] / max(q["windows"], 1)
        line += f", of which logger + progress bar + lr monitor {logging:+.2f} s"
    print(line)
    results["ratio"] = ratio
    results["gpu_idle_share"] = plain["waiting"] / max(plain["seconds"], 1e-9)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"train loop: experiment={args.experiment}, base filters {args.base_filters}, "
        f"batch {args.batch_size}, {args.epochs} epochs x {args.batches} batches, "
        f"{args.device} ({torch.get_num_threads()} threads), {args.precision}"
        f"{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
