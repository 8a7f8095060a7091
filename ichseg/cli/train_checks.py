"""What ``python -m ichseg.train`` checks before Hydra creates a run folder, and how a failed run
becomes one line.

:func:`check_command_line` composes every job of a command line and checks it (unknown keys and
group options, wrong types, writable output folders, a folder of an earlier run that is not
resumed with ``ckpt_path=last``) before anything is written; :func:`user_error` finds the user's
problem in an exception that Hydra's ``instantiate`` or Lightning wrapped; and
:func:`remove_unstarted_run` removes the folder Hydra made for a run refused before it started.
See docs/training.md, "When something is wrong".
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ichseg.cli.schema import check_config
from ichseg.errors import ConfigError, IchsegError, first_line
from ichseg.utils.cli import hydra_error_line

#: What ichseg and Lightning write into a run folder: a folder holding one of these (or Hydra's
#: ``.hydra`` from before this process) holds an earlier run.
RUN_OUTPUTS = (
    ".hydra", "checkpoints", "tensorboard", "csv", "report.md", "report.json", "slices.csv",
    "splits.json",
)  # fmt: skip
#: The folders a run folder of this process is made in, with what they held before it: a run folder
#: not among them is this process's own, removed again when the run fails before it started.
_RUN_PARENTS: dict[Path, set[str]] = {}


def forget_run_folders() -> None:
    """Start a new command line: no run folder noted yet."""
    _RUN_PARENTS.clear()


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

    if "--version" in argv:
        return
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return  # a usage error: Hydra's parser reports it itself
    if (
        args.help or args.hydra_help or args.info or args.shell_completion
        or args.experimental_rerun or args.config_path or args.config_name or args.config_dir
    ):  # fmt: skip
        return
    for num, overrides in enumerate(_job_overrides(args.overrides, args.multirun)):
        with _logging_left_to_hydra():
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


@contextlib.contextmanager
def _logging_left_to_hydra() -> Any:
    """Lightning, imported by the check for the first time, keeps its messages to itself when the
    root logger has no handler yet (Hydra configures it later, for ``<task>.log``): give it one
    for the time of the import."""
    import logging

    handler = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


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

    from ichseg.cli.train import register_resolvers

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
    failed (its ``full_key``), unless the message names a key or file already; a message that
    starts with an argument (``fold=7 does not exist``) gets the node's key in front of it
    (``data.fold=7 does not exist``)."""
    found = re.search(r"^full_key: (\S+)", str(err), re.MULTILINE)
    if found is None or message.startswith((found.group(1), "/")):
        return message
    if re.match(r"[A-Za-z_]\w*=", message):
        return f"{found.group(1)}.{message}"
    if ": " in message[:40]:
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
    line = hydra_error_line(err)
    options = re.search(r"Available options in '([^']+)':\s*\n((?:\s+\S+\n?)+)", text)
    if options:
        names = ", ".join(options.group(2).split())
        line = f"{line} (options of {options.group(1)}: {names})"
    return line


def remove_unstarted_run(cfg: DictConfig) -> None:
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
