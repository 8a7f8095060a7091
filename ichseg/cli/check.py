"""The dataset check command: ``python -m ichseg.data.check ROOT`` (``ichseg-check``).

Parses the options, runs :func:`ichseg.data.check.check_dataset` and prints its report; exit
status 0 when the dataset is clean and 2 on problems. See docs/data.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ichseg.data.check import check_dataset
from ichseg.utils.cli import EXIT_USAGE, ArgumentParser, run_cli


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: print the report, exit 0 when clean and 2 on problems."""
    parser = ArgumentParser(
        prog="python -m ichseg.data.check",
        description="Check a PhysioNet CT-ICH release (NIfTI 1.3.x or JPG 1.0-1.2) "
        "and summarise it.",
    )
    parser.add_argument(
        "root", type=Path, help="dataset root (the folder holding ct_scans/ or Patients_CT/)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    def run() -> int:
        report = check_dataset(args.root, progress=not args.no_progress and sys.stderr.isatty())
        print(report.format())
        return 0 if report.ok else EXIT_USAGE

    return run_cli(run, "ichseg.data.check")


if __name__ == "__main__":
    raise SystemExit(main())
