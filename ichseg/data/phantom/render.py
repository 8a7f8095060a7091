"""HU volumes of the phantom: one head painted slice by slice (anatomy, lesions, noise, blur).

See docs/phantom.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ichseg.data.ctich import SUBTYPES
from ichseg.data.phantom.anatomy import (
    Tissue,
    _Anatomy,
    _bump,
    _dome_scale,
    _draw_anatomy,
    _Grid,
    _make_grid,
    _Slice,
    _wrap,
)
from ichseg.data.phantom.lesions import (
    _draw_fracture,
    _draw_lesions,
    _Fracture,
    _Lesion,
    _slice_heights,
)
from ichseg.data.phantom.plan import (
    _P_FRACTURE,
    _P_SECOND_SUBTYPE,
    _PRIMARY_WEIGHTS,
)
from ichseg.data.phantom.structures import (
    _calcifications,
    _deep_grey,
    _fissure,
    _skull_base,
    _ventricles,
)
from ichseg.errors import ConfigError

MIN_LESION_PIXELS = 12  # lesion pieces smaller than this (per slice) are dropped

# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _drop_small_pieces(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected pieces smaller than ``min_pixels``."""
    if not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _head_box(grid: _Grid, dome: float, pad: int = 3) -> tuple[slice, slice] | None:
    """Rows and columns of the rectangle holding the head on a slice of this dome scale."""
    inside = grid.extent <= dome
    rows = np.flatnonzero(inside.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(inside[rows[0] : rows[-1] + 1].any(axis=0))
    n = grid.size
    return (
        slice(max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, n)),
        slice(max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, n)),
    )


def _render_slice(
    anat: _Anatomy,
    grid: _Grid,
    k: int,
    t: float,
    lesions: Sequence[_Lesion],
    fracture: _Fracture | None,
    noise_rng: np.random.Generator,
    tissue: np.ndarray,
    bits: np.ndarray,
) -> tuple[np.ndarray, bool]:
    """Render slice ``k`` into ``tissue`` and ``bits`` (zeroed (S, S)); return HU and fracture flag.

    The head is drawn inside its bounding rectangle only; noise and blur cover the whole slice.
    """
    img = np.full((grid.size, grid.size), anat.hu_air, dtype=np.float32)
    if grid.headrest is not None:
        np.copyto(img, anat.hu_headrest, where=grid.headrest)
        tissue[grid.headrest] = Tissue.HEADREST
    dome = _dome_scale(t)
    box = _head_box(grid, dome)
    fractured = False
    if box is not None:
        rows, cols = box
        fractured = _render_head(
            anat,
            grid.crop(rows, cols),
            k,
            t,
            dome,
            lesions,
            fracture,
            img[rows, cols],
            tissue[rows, cols],
            bits[rows, cols],
        )
    # CT texture: white noise, then a small blur (also the partial-volume effect at every edge).
    img += anat.noise_sigma * noise_rng.standard_normal(img.shape, dtype=np.float32)
    img = ndimage.gaussian_filter(img, anat.blur_sigma_px, mode="nearest", truncate=3.0)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), fractured


def _render_head(
    anat: _Anatomy,
    grid: _Grid,
    k: int,
    t: float,
    dome: float,
    lesions: Sequence[_Lesion],
    fracture: _Fracture | None,
    img: np.ndarray,
    tissue: np.ndarray,
    bits: np.ndarray,
) -> bool:
    """Paint the head of slice ``k`` into ``img``, ``tissue``, ``bits``; True if fractured here."""
    sp = grid.spacing

    # Layers from outside in: scalp, skull (thicker where the cut is tangential), intracranial.
    skull_out, thickness, d, base, skull = _paint_shell(anat, grid, t, dome, img, tissue)
    intracranial = d >= 0.0

    # Brain: grey cortex ribbon lining the surface, the sulci and the fissures; white matter inside.
    gap = max(anat.csf_gap_mm, 0.6 * sp)
    depth = d - gap
    parenchyma = intracranial & (depth >= 0.0)
    cortex, bend, sulci, grey = _cortex_and_sulci(anat, grid, k, t, depth, parenchyma)
    _sylvian_fissures(anat, grid, t, depth, parenchyma, cortex, bend, sulci, grey)

    fissure = _fissure(anat, grid, t, parenchyma)
    half_fissure = max(anat.fissure_width_mm, 1.2 * sp) / 2
    fissure_csf = fissure & (np.abs(grid.midline) < half_fissure)
    grey |= fissure & (np.abs(grid.midline) < half_fissure + cortex)

    ventricles, third = _ventricles(anat, grid, t)
    deep_grey = _deep_grey(anat, grid, t)
    if deep_grey is not None:
        grey |= deep_grey & parenchyma

    texture = 1.5 * (math.cos(0.25 * k) * grid.tex[0] + math.sin(0.25 * k) * grid.tex[1])
    brain_hu = np.where(grey, np.float32(anat.hu_grey), np.float32(anat.hu_white)) + texture
    np.copyto(img, brain_hu, where=parenchyma)
    tissue[parenchyma] = Tissue.WHITE
    tissue[grey] = Tissue.GREY

    csf = (intracranial & ~parenchyma) | sulci | fissure_csf
    for vent in ventricles:
        vent &= parenchyma
        csf |= vent
    if third is not None:
        csf |= third & parenchyma
    np.copyto(img, anat.hu_csf + 0.5 * texture, where=csf)
    tissue[csf] = Tissue.CSF
    parenchyma &= ~csf
    falx = fissure & (np.abs(grid.midline) < max(anat.falx_width_mm, 0.7 * sp) / 2)
    np.copyto(img, anat.hu_falx, where=falx)
    tissue[falx] = Tissue.DURA

    if base > 0.0:
        _skull_base(anat, grid, t, base, intracranial, img, tissue)
        parenchyma &= tissue != Tissue.BONE
    _calcifications(anat, grid, t, ventricles, img, tissue)

    sl = _Slice(
        k=k,
        t=t,
        d=d,
        depth=depth,
        intracranial=intracranial & (tissue != Tissue.BONE),
        parenchyma=parenchyma,
        sulci=sulci,
        ventricles=ventricles,
    )

    _paint_lesions(grid, sl, lesions, img, tissue, bits)

    # Partial-volume rim inside the inner table (values pass through 50-150 HU over 1-2 pixels).
    near = intracranial & (d < 5.0 * anat.rim_decay_px * sp)
    img[near] += anat.rim_hu * np.exp(-d[near] / (anat.rim_decay_px * sp))

    return _paint_fracture(grid, k, fracture, skull, skull_out, thickness, img, tissue)


def _cortex_and_sulci(
    anat: _Anatomy, grid: _Grid, k: int, t: float, depth: np.ndarray, parenchyma: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cortex thickness, the sulci's bend field, the sulcus CSF and the grey-matter ribbon."""
    sp = grid.spacing
    cortex = max(anat.cortex_mm, 1.2 * sp) * (
        1.0 + 0.25 * (grid.cortex[0] * math.cos(0.4 * k) + grid.cortex[1] * math.sin(0.4 * k))
    )
    bend = math.cos(0.3 * k) * grid.fine[0] + math.sin(0.3 * k) * grid.fine[1]
    phase = grid.sulcus_phase + (0.35 * k) + 0.06 * depth + 1.6 * bend
    arc = np.abs(phase - np.round(phase * (1 / (2 * math.pi))) * (2 * math.pi))
    arc *= grid.rho * (1.0 / anat.sulcus_count)
    variation = math.sin(0.3 * k) * grid.fine[0] - math.cos(0.3 * k) * grid.fine[1]
    sulcus_depth = anat.sulcus_depth_mm * (0.65 + 0.35 * variation)
    if t < 0.2:  # few sulci at the skull base
        sulcus_depth *= max(t, 0.0) / 0.2
    half_sulcus = np.maximum(anat.sulcus_width_mm * (0.75 + 0.35 * grid.fine[1]), 0.9 * sp) / 2
    sulci = parenchyma & (arc < half_sulcus) & (depth < sulcus_depth)
    grey = parenchyma & (
        (depth < cortex) | ((arc < half_sulcus + cortex) & (depth < sulcus_depth + cortex))
    )
    return cortex, bend, sulci, grey


def _paint_shell(
    anat: _Anatomy, grid: _Grid, t: float, dome: float, img: np.ndarray, tissue: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]:
    """Scalp and skull of one slice; returns the skull's outer radius, its thickness, the distance
    ``d`` inward from the inner table, the skull-base weight and the skull mask."""
    sp = grid.spacing
    skin = dome * grid.radius
    skull_out = skin - max(anat.scalp_mm, 1.2 * sp)
    oblique = 1.0 + 1.5 * max(0.0, t - 0.8) / 0.2
    base = max(0.0, (0.22 - t) / 0.22)  # 0 above the skull base, up to 1 at its bottom
    thickness = grid.skull * oblique
    if base > 0.0:
        thickness = thickness + anat.orbit_roof_mm * base * grid.front_weight
    d = skull_out - thickness - grid.rho
    intracranial = d >= 0.0
    scalp = (grid.rho <= skin) & (grid.rho > skull_out)
    skull = (grid.rho <= skull_out) & ~intracranial
    np.copyto(img, anat.hu_scalp, where=scalp)
    tissue[scalp] = Tissue.SCALP
    w = np.clip(-d / thickness, 0.0, 1.0)
    bone = anat.hu_diploe + (anat.hu_table - anat.hu_diploe) * (2.0 * w - 1.0) ** 2
    np.copyto(img, bone, where=skull)
    tissue[skull] = Tissue.BONE
    return skull_out, thickness, d, base, skull


def _sylvian_fissures(
    anat: _Anatomy,
    grid: _Grid,
    t: float,
    depth: np.ndarray,
    parenchyma: np.ndarray,
    cortex: np.ndarray,
    bend: np.ndarray,
    sulci: np.ndarray,
    grey: np.ndarray,
) -> None:
    """Add the Sylvian fissures (CSF clefts lined with cortex) to ``sulci`` and ``grey``."""
    sp = grid.spacing
    sylvian = _bump(t, 0.28, 0.56)
    if sylvian <= 0.0:
        return
    half_width = max(anat.sylvian_width_mm, 1.2 * sp) / 2
    reach = anat.sylvian_depth_mm * sylvian
    near_surface = parenchyma & (depth < reach + cortex)
    for sign in (-1.0, 1.0):  # a cleft from the temple inwards, bent forwards and wavy
        c, s = math.cos(anat.sylvian_angle), sign * math.sin(anat.sylvian_angle)
        ahead = grid.u * c + grid.v * s > 0.0
        across = np.abs(grid.v * c - grid.u * s + 0.15 * sign * depth + 2.0 * bend)
        sulci |= near_surface & ahead & (depth < reach) & (across < half_width)
        grey |= near_surface & ahead & (across < half_width + cortex)


def _paint_lesions(
    grid: _Grid,
    sl: _Slice,
    lesions: Sequence[_Lesion],
    img: np.ndarray,
    tissue: np.ndarray,
    bits: np.ndarray,
) -> None:
    """Paint the lesions cut by this slice (bleed overrides anatomy) and perilesional oedema."""
    for lesion in lesions:
        mask = lesion.mask(grid, sl)
        if mask is None:
            continue
        mask = _drop_small_pieces(mask & sl.intracranial, MIN_LESION_PIXELS)
        if not mask.any():
            continue
        oedema = lesion.oedema(grid, sl)
        if oedema is not None:
            oedema &= (bits == 0) & ~mask
            np.copyto(img, img - getattr(lesion, "oedema_drop", 0.0), where=oedema)
        value = np.clip(lesion.hu + 4.0 * grid.fine[1] + 3.0 * grid.tex[1], 50.0, 90.0)
        np.copyto(img, value, where=mask)
        tissue[mask] = Tissue.BLEED
        bits[mask] |= np.uint8(1 << SUBTYPES.index(lesion.subtype))


def _paint_fracture(
    grid: _Grid,
    k: int,
    fracture: _Fracture | None,
    skull: np.ndarray,
    skull_out: np.ndarray,
    thickness: np.ndarray,
    img: np.ndarray,
    tissue: np.ndarray,
) -> bool:
    """Cut the fracture's crack through the skull on its slices; True if this slice has one."""
    if fracture is None or k not in fracture.slices:
        return False
    across_bone = np.clip((skull_out - grid.rho) / thickness, 0.0, 1.0)
    offset = _wrap(grid.theta - fracture.angle) * grid.rho - fracture.tilt_mm * across_bone
    crack = skull & (np.abs(offset) < fracture.width_mm / 2)
    if not crack.any():
        return False
    np.copyto(img, fracture.hu, where=crack)
    tissue[crack] = Tissue.SCALP
    return True


# --------------------------------------------------------------------------------------------------
# One scan in memory
# --------------------------------------------------------------------------------------------------


def make_head_volume(
    rng: np.random.Generator,
    n_slices: int,
    size: int,
    *,
    with_ich: bool,
    spacing_mm: float,
    age: float = 40.0,
    subtypes: Sequence[str] | None = None,
    fracture: bool | None = None,
    calcifications: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One synthetic scan in memory: HU int16 (H, W, N), bool ICH mask (H, W, N), per-slice labels.

    ``size`` is H = W in pixels and ``spacing_mm`` the in-plane pixel spacing (the field of view is
    ``size * spacing_mm``); slices run from the skull base (0) to the vertex (N-1), whatever N is.
    ``subtypes`` chooses the lesions (names from :data:`SUBTYPES`); when None and ``with_ich``, one
    or two are drawn. ``fracture`` / ``calcifications`` None means drawn at random. Axis 0 runs
    left-right and axis 1 posterior to anterior (``vol[:, :, k]`` shows the front on the right).

    The labels dict holds ``subtypes`` ((N, 5) bool, order of :data:`SUBTYPES`: which lesion types
    have mask pixels on each slice), ``fracture`` ((N,) bool), ``tissue`` ((H, W, N) uint8 codes of
    :class:`Tissue`) and ``subtype_map`` ((H, W, N) uint8, bit i set where subtype i's lesion lies).
    """
    if n_slices < 1 or size < 8 or spacing_mm <= 0:
        raise ConfigError(
            f"make_head_volume needs n_slices >= 1, size >= 8 and spacing_mm > 0, "
            f"got {n_slices}, {size}, {spacing_mm}."
        )
    noise_rng = np.random.default_rng(rng.integers(0, 2**63))
    anat = _draw_anatomy(rng, age, calcifications)
    grid = _make_grid(rng, anat, size, spacing_mm)
    if not with_ich:
        chosen: tuple[str, ...] = ()
    elif subtypes:
        chosen = tuple(dict.fromkeys(subtypes))
    else:
        names = list(_PRIMARY_WEIGHTS)
        weights = np.array(list(_PRIMARY_WEIGHTS.values()))
        count = 2 if rng.random() < _P_SECOND_SUBTYPE else 1
        picks = rng.choice(len(names), size=count, replace=False, p=weights / weights.sum())
        chosen = tuple(names[int(i)] for i in picks)
    lesions = _draw_lesions(rng, anat, chosen, n_slices, spacing_mm)
    if fracture is None:
        fracture = (
            rng.random() < _P_FRACTURE["EDH" if "EDH" in chosen else ("ICH" if chosen else "none")]
        )
    crack = _draw_fracture(rng, anat, lesions, n_slices, spacing_mm) if fracture else None

    # Fortran order: each slice is contiguous, and nibabel writes the volume without a copy.
    hu = np.empty((size, size, n_slices), dtype=np.int16, order="F")
    tissue = np.zeros((size, size, n_slices), dtype=np.uint8, order="F")
    subtype_map = np.zeros((size, size, n_slices), dtype=np.uint8, order="F")
    fracture_flags = np.zeros(n_slices, dtype=bool)
    flags = np.zeros((n_slices, len(SUBTYPES)), dtype=bool)
    slice_tissue = np.zeros((size, size), dtype=np.uint8)
    slice_bits = np.zeros((size, size), dtype=np.uint8)
    for k, t in enumerate(_slice_heights(anat, n_slices)):
        slice_tissue.fill(0)
        slice_bits.fill(0)
        hu[:, :, k], fracture_flags[k] = _render_slice(
            anat, grid, k, float(t), lesions, crack, noise_rng, slice_tissue, slice_bits
        )
        tissue[:, :, k] = slice_tissue
        subtype_map[:, :, k] = slice_bits
        if lesions:
            present = np.bitwise_or.reduce(slice_bits, axis=None)
            flags[k] = [bool(present & (1 << i)) for i in range(len(SUBTYPES))]
    labels = {
        "subtypes": flags,
        "fracture": fracture_flags,
        "tissue": tissue,
        "subtype_map": subtype_map,
    }
    return hu, subtype_map > 0, labels
