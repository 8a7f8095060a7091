"""The package's shape: which stage may import what, and how large a module or function may grow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ichseg"
#: Stages that know nothing of Lightning or Hydra.
PLAIN_STAGES = ("data", "models", "baselines", "inference", "eval")
FORBIDDEN = ("pytorch_lightning", "lightning", "hydra", "omegaconf")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def is_alias(path: Path) -> bool:
    """A module kept at an earlier path for one release: it replaces itself by the module it
    names, or its docstring begins "Earlier name" / "Earlier home" and it re-exports."""
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text)) or ""
    return "sys.modules[__name__] =" in text or doc.startswith(("Earlier name", "Earlier home"))


def modules_of(stage: str) -> list[str]:
    """Every importable, non-alias module of ``ichseg.<stage>``."""
    names = []
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        if path.name == "__main__.py" or is_alias(path):
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_by(modules: list[str]) -> set[str]:
    """Top-level names in ``sys.modules`` after importing ``modules`` in a fresh interpreter."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return set(result.stdout.split())


@pytest.mark.parametrize("stage", PLAIN_STAGES)
def test_plain_stages_import_neither_lightning_nor_hydra(stage: str) -> None:
    modules = modules_of(stage)
    assert modules, stage
    loaded = imported_by(modules)
    assert not loaded & set(FORBIDDEN), (stage, sorted(loaded & set(FORBIDDEN)))


def _ichseg_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("ichseg.")}


@pytest.mark.parametrize(("stage", "other"), [("models", "data"), ("data", "models")])
def test_models_and_data_never_import_each_other(stage: str, other: str) -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(i for i in _ichseg_imports(path)
                                               if i.startswith(f"ichseg.{other}"))
        for path in (PACKAGE / stage).rglob("*.py")
    }  # fmt: skip
    assert not {k: v for k, v in offenders.items() if v}


def test_only_lit_imports_lightning_and_only_cli_imports_hydra() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if is_alias(path):
            continue
        package = path.relative_to(PACKAGE).parts[0]
        for name in _top_level_imports(path):
            if name in ("pytorch_lightning", "lightning") and package not in ("lit", "cli"):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
            if name in ("hydra", "omegaconf") and package != "cli":
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
    return names


def test_no_module_over_500_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert not {k: n for k, n in sizes.items() if n > MAX_MODULE_LINES}


def test_no_function_over_80_lines() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


def test_every_module_says_what_it_is_for() -> None:
    missing = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing, missing
