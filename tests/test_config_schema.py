"""The composed config is checked against the constructors it instantiates (ichseg.cli.schema)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ichseg.cli.schema import check_config
from ichseg.cli.train import compose_config
from ichseg.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("data", ["ctich", "phantom"])
def test_every_experiment_passes_the_check(experiment: str, data: str) -> None:
    cfg = compose_config([f"experiment={experiment}", f"data={data}"])
    check_config(cfg)  # compose_config checks too; called again so a failure names this test
    assert cfg.data._target_ and cfg.model._target_


@pytest.mark.parametrize(
    "group", ["model", "trainer", "logger", "callbacks", "debug"], ids=lambda g: g
)
def test_every_option_of_a_group_passes_the_check(group: str) -> None:
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        check_config(compose_config([f"{group}={option}"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+data.windw=32", "data.windw: not an argument of"),
        ("data.fold=two", "data.fold: ichseg"),
        ("+trainer.max_epoch=3", "trainer.max_epoch: not an argument of pytorch_lightning.Trainer"),
        ("model.net.depth=2.5", "model.net.depth: ichseg"),
        ("++callbacks.stitched_eval.inference.blnd=gaussian", "not a field of InferenceSpec"),
        ("++callbacks.stitched_eval.inference.tile_batch_size=many", "expects int, got 'many'"),
        ("model.net._target_=ichseg.models.NoSuchNet", "model.net._target_: cannot import"),
    ],
)
def test_a_wrong_key_or_type_fails_at_compose_time_in_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(["experiment=demo", override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_a_close_key_is_suggested() -> None:
    with pytest.raises(ConfigError, match=r"did you mean max_epochs\?"):
        compose_config(["+trainer.max_epoch=3"])


def test_plain_mappings_are_checked_without_hydra() -> None:
    node = {"model": {"_target_": "ichseg.models.UNet", "in_channels": 1, "base_filter": 4}}
    with pytest.raises(ConfigError, match=r"model.base_filter: .*did you mean base_filters"):
        check_config(node)
    check_config({"model": {"_target_": "ichseg.models.UNet", "in_channels": "${x}"}})
