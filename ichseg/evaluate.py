"""``python -m ichseg.evaluate``: :mod:`ichseg.cli.evaluate` under its earlier name."""

import sys

from ichseg.cli import evaluate as _module

if __name__ == "__main__":
    raise SystemExit(_module.main())
sys.modules[__name__] = _module
