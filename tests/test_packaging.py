"""The package metadata lists every subpackage, and conf/ ships inside the package as
ichseg.conf.
"""

import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def declared_packages() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["tool"]["setuptools"]["packages"])


def test_every_subpackage_is_declared():
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "ichseg").rglob("__init__.py")
    }
    assert found | {"ichseg.conf"} == declared_packages()


def test_conf_is_importable_as_a_package_resource():
    conf = importlib.resources.files("ichseg.conf")
    assert conf.joinpath("paths", "default.yaml").is_file()


def test_dependencies_are_ranges_except_albumentations():
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    pinned = [d for d in deps if "==" in d]
    assert pinned == ["albumentations==2.0.8"]
    assert any(d.startswith("torch") and "==" not in d for d in deps)


@pytest.mark.slow
def test_wheel_contains_configs_and_all_modules(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the checkout")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("ichseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ichseg/conf/paths/default.yaml" in names
    for path in (ROOT / "conf").rglob("*.yaml"):
        assert f"ichseg/conf/{path.relative_to(ROOT / 'conf').as_posix()}" in names
    for path in (ROOT / "ichseg").rglob("*.py"):
        assert f"ichseg/{path.relative_to(ROOT / 'ichseg').as_posix()}" in names
