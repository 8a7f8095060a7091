"""Earlier name of :mod:`ichseg.lit.segmentation` (the same module)."""

import sys

from ichseg.lit import segmentation as _module

sys.modules[__name__] = _module
