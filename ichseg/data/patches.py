"""Earlier name of :mod:`ichseg.data.tiles` (the same module)."""

import sys

from ichseg.data import tiles as _module

sys.modules[__name__] = _module
