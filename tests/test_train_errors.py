"""Every failure a user can cause in ``python -m ichseg.train`` is one line on stderr,
``ichseg.train: error: ...``, exit status 2, no traceback, and no run folder of a run that never
started (docs/training.md, "When something is wrong")."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write
from test_train import TINY

from ichseg.cli import train as train_cli
from ichseg.errors import ConfigError
from ichseg.train import check_splits_file, compose_config, share_splits_in_sweep


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in ``tmp_path`` with every output (phantom, runs, cache) under ``tmp_path/out``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ICHSEG_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.delenv("ICHSEG_CACHE", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return tmp_path


def run_train(monkeypatch, capsys, *arguments: str) -> tuple[int, str, str]:
    """``python -m ichseg.train ARGUMENTS`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ichseg.train", *arguments])
    code = 0
    try:
        train_cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(monkeypatch, capsys, *arguments: str) -> str:
    """The one error line of a refused command line (asserting it is the only line)."""
    code, _, err = run_train(monkeypatch, capsys, *arguments)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("ichseg.train: error: ")
    return lines[0]


def no_run_folders(workdir: Path) -> bool:
    runs = workdir / "out" / "train" / "runs"
    return not runs.exists() or not any(runs.iterdir())


# ------------------------------------------------------------------ 1. wrong types at compose time


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.fold=abc", "data.fold"),
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("model.optimizer.lr=abc", "model.optimizer.lr"),
        ("seed=abc", "seed"),
        ("train=maybe", "train"),
        ("ckpt_path=5", "ckpt_path"),
    ],
)
def test_a_wrong_type_is_one_line_before_any_folder(workdir, monkeypatch, capsys, override, named):
    line = error_line(monkeypatch, capsys, "experiment=demo", override)
    assert f"error: {named}: " in line and "expects" in line
    assert not (workdir / "out").exists()


# ------------------------------------------------------------------ 2. errors of a constructor


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.batch_size=0", "data.batch_size=0: the batch size must be positive"),
        ("data.window=512", "512-pixel tile"),
    ],
)
def test_a_constructor_error_wrapped_by_hydra_is_one_line(
    workdir, monkeypatch, capsys, override, words
):
    line = error_line(monkeypatch, capsys, "experiment=demo", override)
    assert words in line and "InstantiationException" not in line
    assert no_run_folders(workdir)  # Hydra's folder of the run that never started is removed


# ------------------------------------------------------------------ 3. Hydra's own composition


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("foo=1", "foo: no such key in the config"),
        ("data.foo=1", "data.foo: no such key in the config"),
        ("model=nope", "Could not find 'model/nope'"),
    ],
)
def test_an_unknown_key_or_option_is_one_line(workdir, monkeypatch, capsys, override, words):
    line = error_line(monkeypatch, capsys, "experiment=demo", override)
    assert words in line
    assert not (workdir / "out").exists()


def test_an_unknown_key_in_a_multirun_is_one_line(workdir, monkeypatch, capsys):
    line = error_line(monkeypatch, capsys, "-m", "experiment=demo", "data.fold=0,1", "data.fo=1")
    assert "data.fo: no such key" in line
    assert not (workdir / "out").exists()


def test_compose_config_raises_config_error():
    with pytest.raises(ConfigError, match=r"^foo: no such key in the config"):
        compose_config(["foo=1"])
    with pytest.raises(ConfigError, match=r"Could not find 'model/nope'"):
        compose_config(["model=nope"])


def test_cfg_job_and_help_still_work(workdir, monkeypatch, capsys):
    code, out, err = run_train(monkeypatch, capsys, "experiment=demo", "--cfg", "job")
    assert code == 0 and "CTICHDataModule" in out, err
    code, out, _ = run_train(monkeypatch, capsys, "--help")
    assert code == 0 and "Powered by Hydra" in out
    assert not (workdir / "out").exists()


# ------------------------------------------------------------------ 4. unusable checkpoint files


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["random", "malicious"])
def test_an_unusable_checkpoint_is_one_line(workdir, monkeypatch, capsys, kind):
    ckpt = workdir / f"{kind}.ckpt"
    marker = workdir / "payload-ran"
    if kind == "random":
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save({"state_dict": {}, "evil": _Payload(marker)}, ckpt, pickle_protocol=2)
    line = error_line(monkeypatch, capsys, "experiment=demo", f"ckpt_path={ckpt}")
    assert str(ckpt) in line and ("not a PyTorch checkpoint" in line or "refuses" in line)
    assert not marker.exists()
    assert no_run_folders(workdir)


def test_the_malicious_payload_would_run_with_a_plain_pickle(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # noqa: S301 - proves the test file is armed
    assert marker.exists()


# ------------------------------------------------------------------ 5. unwritable output folders


def test_an_output_folder_under_a_file_is_one_line(workdir, monkeypatch, capsys):
    blocker = workdir / "a-file"
    blocker.write_text("")
    line = error_line(monkeypatch, capsys, "experiment=demo", f"paths.log_dir={blocker}/logs")
    assert str(blocker) in line and "is not a folder" in line and "paths.log_dir" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_an_unwritable_output_folder_is_one_line(workdir, monkeypatch, capsys):
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = error_line(monkeypatch, capsys, "experiment=demo", f"paths.log_dir={locked}/logs")
    finally:
        locked.chmod(0o700)
    assert str(locked) in line and "permission denied" in line
    assert not (locked / "logs").exists()


# ------------------------------------------------------------------ 6. no GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("override", ["trainer.accelerator=gpu", "trainer=gpu", "trainer=ddp"])
def test_a_gpu_without_one_is_one_line(workdir, monkeypatch, capsys, override):
    line = error_line(monkeypatch, capsys, "experiment=demo", override)
    assert "no GPU is available" in line and "trainer=cpu" in line
    assert no_run_folders(workdir)


# ------------------------------------------------------------------ 7. an earlier run's folder


@pytest.mark.parametrize("earlier", ["checkpoints", ".hydra", "report.md", "events.out.tfevents.1"])
def test_an_earlier_run_is_not_overwritten(workdir, monkeypatch, capsys, earlier):
    run = workdir / "run"
    (run / earlier).parent.mkdir(parents=True, exist_ok=True)
    if earlier in ("checkpoints", ".hydra"):
        (run / earlier).mkdir()
        (run / earlier / "keep").write_text("earlier")
    else:
        (run / earlier).write_text("earlier")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    line = error_line(monkeypatch, capsys, "experiment=demo", f"hydra.run.dir={run}")
    assert str(run) in line and "ckpt_path=last" in line and "hydra.run.dir" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_resuming_needs_the_last_checkpoint(workdir, monkeypatch, capsys):
    run = workdir / "run"
    line = error_line(
        monkeypatch, capsys, "experiment=demo", f"hydra.run.dir={run}", "ckpt_path=last"
    )
    assert "checkpoints/last.ckpt: checkpoint to resume from does not exist" in line
    assert not run.exists()


def test_a_multirun_job_folder_of_an_earlier_run_is_refused(workdir, monkeypatch, capsys):
    sweep = workdir / "sweep"
    (sweep / "1" / "checkpoints").mkdir(parents=True)
    line = error_line(
        monkeypatch, capsys, "-m", "experiment=demo", "data.fold=0,1", f"hydra.sweep.dir={sweep}"
    )
    assert str(sweep / "1") in line and "hydra.sweep.dir" in line
    assert sorted(p.name for p in sweep.iterdir()) == ["1"]


def test_a_run_folder_is_resumed_only_with_ckpt_path_last(workdir, monkeypatch, capsys):
    run = workdir / "run"
    code, _, err = run_train(monkeypatch, capsys, "experiment=demo", *TINY, f"hydra.run.dir={run}")
    assert code == 0, err
    assert (run / "checkpoints" / "last.ckpt").is_file()
    line = error_line(monkeypatch, capsys, "experiment=demo", *TINY, f"hydra.run.dir={run}")
    assert "holds an earlier run" in line
    more = [o for o in TINY if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=2"]
    code, _, err = run_train(
        monkeypatch, capsys, "experiment=demo", *more, f"hydra.run.dir={run}", "ckpt_path=last"
    )
    assert code == 0, err
    meta = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert meta["epoch"] == 1  # the second epoch, resumed


# ------------------------------------------------------------------ 8. a given splits file


def test_a_given_splits_file_must_exist(workdir, monkeypatch, capsys):
    missing = workdir / "splts.json"
    line = error_line(monkeypatch, capsys, "experiment=demo", f"data.splits_file={missing}")
    assert f"data.splits_file: {missing} does not exist" in line
    assert not missing.exists() and no_run_folders(workdir)


def test_the_splits_file_shared_in_a_sweep_may_not_exist_yet(tmp_path):
    cfg = compose_config(["experiment=demo"], output_dir=tmp_path / "sweep" / "0")
    hydra = HydraConfig.get()
    with read_write(hydra), open_dict(hydra):
        hydra.mode = "MULTIRUN"
        hydra.sweep.dir = str(tmp_path / "sweep")
    try:
        share_splits_in_sweep(cfg)
        assert cfg.data.splits_file == str(tmp_path / "sweep" / "splits.json")
        check_splits_file(cfg)  # the first job writes it
        with open_dict(cfg):
            cfg.data.splits_file = str(tmp_path / "typo.json")
        with pytest.raises(ConfigError, match="data.splits_file: .*typo.json does not exist"):
            check_splits_file(cfg)
    finally:
        with read_write(hydra):
            hydra.mode = "RUN"


# ------------------------------------------------------------------ 9. validation without ICH


def test_a_validation_fold_without_ich_is_refused_before_training(workdir, monkeypatch, capsys):
    from ichseg.data import open_dataset
    from ichseg.data.folds import CVRound, save_splits
    from ichseg.data.phantom import generate_phantom

    root = workdir / "phantom"
    generate_phantom(root, n_patients=9, n_slices=6, size=64, seed=0)
    dataset = open_dataset(root)
    ich = dataset.patient_labels()[:, 0]
    ids = list(dataset.patient_ids)
    free = [p for p, has in zip(ids, ich, strict=True) if not has]
    sick = [p for p, has in zip(ids, ich, strict=True) if has]
    assert free and len(sick) >= 2
    rounds = [
        CVRound(0, tuple(sick[1:] + free[1:]), (free[0],), (sick[0],)),
        CVRound(1, tuple(sick[:1] + free[1:]), tuple(sick[1:]), (free[0],)),
    ]
    splits = workdir / "splits.json"
    save_splits(splits, rounds)
    run = workdir / "run"
    line = error_line(
        monkeypatch, capsys, "experiment=demo", *TINY, "data.k=2", f"data.root={root}",
        f"data.splits_file={splits}", "data.fold=0", "data.cache_dir=null", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert "data.fold=0" in line and "none of the 1 validation patients" in line
    assert not run.exists()  # nothing logged, no checkpoint: the run never started


# ------------------------------------------------------------------ 10. a phantom at a typo


def test_a_phantom_is_not_generated_at_a_mistyped_root(workdir, monkeypatch, capsys):
    typo = workdir / "out" / "phantm"
    line = error_line(monkeypatch, capsys, "experiment=demo", f"data.root={typo}")
    assert f"data.root: {typo} does not exist" in line
    assert not typo.exists() and no_run_folders(workdir)


def test_a_ddp_child_process_runs_in_the_first_ones_folder(workdir, monkeypatch):
    run = workdir / "run"
    (run / ".hydra").mkdir(parents=True)  # written by the first process just before
    monkeypatch.setenv("LOCAL_RANK", "1")
    train_cli.check_command_line(["experiment=demo", f'hydra.run.dir="{run}"'])
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="holds an earlier run"):
        train_cli.check_command_line(["experiment=demo", f'hydra.run.dir="{run}"'])


def test_a_folder_without_write_permission_is_refused(workdir, monkeypatch):
    """As root the chmod test above cannot run: the permission answer is faked for one folder."""
    from ichseg.cli import train_checks

    locked = workdir / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        train_checks.os,
        "access",
        lambda path, mode: Path(path) != locked and real_access(path, mode),
    )
    with pytest.raises(ConfigError, match="cannot create it in .*locked \\(permission denied\\)"):
        train_cli.check_command_line(["experiment=demo", f"paths.log_dir={locked}/logs"])
    assert not (locked / "logs").exists()
