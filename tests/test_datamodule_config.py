"""conf/data/ctich.yaml lists the DataModule's constructor arguments, one key each; the other data
configs and the experiments only change their values."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from ichseg.lit.datamodule import CTICHDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def constructor_arguments() -> set[str]:
    return set(inspect.signature(CTICHDataModule.__init__).parameters) - {"self"}


def data_keys(path: Path) -> set[str]:
    return set(yaml.safe_load(path.read_text())) - {"_target_", "defaults"}


def test_the_data_config_lists_every_constructor_argument_once() -> None:
    text = (CONF / "data" / "ctich.yaml").read_text()
    keys = [line.split(":")[0] for line in text.splitlines() if line and line[0].isalpha()]
    assert len(keys) == len(set(keys))
    assert set(keys) - {"_target_"} == constructor_arguments()
    assert yaml.safe_load(text)["_target_"] == "ichseg.lit.datamodule.CTICHDataModule"


@pytest.mark.parametrize(
    "path",
    [CONF / "data" / "phantom.yaml", *sorted((CONF / "experiment").glob("*.yaml"))],
    ids=lambda p: p.name,
)
def test_other_configs_only_change_values(path: Path) -> None:
    if path.parent.name == "data":
        keys = data_keys(path)
    else:
        keys = set((yaml.safe_load(path.read_text()) or {}).get("data") or {})
    assert keys <= data_keys(CONF / "data" / "ctich.yaml")


def test_the_earlier_target_still_resolves() -> None:
    from hydra.utils import get_class

    assert get_class("ichseg.data.CTICHDataModule") is CTICHDataModule
    assert get_class("ichseg.data.datamodule.CTICHDataModule") is CTICHDataModule
