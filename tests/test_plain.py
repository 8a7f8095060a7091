"""to_plain: configs and metadata reduced to plain data that torch.load(weights_only=True) reads."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ichseg.utils.plain import to_plain


def test_to_plain_reduces_containers_and_odd_values(tmp_path):
    cfg = OmegaConf.create({"net": {"channels": ["brain", "bone"], "depth": 4}, "lr": 1e-3})
    value = {
        "cfg": cfg,
        1: (True, None, 2, "x"),
        "path": Path("/a/b"),
        "nan": math.nan,
        "inf": -math.inf,
        "nested": [{"k": (1.5,)}],
    }
    plain = to_plain(value)
    assert plain == {
        "cfg": {"net": {"channels": ["brain", "bone"], "depth": 4}, "lr": 1e-3},
        "1": [True, None, 2, "x"],
        "path": "/a/b",
        "nan": "nan",
        "inf": "-inf",
        "nested": [{"k": [1.5]}],
    }
    assert type(plain["cfg"]) is dict and type(plain["cfg"]["net"]["channels"]) is list
    torch.save({"ichseg": plain}, tmp_path / "meta.pt")
    assert torch.load(tmp_path / "meta.pt", weights_only=True)["ichseg"] == plain
