"""Score a trained checkpoint: ``python -m ichseg.evaluate ckpt=<best.ckpt> [overrides]``.

::

    python -m ichseg.evaluate ckpt=outputs/train/runs/<time>/checkpoints/best-....ckpt
    python -m ichseg.evaluate ckpt=best.ckpt data.root=/data/ct-ich data.fold=2 trainer=gpu

The checkpoint records the command-line overrides of its training run and the split it used
(:mod:`ichseg.checkpoint`). The training config is composed again from them, the overrides given
here are applied on top (same Hydra grammar as ``ichseg.train``), and the checkpoint's weights are
tested with ``train=false`` through the same DataModule and stitched evaluation: the report equals
the training run's (tests/test_recipe_roundtrip.py). The data settings must still describe the
checkpoint's input spec, else the command refuses. Outputs go to a new run folder,
``<paths.log_dir>/evaluate/runs/<time>/`` (or ``output=DIR``); nothing of the training run is
rewritten except, with ``tune_on_val``, the operating point stored in the checkpoint itself, which
is chosen again by the same rule.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ichseg.checkpoint import CheckpointError, read_checkpoint
from ichseg.errors import ConfigError
from ichseg.utils.cli import hydra_error_line, run_command

PROG = "python -m ichseg.evaluate"


def evaluate_overrides(ckpt: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """The training overrides stored in ``ckpt``, its split, then ``overrides``, then
    ``train=false ckpt_path=<ckpt>`` (later overrides win)."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("train", "ckpt_path"):
            raise ConfigError(
                f"option {key} is set by {PROG} (the checkpoint is tested, not trained)"
            )
    path = Path(ckpt)
    meta, _ = read_checkpoint(path)
    if meta.get("version") == 1:
        raise CheckpointError(
            f"{path}: a format-1 checkpoint does not record how it was trained; test it with "
            "python -m ichseg.train <its training overrides> train=false ckpt_path=<checkpoint>"
        )
    stored = [str(o) for o in meta.get("train_overrides") or []]
    splits = meta.get("splits_file")
    split = [f"data.splits_file={splits}"] if splits and Path(splits).is_file() else []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("train", "ckpt_path"):
            raise ConfigError(
                f"option {key} is set by {PROG} (the checkpoint is tested, not trained)"
            )
    return [*stored, *split, *overrides, "train=false", f"ckpt_path={path.resolve()}"]


def evaluate_config(
    ckpt: str | Path, overrides: Sequence[str] = (), output_dir: str | Path | None = None
) -> Any:
    """The composed config that tests ``ckpt`` (:func:`evaluate_overrides`), writing into
    ``output_dir`` (default ``<paths.log_dir>/evaluate/runs/<time>``)."""
    from omegaconf import open_dict

    from ichseg.train import compose_config

    arguments = evaluate_overrides(ckpt, overrides)
    try:
        cfg = compose_config(arguments, output_dir)
    except Exception as err:  # Hydra and OmegaConf raise many types, all with a clear message
        raise ConfigError(hydra_error_line(err)) from None
    if output_dir is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(cfg.paths.log_dir) / "evaluate" / "runs" / stamp)
    return cfg


def evaluate(
    ckpt: str | Path, overrides: Sequence[str] = (), output_dir: str | Path | None = None
) -> dict[str, float]:
    """Test ``ckpt`` as its training run did; returns the logged metrics."""
    from ichseg.train import train

    cfg = evaluate_config(ckpt, overrides, output_dir)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    return train(cfg)


def usage() -> str:
    """The command's help text."""
    return "\n".join(
        [
            f"usage: {PROG} ckpt=PATH [output=DIR] [override ...]",
            "",
            "Score a checkpoint written by ichseg.train as its training run did: the training",
            "config is composed again from the overrides stored in the checkpoint, then the ones",
            "given here (e.g. data.root=/data/ct-ich data.fold=2 trainer=gpu).",
        ]
    )


def _execute(arguments: list[str]) -> None:
    named = dict(a.split("=", 1) for a in arguments if a.startswith(("ckpt=", "output=")))
    rest = [a for a in arguments if not a.startswith(("ckpt=", "output="))]
    if not named.get("ckpt"):
        raise ConfigError(f"missing ckpt=...; usage: {PROG} ckpt=PATH [override ...]")
    evaluate(named["ckpt"], rest, named.get("output") or None)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``ichseg-evaluate``)."""
    return run_command(None if argv is None else list(argv), usage, _execute, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
