"""The visual QA of a prediction run: contact sheets (ichseg.inference.qa.qa_sheet) and the static
index.html, including a headless-Chromium check that the page's script runs and sorts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ichseg.inference import qa
from ichseg.inference.qa import QARow, qa_sheet, write_qa_index, write_qa_sheet

SPACING = (0.5, 0.5, 5.0)
HEAD_HU, BLEED_HU = 30, 70  # grey 106 and 191 in the brain window
SIZE = 64


def _volume(bleed_slices: tuple[int, ...], n_slices: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A 64x64xN int16 'head' (an ellipse of HU 30 in air) with an 8x8 'bleed' (HU 70) on
    ``bleed_slices``; the mask is exactly the bleed."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    head = ((rows - 32) / 28.0) ** 2 + ((cols - 32) / 24.0) ** 2 < 1
    hu = np.where(head, HEAD_HU, -1000).astype(np.int16)[:, :, None].repeat(n_slices, axis=2)
    mask = np.zeros(hu.shape, dtype=bool)
    for k in bleed_slices:
        mask[20:28, 36:44, k] = True
    hu[mask] = BLEED_HU
    return hu, mask


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _grey_between(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    return grey & (rgb[..., 0] >= low) & (rgb[..., 0] <= high)


def _thumbnails(image: Image.Image) -> int:
    """Thumbnails on a sheet: connected regions of head grey larger than any text glyph."""
    labels, count = ndimage.label(_grey_between(_pixels(image), 96, 116))
    sizes = np.bincount(labels.ravel())[1:]
    return int(np.count_nonzero(sizes > 2000))


def _contour(image: Image.Image) -> np.ndarray:
    return np.all(_pixels(image) == np.array(qa.CONTOUR_COLOUR), axis=-1)


# --------------------------------------------------------------------------- the sheet


def test_sheet_is_rgb_and_grows_with_the_ich_slices() -> None:
    sizes = []
    for bleed in [(3,), (1, 2, 3, 4), (0, 1, 2, 3, 4, 5, 6)]:
        hu, mask = _volume(bleed)
        sheet = qa_sheet(hu, mask, SPACING, "049")
        assert sheet.mode == "RGB"
        assert _thumbnails(sheet) == len(bleed)
        sizes.append(sheet.size)
    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]
    assert widths == sorted(widths) and widths[0] < widths[1]  # more columns
    assert heights[1] < heights[2]  # 7 slices need a second row of 4
    assert sizes[0][0] >= 2 * qa.THUMB_WIDTH  # a single slice still leaves room for the title


def test_contour_outlines_only_the_bleed() -> None:
    bleed = (2, 3, 5)
    hu, mask = _volume(bleed)
    sheet = qa_sheet(hu, mask, SPACING, "049")
    contour = _contour(sheet)
    assert contour.sum() > 100
    # one closed outline per thumbnail, each around a bright bleed interior
    _, outlines = ndimage.label(contour, structure=np.ones((3, 3)))
    assert outlines == len(bleed)
    bleed_pixels = _grey_between(_pixels(sheet), 180, 200)
    distance = ndimage.distance_transform_edt(~bleed_pixels)
    assert distance[contour].max() <= qa.CONTOUR_WIDTH + 1
    # and nothing bright-yellow appears without a mask
    empty = qa_sheet(hu, np.zeros_like(mask), SPACING, "049")
    assert not _contour(empty).any()


def test_contour_follows_the_mask_not_the_image() -> None:
    hu, mask = _volume(())
    mask[40:48, 10:18, 4] = True  # a predicted region where the image is plain head
    sheet = qa_sheet(hu, mask, SPACING, "049")
    contour = _contour(sheet)
    ys, xs = np.nonzero(contour)
    # 8 voxels -> 32 thumbnail pixels across; the outline's box is the mask's, scaled by 4
    assert ys.max() - ys.min() + 1 == 32 and xs.max() - xs.min() + 1 == 32


def test_no_ich_shows_four_evenly_spaced_slices() -> None:
    hu, mask = _volume((), n_slices=20)
    sheet = qa_sheet(hu, mask, SPACING, "050")
    assert _thumbnails(sheet) == 4
    assert not _contour(sheet).any()
    chosen = qa._choose_slices(np.zeros(20, dtype=np.int64), qa.MAX_SLICES)
    assert chosen.tolist() == [4, 8, 11, 15]
    assert qa._caption(4, 20, 0, SPACING, None) == ["slice 5 / 20", "no ICH predicted"]
    # fewer slices than four: each shown once
    hu, mask = _volume((), n_slices=2)
    assert _thumbnails(qa_sheet(hu, mask, SPACING, "tiny")) == 2


def test_many_ich_slices_are_capped_to_the_largest_in_slice_order() -> None:
    areas = np.zeros(40, dtype=np.int64)
    areas[5:35] = np.arange(1, 31)  # 30 ICH slices, growing
    areas[6] = 1000  # one early big slice
    chosen = qa._choose_slices(areas, 24)
    assert len(chosen) == 24
    assert chosen.tolist() == sorted(chosen.tolist())
    assert chosen.tolist() == [6, *range(12, 35)]  # the big one and the 23 largest others
    # the sheet of 30 ICH slices is exactly as big as that of 24: the rest are left out
    hu, mask = _volume(tuple(range(30)), n_slices=34)
    capped = qa_sheet(hu, mask, SPACING, "cap")
    hu24, mask24 = _volume(tuple(range(24)), n_slices=34)
    assert capped.size == qa_sheet(hu24, mask24, SPACING, "cap").size
    assert _thumbnails(capped) == qa.MAX_SLICES


def test_caption_area_and_volume() -> None:
    # 400 pixels of 0.5 x 0.5 mm = 1 cm²; x 5 mm slices = 0.5 mL
    assert qa._caption(11, 34, 400, SPACING, None) == ["slice 12 / 34", "1.00 cm² · 0.50 mL"]
    assert qa._caption(0, 34, 400, SPACING, 0.873)[1].endswith("· p 0.87")


def test_orientation_anterior_up() -> None:
    """A marker at a high index of axis 1 (anterior) is on the right as-is, at the top after
    np.rot90(., 1), and at the top of the sheet's thumbnail; axis-0 index 0 is on the left."""
    hu = np.full((SIZE, SIZE, 4), HEAD_HU, dtype=np.int16)
    hu[2:10, 52:62, :] = BLEED_HU  # low axis 0, high axis 1
    as_is = hu[:, :, 0] == BLEED_HU
    rows, cols = np.nonzero(as_is)
    assert cols.min() > SIZE // 2 and rows.max() < SIZE // 2  # right (and top) as-is
    rows, cols = np.nonzero(np.rot90(as_is, 1))
    assert rows.max() < SIZE // 4 and cols.max() < SIZE // 4  # top-left after rot90

    sheet = qa_sheet(hu, np.zeros(hu.shape, dtype=bool), SPACING, "orient")
    rgb = _pixels(sheet)
    labels, _ = ndimage.label(_grey_between(rgb, 96, 116))
    first = ndimage.find_objects(labels)[int(np.argmax(np.bincount(labels.ravel())[1:]))]
    tile_rows, tile_cols = first
    marker = _grey_between(rgb[first], 180, 200)
    ys, xs = np.nonzero(marker)
    height = tile_rows.stop - tile_rows.start
    width = tile_cols.stop - tile_cols.start
    assert ys.size > 0
    assert ys.max() < height // 4 and xs.max() < width // 4


def test_probabilities_and_bad_inputs() -> None:
    hu, mask = _volume((3,))
    probs = np.where(mask, 0.9, 0.1)
    assert qa_sheet(hu, mask, SPACING, "p", probabilities=probs).mode == "RGB"
    with pytest.raises(ValueError, match="mask shape"):
        qa_sheet(hu, mask[:, :, :4], SPACING, "x")
    with pytest.raises(ValueError, match="probabilities shape"):
        qa_sheet(hu, mask, SPACING, "x", probabilities=probs[:10])
    with pytest.raises(ValueError, match="spacing_mm"):
        qa_sheet(hu, mask, (0.5, 0.5), "x")
    with pytest.raises(ValueError, match="spacing_mm"):
        qa_sheet(hu, mask, (0.5, 0.0, 5.0), "x")


def test_write_qa_sheet_is_atomic_png(tmp_path: Path) -> None:
    hu, mask = _volume((2, 3))
    target = tmp_path / "qa" / "049_qa.png"
    write_qa_sheet(hu, mask, SPACING, "049", target)
    with Image.open(target) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == qa_sheet(hu, mask, SPACING, "049").size
    assert [p.name for p in target.parent.iterdir()] == ["049_qa.png"]


# --------------------------------------------------------------------------- the index


def _rows() -> list[QARow]:
    def row(name: str, volume: float, interval, components: int, ich: int) -> QARow:
        return QARow(
            name=name,
            volume_ml=volume,
            interval_ml=interval,
            largest_component_ml=volume * 0.8,
            components=components,
            ich_slices=ich,
            slices=30,
            sheet=f"qa/{name}_qa.png",
            mask=f"{name}_ich.nii.gz",
        )

    return [
        row("beta", 3.5, None, 1, 4),
        row("<x>&", 12.25, (10.2, 14.1), 3, 9),
        row("alpha", 0.0, None, 0, 0),
        row("Delta", 40.125, (38.0, 41.5), 2, 15),
        row("gamma", 7.0, (6.5, 8.25), 5, 6),
    ]


class _Rows(HTMLParser):
    """data-name of each <tr> in the table's body, in document order (unescaped)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.volumes: list[float] = []
        self.sorted: str | None = None
        self.refs: list[str] = []
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("src", "href"):
            if values.get(key) is not None:
                self.refs.append(values[key] or "")
        if tag == "table" and values.get("id") == "qa-table":
            self.sorted = values.get("data-sorted")
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.names.append(values["data-name"] or "")
            self.volumes.append(float(values["data-volume"] or "nan"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False


def _parse(text: str) -> _Rows:
    parser = _Rows()
    parser.feed(text)
    parser.close()
    return parser


BY_VOLUME = ["Delta", "<x>&", "gamma", "beta", "alpha"]


def test_index_lists_every_row_sorted_by_volume(tmp_path: Path) -> None:
    target = tmp_path / "index.html"
    write_qa_index(_rows(), target, title="run <1>", note="fold 0 & 1")
    text = target.read_text(encoding="utf-8")
    parsed = _parse(text)
    assert parsed.names == BY_VOLUME
    assert parsed.volumes == sorted(parsed.volumes, reverse=True)
    assert parsed.sorted == "-volume"
    assert 'id="qa-table"' in text
    assert "<title>run &lt;1&gt;</title>" in text and "fold 0 &amp; 1" in text
    assert "40.13" in text or "40.12" in text  # two decimals
    assert "10.2 – 14.1" in text and ">–</td>" in text
    assert "9 / 30" in text
    assert 'loading="lazy"' in text and "max-height" in text
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]


def test_index_escapes_names(tmp_path: Path) -> None:
    target = tmp_path / "index.html"
    write_qa_index(_rows(), target)
    text = target.read_text(encoding="utf-8")
    assert "<x>&" not in text
    assert "&lt;x&gt;&amp;" in text
    assert 'data-name="&lt;x&gt;&amp;"' in text
    # the link to its sheet is percent-encoded, then escaped
    assert 'href="qa/%3Cx%3E%26_qa.png"' in text


def test_index_has_no_external_resources(tmp_path: Path) -> None:
    target = tmp_path / "index.html"
    write_qa_index(_rows(), target)
    text = target.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    refs = _parse(text).refs
    assert refs and not [r for r in refs if r.startswith("//") or ":" in r.split("/")[0]]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*//""", text)
    assert "<link" not in text and "<script src" not in text and "@import" not in text
    with pytest.raises(ValueError, match="relative"):
        write_qa_index([QARow("x", 1.0, None, 1.0, 1, 1, 1, "https://x/a.png", "m")], target)
    with pytest.raises(ValueError, match="relative"):
        write_qa_index([QARow("x", 1.0, None, 1.0, 1, 1, 1, "/abs/a.png", "m")], target)


def test_index_of_no_rows(tmp_path: Path) -> None:
    target = tmp_path / "index.html"
    write_qa_index([], target)
    assert _parse(target.read_text(encoding="utf-8")).names == []


# --------------------------------------------------------------------------- in a browser

_BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_INSTALL_BUDGET_S = 600.0


def _find_browser() -> str | None:
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless-capable Chromium: found on PATH, else installed once with apt-get when running
    as root; the test is skipped (with the reason) when neither works."""
    found = _find_browser()
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not on PATH and cannot be installed (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + _INSTALL_BUDGET_S
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    attempts = [install, ["apt-get", "update", "-q"], install]
    reason = ""
    for number, command in enumerate(attempts):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = "ran out of time"
            break
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=remaining, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            reason = f"{' '.join(command)}: {error}"
            break
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            reason = f"{' '.join(command)} exited {done.returncode}: {tail[0]}"
            if number == 0:
                continue  # try again after apt-get update
            break
        if command is install and _find_browser():
            return _find_browser()  # type: ignore[return-value]
    pytest.skip(f"could not install chromium: {reason or 'not on PATH after installing'}")


def _dump_dom(browser: str, url: str, profile: Path) -> str:
    command = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=2000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_index_in_headless_chromium(chromium: str, tmp_path: Path) -> None:
    rows = _rows()
    target = tmp_path / "run" / "index.html"
    write_qa_index(rows, target)
    profile = tmp_path / "profile"
    url = target.as_uri()

    default = _parse(_dump_dom(chromium, url, profile))
    assert default.names == BY_VOLUME  # every scan, in a row, largest volume first

    by_name = _parse(_dump_dom(chromium, url + "#sort=name", profile))
    assert by_name.sorted == "name"  # the script ran and read the fragment
    assert by_name.names == sorted((r.name for r in rows), key=str.lower)

    by_components = _parse(_dump_dom(chromium, url + "#sort=-components", profile))
    assert by_components.sorted == "-components"
    expected = [r.name for r in sorted(rows, key=lambda r: r.components, reverse=True)]
    assert by_components.names == expected


def test_index_header_clicks_sort_and_toggle(chromium: str, tmp_path: Path) -> None:
    rows = _rows()
    text = qa.qa_index_html(rows)
    target = tmp_path / "index.html"

    def after_clicks(*keys: str) -> tuple[_Rows, str]:
        clicks = "".join(f"document.querySelector('th[data-key={k}]').click();" for k in keys)
        script = f"<script>{clicks}document.body.dataset.hash = location.hash;</script>"
        target.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
        dom = _dump_dom(chromium, target.as_uri(), tmp_path / "profile")
        return _parse(dom), dom

    by_name = sorted((r.name for r in rows), key=str.lower)
    parsed, dom = after_clicks("name")  # a text column starts ascending
    assert parsed.sorted == "name" and parsed.names == by_name
    assert 'data-hash="#sort=name"' in dom
    parsed, dom = after_clicks("name", "name")  # a second click reverses it
    assert parsed.sorted == "-name" and parsed.names == by_name[::-1]
    assert 'data-hash="#sort=-name"' in dom
    parsed, _ = after_clicks("volume")  # sorted descending on load, so a click ascends
    assert parsed.sorted == "volume" and parsed.names == BY_VOLUME[::-1]
    parsed, _ = after_clicks("interval")  # numbers start descending; no interval goes last
    assert parsed.names == ["Delta", "<x>&", "gamma", "beta", "alpha"]
