"""Atomic writes and the command-line error wrapper."""

import pytest

from ichseg.errors import DatasetError
from ichseg.utils import atomic_path, atomic_write_text, run_cli


def test_atomic_write_replaces_target(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_atomic_path_keeps_target_on_failure(tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_run_cli_turns_ichseg_errors_into_exit_2(capsys):
    def failing():
        raise DatasetError("/data/ct_scans/049.nii: unreadable NIfTI (bad header)")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(failing, "ichseg.tool")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "ichseg.tool: error: /data/ct_scans/049.nii: unreadable NIfTI (bad header)\n"
    assert run_cli(lambda: 7, "ichseg.tool") == 7
