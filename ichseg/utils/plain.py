"""Plain data: configs and metadata reduced to JSON-like values (dicts, lists, str, int, float,
bool, None), as stored in checkpoints so that they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["to_plain"]


def to_plain(value: Any) -> Any:
    """``value`` as plain data: mappings become dicts with ``str`` keys, other non-string sequences
    (lists, tuples, OmegaConf ``ListConfig``) lists; ``None``, bools, ints, finite floats and
    strings stay; non-finite floats and anything else (paths, enums, ...) become ``str(value)``."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [to_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
