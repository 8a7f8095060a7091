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
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ichseg.cli.schema import check_config
from ichseg.data import tiles
from ichseg.errors import ConfigError, IchsegError, first_line
from ichseg.utils.cli import EXIT_USAGE, hydra_error_line

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

    meta, _ = read_checkpoint(ckpt)
    stored, _ = specs_from_meta(meta, str(ckpt))
    differ = [
        f.name for f in fields(stored) if getattr(stored, f.name) != getattr(input_spec, f.name)
    ]
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


#: What ichseg and Lightning write into a run folder: a folder holding one of these (or Hydra's
#: ``.hydra`` from before this process) holds an earlier run.
RUN_OUTPUTS = (
    ".hydra", "checkpoints", "tensorboard", "csv", "report.md", "report.json", "slices.csv",
    "splits.json",
)  # fmt: skip
#: The folders a run folder of this process is made in, with what they held before it: a run folder
#: not among them is this process's own, removed again when the run fails before it started.
_RUN_PARENTS: dict[Path, set[str]] = {}


def earlier_run_outputs(folder: Path) -> list[str]:
    """The names in ``folder`` that an earlier run wrote (:data:`RUN_OUTPUTS`, TensorBoard
    event files)."""
    if not folder.is_dir():
        return []
    found = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    found += sorted(p.name for p in folder.glob("events.out.tfevents.*"))
    return found


def check_command_line(argv: Sequence[str]) -> None:
    """Compose every job of ``argv`` (Hydra's command line) and check it before Hydra creates any
    folder: overrides Hydra refuses (an unknown key or group option), wrong keys or types
    (:func:`~ichseg.cli.schema.check_config`), and, unless only printing the config (``--cfg``),
    the run folders: writable, and not holding an earlier run unless resuming it
    (``ckpt_path=last``). Raises :class:`ConfigError`. Command lines Hydra answers itself
    (``--help``, ``--info``, ``--config-dir``, ...) are left to Hydra."""
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return  # Hydra's parser prints its usage itself
    if (
        args.help or args.hydra_help or args.info or args.shell_completion
        or args.experimental_rerun or args.config_path or args.config_name or args.config_dir
    ):  # fmt: skip
        return
    for num, overrides in enumerate(_job_overrides(args.overrides, args.multirun)):
        cfg = _compose_job(overrides)
        if args.cfg or _secondary_process():
            continue
        if args.multirun:
            with open_dict(cfg):
                cfg.hydra.job.num = num
            folder = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            option = "hydra.sweep.dir"
        else:
            folder, option = Path(str(cfg.hydra.run.dir)), "hydra.run.dir"
        check_writable(folder, f"paths.log_dir=PATH or {option}=PATH")
        check_writable(Path(str(cfg.paths.cache_dir)), "paths.cache_dir=PATH or ICHSEG_CACHE")
        check_run_folder(folder, cfg.get("ckpt_path"), option)
        if not args.multirun:
            _remember_run_parent(folder.absolute())


def _secondary_process() -> bool:
    """A process that Lightning's DDP launcher (``LOCAL_RANK``) or SLURM started besides the first:
    it runs in the first one's folder, which it must not refuse."""
    return any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def _remember_run_parent(folder: Path) -> None:
    """Note what ``folder``'s parent holds now (the run folder's name has Hydra's time in it,
    which may tick before Hydra makes it)."""
    parent = folder.parent
    _RUN_PARENTS[parent] = {p.name for p in parent.iterdir()} if parent.is_dir() else set()


def _job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs a command line starts (one without ``-m``)."""
    if not multirun:
        return [list(overrides)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        batches = BasicSweeper.split_arguments(parsed, None)
        return [list(job) for batch in batches for job in batch]
    except Exception:  # a sweep syntax of another sweeper, or a parse error Hydra reports
        return [[o for o in overrides if "," not in o.split("=", 1)[-1]]]


def _compose_job(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("ichseg.conf", version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
    except Exception as err:  # Hydra and OmegaConf raise many types, each with a clear message
        raise ConfigError(compose_error_line(err)) from None
    finally:
        GlobalHydra.instance().clear()
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    check_config(plain)
    return cfg


def check_writable(folder: Path, how: str) -> None:
    """``folder`` exists as a writable folder or can be created; else one line naming it."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{folder}: cannot create this output folder: {existing} is not a folder; "
            f"pick another with {how}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write into" if existing == folder.absolute() else f"create it in {existing}"
        raise ConfigError(
            f"{folder}: cannot {what} (permission denied); pick another output folder with {how}"
        )


def check_run_folder(folder: Path, ckpt_path: Any, option: str = "hydra.run.dir") -> None:
    """A folder holding an earlier run is only resumed (``ckpt_path=last``), never overwritten;
    ``ckpt_path=last`` needs its ``checkpoints/last.ckpt``."""
    if ckpt_path == "last":
        last = folder / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"{last}: checkpoint to resume from does not exist (to resume, run in the same "
                f"folder: {option}=<run dir> ckpt_path=last)"
            )
        return
    found = earlier_run_outputs(folder)
    if found:
        raise ConfigError(
            f"{folder}: holds an earlier run ({', '.join(found[:3])}); resume it with "
            f"ckpt_path=last, or start a new run in another folder (drop {option}=... or pick "
            "another)"
        )


def user_error(err: BaseException) -> str | None:
    """The one-line message of a problem the user can fix, also when Hydra's ``instantiate`` or
    Lightning wrapped it: an :class:`IchsegError` anywhere in the chain of causes, or Lightning's
    ``MisconfigurationException``; None for anything else (a bug: its traceback stays)."""
    seen: set[int] = set()
    error: BaseException | None = err
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, IchsegError):
            return _with_key(str(error), err)
        if type(error).__name__ == "MisconfigurationException":
            return f"trainer: {first_line(error)}"
        error = error.__cause__ or error.__context__
    return None


def _with_key(message: str, err: BaseException) -> str:
    """``message`` prefixed with the config node Hydra's ``instantiate`` was building when it
    failed (its ``full_key``), unless the message names a key or file already."""
    found = re.search(r"^full_key: (\S+)", str(err), re.MULTILINE)
    if found is None or message.startswith((found.group(1), "/")) or ": " in message[:40]:
        return message
    return f"{found.group(1)}: {message}"


def compose_error_line(err: BaseException) -> str:
    """One line for an error of Hydra's composition; an unknown key says how to add one."""
    text = str(err)
    found = re.search(
        r"Could not override '([^']+)'.*?To append to your config use (\S+)", text, re.S
    )
    if found:
        return (
            f"{found.group(1)}: no such key in the config (see --cfg job; to add a key that the "
            f"config lacks use {found.group(2)})"
        )
    return hydra_error_line(err)


def _remove_unstarted_run(cfg: DictConfig) -> None:
    """Remove the run folder Hydra made for a run that failed before it started (only ``.hydra``,
    the log file and the split inside; never a folder that existed before this process)."""
    try:
        folder = Path(str(cfg.paths.output_dir)).absolute()
    except Exception:
        return
    before = _RUN_PARENTS.get(folder.parent)
    if before is None or folder.name in before or not folder.is_dir():
        return
    if all(p.name in (".hydra", "splits.json") or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _hydra_main() -> None:
    import hydra

    register_resolvers()
    _RUN_PARENTS.clear()
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
            _remove_unstarted_run(cfg)
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
