"""``python -m ichseg.report``: :mod:`ichseg.cli.report` under its earlier name."""

import sys

from ichseg.cli import report as _module

if __name__ == "__main__":
    raise SystemExit(_module.main())
sys.modules[__name__] = _module
