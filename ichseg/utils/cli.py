"""Turn ichseg errors into one clear line on stderr and exit status 2 in command-line tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from ichseg.errors import IchsegError

T = TypeVar("T")

EXIT_USAGE = 2


def run_cli(func: Callable[[], T], prog: str) -> T:
    """Run ``func``; on an :class:`IchsegError` print ``prog: error: <message>`` and exit 2."""
    try:
        return func()
    except IchsegError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def run_command(
    argv: list[str] | None,
    usage: Callable[[], str],
    execute: Callable[[list[str]], object],
    prog: str,
) -> int:
    """A ``key=value`` command line: ``-h`` / ``--help`` / ``help`` prints ``usage()``; otherwise
    ``execute(arguments)`` under :func:`run_cli` (one line and exit 2 on an ichseg error)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in arguments):
        print(usage())
        return 0
    run_cli(lambda: execute(arguments), prog)
    return 0


def hydra_error_line(err: BaseException) -> str:
    """One line from a Hydra / OmegaConf error: its first line and the first of its cause."""
    parts = []
    for error in (err, err.__cause__):
        if error is None:
            continue
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = next((line for line in lines if not line.startswith(("full_key", "object_type",
                     "reference_type"))), type(error).__name__)  # fmt: skip
        if text not in parts:
            parts.append(text)
    return "; ".join(parts)


class ArgumentParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors are one line,
    ``prog: error: <message> (see --help)``, and exit status 2, like every other ichseg error."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
