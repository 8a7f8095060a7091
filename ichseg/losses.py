"""Earlier name of :mod:`ichseg.models.losses` (the same module)."""

import sys

from ichseg.models import losses as _module

sys.modules[__name__] = _module
