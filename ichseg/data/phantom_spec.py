"""Which generated phantom a DataModule trains on, and making sure it exists before reading it.

:class:`PhantomSpec` is the ``phantom:`` block of ``conf/data/phantom.yaml``; :func:`ensure_phantom`
generates the phantom into the dataset root when the root is absent or empty (docs/phantom.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ichseg.errors import ConfigError

RELEASES: tuple[str, ...] = ("nifti", "jpg")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"phantom.{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PhantomSpec:
    """A generated CT-ICH phantom: ``release`` (nifti | jpg), ``patients``, ``slices`` per patient
    (a count or an inclusive ``(low, high)`` range), in-plane ``size`` and ``seed``."""

    release: str = "nifti"
    patients: int = 20
    slices: int | tuple[int, int] = 12
    size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.release not in RELEASES:
            raise ConfigError(f"phantom.release must be one of {', '.join(RELEASES)}")
        _positive("patients", self.patients)
        _positive("size", self.size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"phantom.seed must be an integer, got {self.seed!r}")
        slices = self.slices
        if isinstance(slices, (list, tuple)):
            if len(slices) != 2:
                raise ConfigError(f"phantom.slices must be a count or [low, high], got {slices!r}")
            low, high = (_positive("slices", s) for s in slices)
            if low > high:
                raise ConfigError(f"phantom.slices range [{low}, {high}] is empty")
            object.__setattr__(self, "slices", (low, high))
        else:
            _positive("slices", slices)

    @property
    def slice_range(self) -> tuple[int, int]:
        """``slices`` as an inclusive ``(low, high)`` range."""
        slices = self.slices
        return (slices, slices) if isinstance(slices, int) else slices

    @classmethod
    def coerce(cls, value: PhantomSpec | Mapping[str, Any] | None) -> PhantomSpec | None:
        """``value`` as a spec: None, a spec, or a mapping of its fields (as in the config)."""
        if value is None or isinstance(value, PhantomSpec):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"phantom must be a mapping of {cls.field_names()}, got {value!r}")
        unknown = sorted(set(value) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown phantom option(s) {unknown}; known: {cls.field_names()}")
        return cls(**dict(value))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def ensure_phantom(
    root: str | os.PathLike[str], spec: PhantomSpec | None, progress: bool | None = None
) -> bool:
    """Generate the phantom ``spec`` into ``root`` when ``root`` is absent or empty; True when it
    generated one. Nothing happens without a spec or when ``root`` holds files."""
    if spec is None:
        return False
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        return False
    from ichseg.data.phantom import generate_phantom

    print(f"[ichseg.data] generating the phantom dataset into {root}", file=sys.stderr)
    generate_phantom(
        root,
        release=spec.release,
        n_patients=spec.patients,
        n_slices=spec.slice_range,
        size=spec.size,
        seed=spec.seed,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    return True


def check_data_root(root: str | os.PathLike[str], phantom: object = None) -> None:
    """Fail early, with what to do, when the dataset root is missing (and no phantom is asked)."""
    root = Path(str(root))
    if phantom is None and not root.exists():
        raise ConfigError(
            f"{root}: CT-ICH dataset not found; "
            "download it from https://physionet.org/content/ct-ich/ "
            "(README, 'The data') and pass data.root=PATH or set ICHSEG_DATA, "
            "or train on the generated phantom with data=phantom (or experiment=demo)"
        )
