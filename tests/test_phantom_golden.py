"""The phantom's output for fixed seeds, held byte for byte (checksums of tiny phantoms).

The checksums were taken from the generator before it became a package; a change here means the
phantom of a given seed no longer writes the same files. (The JPG release's checksum also depends
on the JPEG encoder of the installed Pillow.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from ichseg.data.ctich import SUBTYPES
from ichseg.data.layout import PHANTOM_MARKER
from ichseg.data.phantom import (
    BONE_WINDOW,
    BRAIN_WINDOW,
    _window_u8,
    generate_phantom,
    make_head_volume,
    plan,
)
from ichseg.data.windowing import WINDOWS, apply_window

TREE_SHA256 = {
    "nifti": "8684f261db9467c024a82bed843623ffdbe58546e1772f3639c6cf3bc83f26c4",
    "jpg": "72b583a7c0c9f6762d711b61bc0d438f7166182ad85c168b7bc67e4fca3b8b3a",
}
VOLUME_SHA256 = "fb8fa86e331a942971d0dca6f8acb23d7c0d9d84b159a15934d53465fd4efef2"


def tree_sha256(root: Path) -> str:
    """One sha256 over the relative path and bytes of every file under ``root``, in path order,
    but the marker (it holds the ichseg version; tests/test_phantom.py checks its content)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != PHANTOM_MARKER:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("release", ["nifti", "jpg"])
def test_tiny_phantom_files_are_unchanged(tmp_path: Path, release: str) -> None:
    generate_phantom(tmp_path / release, release, n_patients=3, n_slices=(4, 6), size=64, seed=5)
    assert tree_sha256(tmp_path / release) == TREE_SHA256[release]


def test_head_volume_of_a_fixed_seed_is_unchanged() -> None:
    hu, mask, labels = make_head_volume(
        np.random.default_rng(3),
        6,
        96,
        with_ich=True,
        spacing_mm=2.4,
        subtypes=("SDH", "IVH", "IPH", "SAH", "EDH"),
        fracture=True,
        calcifications=True,
    )
    digest = hashlib.sha256()
    for array in (
        hu,
        mask,
        *(labels[k] for k in ("subtypes", "fracture", "tissue", "subtype_map")),
    ):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest() == VOLUME_SHA256


@pytest.mark.parametrize("name", sorted(WINDOWS))
def test_jpg_windows_equal_the_earlier_phantom_formula(name: str) -> None:
    """The JPG images go through apply_window; it equals the phantom's earlier formula on every
    int16 HU value, for every window."""
    hu = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    level, width = WINDOWS[name].level, WINDOWS[name].width
    earlier = np.clip(np.rint((hu - (level - width / 2)) / width * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(apply_window(hu, name, np.uint8), earlier)
    np.testing.assert_array_equal(_window_u8(hu, level, width), earlier)


def test_phantom_subtypes_are_the_datasets() -> None:
    assert set(plan._PRIMARY_WEIGHTS) == set(SUBTYPES)
    assert {s for subtypes, _, _ in plan._FIXED_PLANS.values() for s in subtypes} <= set(SUBTYPES)
    assert BRAIN_WINDOW == (40.0, 120.0) and BONE_WINDOW == (700.0, 3200.0)
