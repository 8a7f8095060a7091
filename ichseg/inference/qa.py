"""Visual QA of a prediction run: one contact sheet per scan.

:func:`qa_sheet` draws the slices of a scan that hold predicted ICH in the brain window with the
mask's outline; :func:`write_qa_sheet` saves it as a PNG atomically. It needs only numpy, scipy
and Pillow. The run's sortable ``index.html`` that links to the sheets lives in
:mod:`ichseg.inference.qa_index` (:func:`write_qa_index`, :func:`qa_index_html`, :class:`QARow`);
they are re-exported here.

Orientation: the volumes are arrays in the CT-ICH NIfTI orientation, with slices on axis 2.
Shown as-is, ``vol[:, :, k]`` puts array axis 0 down the rows and axis 1 along the columns, so the
front of the head (high axis-1 index, anterior) is on the right. Every thumbnail is
``np.rot90(vol[:, :, k], 1)``: axis 1 then runs bottom-to-top (anterior up) and axis 0 runs
left-to-right (axis-0 index 0 is the left edge of the thumbnail), as the released JPG slices of
CT-ICH are displayed (tests/test_qa.py checks the direction with an asymmetric marker).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ichseg.data.windowing import apply_window
from ichseg.inference.qa_index import QARow, qa_index_html, write_qa_index
from ichseg.utils.atomic import atomic_path

#: Width of one thumbnail in pixels (a 512-pixel slice is halved).
THUMB_WIDTH = 256
#: Thumbnails per row of the sheet.
COLUMNS = 4
#: At most this many ICH slices are shown (the largest by area, kept in slice order).
MAX_SLICES = 24
#: Slices shown when no ICH is predicted (evenly spaced through the scan).
EMPTY_SLICES = 4
#: RGB colour of the mask's outline.
CONTOUR_COLOUR = (255, 230, 0)
#: Thickness of the outline in thumbnail pixels.
CONTOUR_WIDTH = 2

_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_MUTED = (170, 170, 170)
_PAD = 8
_TITLE_SIZE = 18
_CAPTION_SIZE = 13


# --------------------------------------------------------------------------- the sheet


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` pixels (the fixed bitmap font on Pillow < 10.1 or
    without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def window(hu: np.ndarray) -> np.ndarray:
    """Hounsfield units -> uint8 grey in the brain window (the windowing of the network's input,
    :func:`ichseg.data.windowing.apply_window`)."""
    return apply_window(np.asarray(hu), "brain", np.uint8)


def _fit(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
) -> str:
    """``text``, shortened with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _draw_caption(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    colour: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    small: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    """Draw ``text``, with each "²" as a small raised 2 (the default font has no glyph for it)."""
    x, y = xy
    for number, part in enumerate(text.split("²")):
        if number:
            draw.text((x, y - 2), "2", fill=colour, font=small)
            x += math.ceil(draw.textlength("2", font=small))
        draw.text((x, y), part, fill=colour, font=font)
        x += math.ceil(draw.textlength(part, font=font))


def _check_inputs(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    probabilities: np.ndarray | None,
) -> tuple[float, float, float]:
    if hu.ndim != 3:
        raise ValueError(f"hu must be a (H, W, N) volume, got shape {hu.shape}")
    if mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {hu.shape}")
    if probabilities is not None and probabilities.shape != hu.shape:
        raise ValueError(
            f"probabilities shape {probabilities.shape} differs from the volume's {hu.shape}"
        )
    if min(hu.shape) < 1:
        raise ValueError(f"the volume is empty (shape {hu.shape})")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be 3 positive finite numbers, got {spacing_mm!r}")
    return spacing  # type: ignore[return-value]


def _choose_slices(areas: np.ndarray, max_slices: int) -> np.ndarray:
    """Indices of the slices to show: every ICH slice, or the ``max_slices`` largest by area
    (ties to the earlier slice) in slice order; evenly spaced slices when there is no ICH."""
    ich = np.flatnonzero(areas > 0)
    if ich.size == 0:
        count = min(EMPTY_SLICES, areas.size)
        return np.unique(np.rint(np.linspace(0, areas.size - 1, count + 2)[1:-1]).astype(int))
    if ich.size <= max_slices:
        return ich
    order = np.argsort(-areas[ich], kind="stable")[:max_slices]
    return np.sort(ich[order])


def _thumbnail(hu_slice: np.ndarray, mask_slice: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """One slice, anterior up, in the brain window, resized to ``size`` (w, h), mask outlined."""
    grey = Image.fromarray(np.ascontiguousarray(np.rot90(window(hu_slice), 1)))
    grey = grey.resize(size, Image.Resampling.BILINEAR)
    rgb = np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)
    if mask_slice.any():
        upright = np.ascontiguousarray(np.rot90(mask_slice, 1)).astype(np.uint8) * np.uint8(255)
        small = np.asarray(Image.fromarray(upright).resize(size, Image.Resampling.BOX))
        inside = small >= 128
        if not inside.any():  # a lesion smaller than a thumbnail pixel: keep its location
            inside = small > 0
        structure = ndimage.generate_binary_structure(2, 1)
        eroded = ndimage.binary_erosion(
            inside, structure=structure, iterations=CONTOUR_WIDTH, border_value=0
        )
        rgb[inside & ~eroded] = CONTOUR_COLOUR
    return Image.fromarray(rgb)


def _caption(
    index: int,
    slices: int,
    pixels: int,
    spacing: tuple[float, float, float],
    probability: float | None,
) -> list[str]:
    lines = [f"slice {index + 1} / {slices}"]
    if pixels == 0:
        lines.append("no ICH predicted")
        return lines
    area_cm2 = pixels * spacing[0] * spacing[1] / 100.0
    slice_ml = area_cm2 * spacing[2] / 10.0
    text = f"{area_cm2:.2f} cm² · {slice_ml:.2f} mL"
    if probability is not None:
        text += f" · p {probability:.2f}"
    lines.append(text)
    return lines


def _draw_title_bar(
    draw: ImageDraw.ImageDraw,
    title: str,
    width: int,
    volume_ml: float,
    ich_slices: int,
    slices: int,
    shown: int,
) -> None:
    """The sheet's two title lines: the scan's name (shortened to fit ``width``) and a summary of
    the total ICH volume, the ICH slices and, when capped, how many of them are shown."""
    title_font = _font(_TITLE_SIZE)
    plural = "" if ich_slices == 1 else "s"
    draw.text(
        (_PAD, _PAD), _fit(draw, title, title_font, width - 2 * _PAD), fill=_TEXT, font=title_font
    )
    if ich_slices == 0:
        summary = f"0.00 mL · no ICH predicted · {slices} slices"
    else:
        summary = f"{volume_ml:.2f} mL · {ich_slices} ICH slice{plural} of {slices}"
        if shown < ich_slices:
            summary += f" · {shown} of {ich_slices} ICH slices shown"
    draw.text((_PAD, _PAD + _TITLE_SIZE + 6), summary, fill=_MUTED, font=title_font)


def qa_sheet(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    title: str,
    probabilities: np.ndarray | None = None,
) -> Image.Image:
    """An RGB contact sheet of one scan's prediction.

    ``hu`` is the (H, W, N) CT volume in Hounsfield units with slices on axis 2 (CT-ICH NIfTI
    orientation, see the module docstring), ``mask`` the (H, W, N) predicted ICH, ``spacing_mm``
    the voxel size (x, y, z) in mm and ``title`` the scan's name. A title bar gives the name, the
    total ICH volume in mL and the number of slices with ICH; below it, up to :data:`COLUMNS`
    thumbnails a row (:data:`THUMB_WIDTH` pixels wide, brain window, anterior up) of the slices
    with ICH, each with the mask outlined in :data:`CONTOUR_COLOUR` and a caption: the 1-based
    slice number, the ICH area on that slice in cm² and its volume in mL (area x z spacing) and,
    given ``probabilities`` (same shape, 0..1), the mean probability inside the mask. At most
    :data:`MAX_SLICES` slices are shown, the largest by area, in slice order (the title bar says
    how many of how many). Without ICH, :data:`EMPTY_SLICES` evenly spaced slices are shown,
    captioned "no ICH predicted".
    """
    hu = np.asarray(hu)
    mask = np.asarray(mask).astype(bool, copy=False)
    probs = None if probabilities is None else np.asarray(probabilities, dtype=np.float32)
    spacing = _check_inputs(hu, mask, spacing_mm, probs)
    rows_in, cols_in, slices = hu.shape

    areas = mask.sum(axis=(0, 1), dtype=np.int64)
    ich_slices = int(np.count_nonzero(areas))
    volume_ml = float(areas.sum()) * spacing[0] * spacing[1] * spacing[2] / 1000.0
    shown = _choose_slices(areas, MAX_SLICES)
    mean_probs: np.ndarray | None = None
    if probs is not None:
        weighted = np.where(mask, probs, 0.0).sum(axis=(0, 1), dtype=np.float64)
        mean_probs = weighted / np.maximum(areas, 1)

    # Upright, the thumbnail's columns are array axis 0 (x spacing), its rows axis 1 (y spacing).
    thumb_w = THUMB_WIDTH
    aspect = (cols_in * spacing[1]) / (rows_in * spacing[0])
    thumb_h = int(np.clip(round(thumb_w * aspect), 16, 4 * thumb_w))

    caption_font = _font(_CAPTION_SIZE)
    small_font = _font(_CAPTION_SIZE - 4)
    line_h = _CAPTION_SIZE + 4
    caption_h = 2 * line_h + 4
    columns = min(COLUMNS, max(1, len(shown)))
    grid_rows = math.ceil(len(shown) / columns)
    cell_w, cell_h = thumb_w + _PAD, thumb_h + caption_h + _PAD
    title_h = 2 * (_TITLE_SIZE + 6) + _PAD
    width = max(_PAD + columns * cell_w, 2 * thumb_w + 2 * _PAD)
    height = title_h + grid_rows * cell_h + _PAD

    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _draw_title_bar(draw, title, width, volume_ml, ich_slices, slices, len(shown))

    for position, k in enumerate(shown):
        left = _PAD + (position % columns) * cell_w
        top = title_h + (position // columns) * cell_h
        thumb = _thumbnail(hu[:, :, k], mask[:, :, k], (thumb_w, thumb_h))
        sheet.paste(thumb, (left, top))
        probability = None
        if mean_probs is not None and areas[k] > 0:
            probability = float(mean_probs[k])
        lines = _caption(int(k), slices, int(areas[k]), spacing, probability)
        for number, line in enumerate(lines):
            y = top + thumb_h + 3 + number * line_h
            colour = _TEXT if number == 0 else _MUTED
            _draw_caption(draw, (left, y), line, colour, caption_font, small_font)
    return sheet


def write_qa_sheet(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    title: str,
    target: Path,
    probabilities: np.ndarray | None = None,
) -> None:
    """:func:`qa_sheet` saved as a PNG at ``target``, atomically."""
    image = qa_sheet(hu, mask, spacing_mm, title, probabilities=probabilities)
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG", optimize=True)


__all__ = [
    "CONTOUR_COLOUR",
    "QARow",
    "qa_index_html",
    "qa_sheet",
    "window",
    "write_qa_index",
    "write_qa_sheet",
]
