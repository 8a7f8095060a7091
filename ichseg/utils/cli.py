"""Turn ichseg errors into one clear line on stderr and exit status 2 in command-line tools."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

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
