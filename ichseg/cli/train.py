"""Train one cross-validation round: ``python -m ichseg.train [overrides]`` (also ``ichseg-train``).

A thin Hydra entry point: compose ``conf/train.yaml`` with the chosen experiment and overrides,
seed, instantiate the DataModule, the LightningModule, callbacks, loggers and the Trainer, fit, test
with the best-validation checkpoint, and print where the outputs are. :func:`train` takes a composed
config and returns the metrics, for tests and sweeps.

Examples::

    python -m ichseg.train experiment=windowed data.root=/data/ct-ich data.fold=2 trainer=gpu
    python -m ichseg.train experiment=demo                  # phantom data, CPU, minutes
    python -m ichseg.train -m experiment=windowed data.fold=0,1,2,3,4
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ichseg.cli.schema import check_config
from ichseg.cli.train_checks import (
    check_command_line,
    compose_error_line,
    forget_run_folders,
    remove_unstarted_run,
    user_error,
)
from ichseg.data import tiles
from ichseg.errors import ConfigError, IchsegError
from ichseg.utils.cli import EXIT_USAGE

PROG = "ichseg.train"


def input_channels(channels: Any, context_slices: Any = 0) -> int:
    """Network input channels: one per CT window per slice of the 2.5D context,
    ``len(channels) * (2 * context_slices + 1)``."""
    return tiles.input_channels(len(channels), int(context_slices or 0))


def register_resolvers() -> None:
    """Resolvers used by the configs: ``${len:list}``, ``${div:a,b}`` and
    ``${input_channels:channels,context_slices}``."""
    resolvers = {
        "len": len,
        "div": lambda a, b: float(a) / float(b),
        "input_channels": input_channels,
    }
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


#: How ``data.root`` of ``conf/data/phantom.yaml`` begins: the one root a phantom is generated into.
PHANTOM_ROOT_PREFIX = "${paths.log_dir}/phantom/"


def check_data_root(data_cfg: DictConfig) -> None:
    """Fail early, with what to do, when the dataset root is missing (no phantom asked for), or
    when a phantom is asked for at a ``data.root`` given by hand that does not exist (a typo would
    otherwise generate a second phantom there): the phantom is generated only at the root
    ``conf/data/phantom.yaml`` names."""
    from ichseg.data.phantom_spec import check_data_root as check_root

    root = str(data_cfg.get("root", ""))
    phantom = data_cfg.get("phantom")
    if phantom is not None and not Path(root).exists():
        raw = OmegaConf.to_container(data_cfg, resolve=False).get("root")
        if not str(raw).startswith(PHANTOM_ROOT_PREFIX):
            raise ConfigError(
                f"data.root: {root} does not exist; a phantom is generated only at its default "
                "root under paths.log_dir (drop data.root=...), or write one there first with "
                f"python -m ichseg.data.phantom {root}"
            )
    check_root(root, phantom)


def check_splits_file(cfg: DictConfig) -> None:
    """A ``data.splits_file`` given by the user must exist (a typo would silently make a new
    split); only the splits file a multirun's jobs share (:func:`share_splits_in_sweep`) is
    written by its first job."""
    value = cfg.data.get("splits_file")
    if value in (None, "") or Path(str(value)).is_file() or _is_sweep_splits(Path(str(value))):
        return
    raise ConfigError(
        f"data.splits_file: {value} does not exist; give an existing splits.json, or drop "
        "data.splits_file to make a new split (written into the run folder)"
    )


def _is_sweep_splits(path: Path) -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and path == Path(hydra_cfg.sweep.dir) / "splits.json"


def check_accelerator(trainer_cfg: DictConfig) -> None:
    """``trainer.accelerator=gpu`` (``trainer=gpu``, ``trainer=ddp``) on a machine without one."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: no GPU is available here (torch finds no CUDA "
            "device); train on the CPU with trainer=cpu (or trainer.accelerator=cpu)"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "trainer.accelerator=mps: no Apple GPU is available here; train on the CPU with "
            "trainer=cpu (or trainer.accelerator=cpu)"
        )


def check_checkpoint_file(cfg: DictConfig) -> None:
    """``ckpt_path`` names a readable ichseg checkpoint, read safely (weights only) before
    anything trains, so a damaged or unsafe file is one line naming it."""
    from ichseg.checkpoint import read_checkpoint

    path = resolve_ckpt_path(cfg)
    if path is not None:
        read_checkpoint(path)


def train_overrides() -> list[str]:
    """The command-line overrides of this run (Hydra's task overrides; [] outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def checkpoint_meta(cfg: DictConfig, datamodule: Any, callbacks: Sequence[Any]) -> dict[str, Any]:
    """What prediction and re-evaluation need to rebuild the network, its inputs and how it was
    scored (:func:`ichseg.checkpoint.make_meta`): the DataModule's resolved input spec and the
    stitched evaluation's inference spec (the defaults without that callback)."""
    from ichseg.checkpoint import make_meta
    from ichseg.lit.callbacks.stitched_eval import StitchedEvaluation
    from ichseg.specs import InferenceSpec

    evaluation = next((c for c in callbacks if isinstance(c, StitchedEvaluation)), None)
    inference = evaluation.inference if evaluation is not None else InferenceSpec()
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    meta = make_meta(net, datamodule.input_spec, inference, train_overrides())
    splits_dir = cfg.data.get("splits_dir")
    splits = cfg.data.get("splits_file") or (
        Path(splits_dir) / "splits.json" if splits_dir else None
    )
    meta["splits_file"] = None if splits is None else str(splits)
    return meta


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: None, an existing file, or "last" (``checkpoints/last.ckpt`` of this run).

    With ``train=false`` it is the checkpoint tested."""
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    path = (
        Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt" if value == "last" else Path(value)
    )
    if not path.is_file():
        hint = (
            " (to resume, run in the same folder: hydra.run.dir=<run dir> ckpt_path=last)"
            if value == "last"
            else ""
        )
        purpose = "resume from" if cfg.get("train", True) else "test"
        raise ConfigError(f"{path}: checkpoint to {purpose} does not exist{hint}")
    return str(path)


def build_datamodule(cfg: DictConfig) -> Any:
    """The configured DataModule (with ``data=phantom`` it generates the phantom in its
    ``prepare_data``)."""
    from hydra.utils import instantiate

    check_data_root(cfg.data)
    return instantiate(cfg.data, _convert_="all")


def instantiate_dict(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a config group such as callbacks or logger."""
    from hydra.utils import instantiate

    if not section:
        return []
    return [
        instantiate(entry)
        for entry in section.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def compose_config(
    overrides: Sequence[str] = (), output_dir: str | os.PathLike[str] | None = None
) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` as ``python -m ichseg.train`` composes it,
    ready for :func:`train` from Python (a notebook, a benchmark): the resolvers registered and
    Hydra's runtime config set; ``output_dir`` replaces ``paths.output_dir`` (default: Hydra's
    ``hydra.run.dir``, which is not created)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("ichseg.conf", version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    except Exception as err:  # Hydra and OmegaConf raise many types, each with a clear message
        raise ConfigError(compose_error_line(err)) from None
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
    check_config(cfg)
    return cfg


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test one round as configured; returns the logged metrics as floats."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    register_resolvers()
    check_accelerator(cfg.trainer)
    check_splits_file(cfg)
    check_checkpoint_file(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build_datamodule(cfg)
    model = instantiate(cfg.model)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    # plain data, set after instantiate so "_target_" stays a string
    model.meta = checkpoint_meta(cfg, datamodule, callbacks)
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.get("train", True) and trainer.world_size == 1:
        # the folds and the data before anything is logged: a round that cannot train (e.g. a
        # validation fold without ICH) stops here (Lightning's own calls are then no-ops)
        datamodule.prepare_data()
        datamodule.setup("fit")
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
        metrics.update(_floats(trainer.callback_metrics))
    if cfg.get("test", True):
        trainer.test(
            model, datamodule=datamodule, ckpt_path=checkpoint_to_test(cfg, trainer, datamodule)
        )
        metrics.update(_floats(trainer.callback_metrics))
    _print_outputs(cfg, trainer)
    return metrics


def checkpoint_to_test(cfg: DictConfig, trainer: Any, datamodule: Any) -> str | None:
    """After fitting: the best checkpoint. With ``train=false``: ``ckpt_path`` (the weights of
    that checkpoint are scored). None (with a warning): the model's current weights."""
    if cfg.get("train", True):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        if best is None:
            print(f"[{PROG}] no best checkpoint was saved: testing the current weights",
                  file=sys.stderr)  # fmt: skip
        return best
    ckpt = resolve_ckpt_path(cfg)
    if ckpt is not None:
        check_input_spec(ckpt, datamodule.input_spec)
    if ckpt is None:
        print(
            f"[{PROG}] train=false without ckpt_path: testing the INITIAL (untrained) weights; "
            "to score a trained model use python -m ichseg.evaluate ckpt=<checkpoint>",
            file=sys.stderr,
        )
    return ckpt


def check_input_spec(ckpt: str | os.PathLike[str], input_spec: Any) -> None:
    """Refuse to test a checkpoint on data prepared otherwise than it was trained on."""
    from dataclasses import fields

    from ichseg.checkpoint import read_checkpoint, specs_from_meta
    from ichseg.io.orientation import CTICH_ORIENTATION

    meta, _ = read_checkpoint(ckpt)
    stored, _ = specs_from_meta(meta, str(ckpt))

    def value(spec: Any, name: str) -> Any:  # an unrecorded orientation is CT-ICH's
        found = getattr(spec, name)
        return (found or CTICH_ORIENTATION) if name == "orientation" else found

    differ = [f.name for f in fields(stored) if value(stored, f.name) != value(input_spec, f.name)]
    if differ:
        name = differ[0]
        raise ConfigError(
            f"{ckpt}: the data settings differ from the checkpoint's input spec ({name}: "
            f"{getattr(input_spec, name)!r} here, {getattr(stored, name)!r} in the checkpoint)"
        )


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def _print_outputs(cfg: DictConfig, trainer: Any) -> None:
    if getattr(trainer, "global_rank", 0) != 0:
        return
    output_dir = Path(cfg.paths.output_dir)
    lines = [f"[{PROG}] outputs in {output_dir}"]
    callback = getattr(trainer, "checkpoint_callback", None)
    if callback is not None and getattr(callback, "best_model_path", ""):
        lines.append(f"  best checkpoint: {callback.best_model_path}")
    if (output_dir / "report.md").is_file():
        lines.append(f"  test report:     {output_dir / 'report.md'}")
    if cfg.get("logger") and "tensorboard" in cfg.logger:
        lines.append(f"  TensorBoard:     tensorboard --logdir {output_dir}")
    print("\n".join(lines), file=sys.stderr)


def share_splits_in_sweep(cfg: DictConfig) -> None:
    """In a multirun (e.g. the 5 folds) all jobs share ``<sweep dir>/splits.json``.

    The first job to get there writes it (atomically; the split is deterministic, so jobs started
    at the same time write the same file) and the others read it, unless ``data.splits_file`` is
    set.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or cfg.data.get("splits_file"):
        return
    with open_dict(cfg):
        cfg.data.splits_file = str(Path(hydra_cfg.sweep.dir) / "splits.json")


def _hydra_main() -> None:
    import hydra

    register_resolvers()
    forget_run_folders()
    try:
        check_command_line(sys.argv[1:])
    except IchsegError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None

    @hydra.main(version_base="1.3", config_path="pkg://ichseg.conf", config_name="train")
    def run(cfg: DictConfig) -> float | None:
        share_splits_in_sweep(cfg)
        try:
            check_config(cfg)
            metrics = train(cfg)
        except Exception as err:
            message = user_error(err)
            if message is None:
                raise
            remove_unstarted_run(cfg)
            print(f"{PROG}: error: {message}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        metric = cfg.get("optimized_metric")
        return metrics.get(metric) if metric else None

    run()


def main() -> None:
    """Console-script entry point (``ichseg-train``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
