"""The random state of a training process: derived per epoch from ``(seed, epoch)``, and saved
into / restored from checkpoints as plain tensors and ints (``torch.load(weights_only=True)``
reads it).

Resuming a run restores it and re-derives each epoch's state, so that a resumed run draws the same
dropout masks, shuffles and augmentations as an uninterrupted one (docs/training.md, "Resuming").
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that is a function of the integer ``keys`` only (numpy's ``SeedSequence``:
    nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy's global generator and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The random state of torch (CPU, and CUDA when initialised), numpy and python ``random``, as
    tensors, ints and lists only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a :func:`rng_state` (CUDA only when the same number of devices is visible)."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
