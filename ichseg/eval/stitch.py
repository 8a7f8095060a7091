"""Earlier name of :mod:`ichseg.inference.stitch` (the same module)."""

import sys

from ichseg.inference import stitch as _module

sys.modules[__name__] = _module
