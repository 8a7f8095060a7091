"""Shared fixtures: small phantom datasets of both releases, generated once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ichseg.data.phantom import PhantomManifest, generate_phantom


@pytest.fixture(scope="session")
def nifti_phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    """12 NIfTI patients (049-058, 066, 067), 6-9 slices of 96x96. Treat as read-only."""
    root = tmp_path_factory.mktemp("phantom-nifti") / "ct-ich"
    return generate_phantom(root, "nifti", n_patients=12, n_slices=(6, 9), size=96, seed=3)


@pytest.fixture(scope="session")
def jpg_phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    """6 JPG patients (049-054), 8 slices of 110x110. Treat as read-only."""
    root = tmp_path_factory.mktemp("phantom-jpg") / "ct-ich"
    return generate_phantom(root, "jpg", n_patients=6, n_slices=8, size=110, seed=3)


@pytest.fixture
def nifti_copy(nifti_phantom: PhantomManifest, tmp_path: Path) -> Path:
    """A private copy of the NIfTI phantom that a test may damage."""
    return Path(shutil.copytree(nifti_phantom.root, tmp_path / "ct-ich"))


@pytest.fixture
def jpg_copy(jpg_phantom: PhantomManifest, tmp_path: Path) -> Path:
    """A private copy of the JPG phantom that a test may damage."""
    return Path(shutil.copytree(jpg_phantom.root, tmp_path / "ct-ich"))
