"""``python -m ichseg.train``: :mod:`ichseg.cli.train` under its earlier name."""

import sys

from ichseg.cli import train as _module

if __name__ == "__main__":
    raise SystemExit(_module.main())
sys.modules[__name__] = _module
