"""The phantom command: ``python -m ichseg.data.phantom OUT [options]`` (``ichseg-phantom``).

Parses the options, calls :func:`ichseg.data.phantom.generate_phantom` and prints one summary
line; bad options or an unusable OUT are one line on stderr and exit status 2. See docs/phantom.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ichseg.data.phantom import (
    DEFAULT_SLICES,
    RELEASES,
    PhantomManifest,
    generate_phantom,
    parse_slices,
)
from ichseg.errors import ConfigError
from ichseg.utils.cli import ArgumentParser

PROG = "python -m ichseg.data.phantom"


def _prog() -> str:
    """The command name to show: the console script's when run as one."""
    return "ichseg-phantom" if Path(sys.argv[0]).name == "ichseg-phantom" else PROG


def _slices_argument(text: str) -> tuple[int, int]:
    try:
        return parse_slices(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=_prog(),
        description="Write a synthetic head-CT dataset in the exact layout of a PhysioNet CT-ICH "
        "release, so that readers and experiments run without the real download.",
    )
    parser.add_argument(
        "out", metavar="OUT", type=Path, help="folder to create (must not be non-empty)"
    )
    parser.add_argument(
        "--release",
        choices=RELEASES,
        default="nifti",
        help="layout to write: nifti (CT-ICH 1.3.x) or jpg (1.0-1.2); default nifti",
    )
    parser.add_argument(
        "--patients",
        type=_positive_int,
        default=None,
        help="number of patients (default: 75 for nifti, 82 for jpg)",
    )
    parser.add_argument(
        "--slices",
        type=_slices_argument,
        default=DEFAULT_SLICES,
        help="slices per patient: a count (12) or an inclusive range drawn per "
        "patient (30-40, the default)",
    )
    parser.add_argument(
        "--size",
        type=_positive_int,
        default=None,
        help="image size in pixels (default: 512 for nifti, 650 for jpg)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it already holds a CT-ICH dataset"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m ichseg.data.phantom`` / ``ichseg-phantom``)."""
    from ichseg.utils.cli import run_cli

    args = _build_parser().parse_args(argv)

    def run() -> PhantomManifest:
        return generate_phantom(
            args.out,
            release=args.release,
            n_patients=args.patients,
            n_slices=args.slices,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )

    manifest = run_cli(run, _prog())
    with_ich = sum(p.has_ich for p in manifest.patients)
    print(
        f"wrote a {manifest.release} phantom to {manifest.root}: {len(manifest.patients)} patients "
        f"({with_ich} with ICH), {manifest.n_slices} slices ({manifest.n_ich_slices} with ICH)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
