"""The cross-validation report: ``python -m ichseg.report PATH [PATH ...] [--out DIR]``.

Also installed as ``ichseg-report``. Each PATH is a multirun folder (e.g.
``outputs/train/multiruns/<time>/`` with one run folder per fold), a single run folder, or one of
several run folders. Every test evaluation below the PATHs (a ``report.json`` with its
``counts.npz``) is merged by :func:`ichseg.eval.cv.merge_folds` (each test patient exactly once),
written as ``cv_report.json`` and ``cv_report.md`` into ``--out`` (default: PATH, or the folder
the PATHs share) and printed.

Bad input (a missing folder, no evaluation found, unreadable counts, a patient tested twice) is
one sentence naming the path on stderr and exit status 2.

Examples::

    python -m ichseg.report outputs/train/multiruns/2025-01-01_12-00-00
    python -m ichseg.report outputs/train/runs/fold0 outputs/train/runs/fold1 --out cv/
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ichseg.eval.cv import (
    CV_REPORT_JSON,
    CV_REPORT_MD,
    collect_runs,
    cross_validation_report,
    default_out_dir,
)
from ichseg.utils.cli import ArgumentParser, run_cli

__all__ = ["build_parser", "collect_runs", "cross_validation_report", "default_out_dir", "main"]

PROG = "ichseg.report"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"python -m {PROG}",
        description="Merge the test evaluations of cross-validation folds into the paper's "
        "tables over all test patients.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="a multirun folder (one run folder per fold), a run folder, or several run folders",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write {CV_REPORT_JSON} and {CV_REPORT_MD} "
        "(default: PATH, or the folder shared by several PATHs)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``ichseg-report``): print the markdown report, return 0."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        _, markdown, _ = cross_validation_report(args.paths, args.out)
        print(markdown, end="")
        return 0

    return run_cli(run, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
