"""The cross-validation report: ``python -m ichseg.report PATH [PATH ...] [--out DIR]``.

Also installed as ``ichseg-report``. Each PATH is a multirun folder (e.g.
``outputs/train/multiruns/<time>/`` with one run folder per fold), a single run folder, or one of
several run folders. Every test evaluation written by the
:class:`~ichseg.eval.callback.StitchedEvaluation` callback below the PATHs (a ``report.json`` with
its ``counts.npz``) is loaded; each test patient must appear exactly once (two runs of the same
fold are an error naming both folders). The paper's tables are recomputed over the union of the
folds' test patients (:func:`ichseg.eval.report.merge_folds`), written as ``cv_report.json`` and
``cv_report.md`` into ``--out`` (default: PATH, or the folder the PATHs share) and printed.

Bad input (a missing folder, no evaluation found, unreadable counts, a patient tested twice) is
one sentence naming the path on stderr and exit status 2.

Examples::

    python -m ichseg.report outputs/train/multiruns/2025-01-01_12-00-00
    python -m ichseg.report outputs/train/runs/fold0 outputs/train/runs/fold1 --out cv/
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ichseg.errors import ReportError
from ichseg.eval.report import (
    CV_REPORT_JSON,
    CV_REPORT_MD,
    CrossValidationReport,
    find_fold_dirs,
    merge_folds,
    write_cv_report,
)
from ichseg.utils.cli import run_cli

PROG = "ichseg.report"


def collect_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The test-evaluation folders below every path (each path must hold at least one)."""
    runs: list[Path] = []
    for path in paths:
        found = find_fold_dirs(path)
        if not found:
            raise ReportError(
                f"{path}: no fold results found (no report.json with counts.npz of a test "
                "evaluation below it)",
                path,
            )
        runs += [run for run in found if run not in runs]
    return runs


def default_out_dir(paths: Sequence[str | os.PathLike[str]]) -> Path:
    """PATH for one path; the deepest folder the paths share for several."""
    if len(paths) == 1:
        return Path(paths[0])
    return Path(os.path.commonpath([os.path.abspath(p) for p in paths]))


def cross_validation_report(
    paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
) -> tuple[CrossValidationReport, str, Path]:
    """Find, merge and write: returns the report, its markdown and the output folder."""
    report = merge_folds(collect_runs(paths))
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    try:
        markdown = write_cv_report(report, out)
    except OSError as err:
        raise ReportError(f"{out}: cannot write the report ({err.strerror})", out) from None
    return report, markdown, out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
