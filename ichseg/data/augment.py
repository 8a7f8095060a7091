"""Training augmentation: the paper's random affine transform, built with albumentations ``Affine``.

The authors used Keras' ``ImageDataGenerator`` (Hssayeni et al. 2020): rotation up to 20 degrees,
width and height shifts up to 0.1 of the size (independently per axis), shear 0.1, zoom 0.8-1.2,
the border filled by replicating the edge, no flips.

Options (Keras-like magnitudes, all optional; the defaults are the paper's):

=================== ===========================================================================
``rotate``          r degrees: uniform in [-r, r]; or a ``[low, high]`` range. Default 20.
``translate``       t: x and y shifts, each uniform in [-t, t] x size; or a range. Default 0.1.
``shear``           s degrees, x axis only (as Keras): uniform in [-s, s]; or a range. Default 5.73.
``scale``           ``[low, high]`` zoom factor (x and y drawn independently, as Keras); a number z
                    means [1 - z, 1 + z]. Default [0.8, 1.2].
``interpolation``   image interpolation: ``linear`` (default), ``nearest``, ``cubic``, ``area``.
``mask_interpolation`` ``nearest`` (default): masks stay binary.
``border_mode``     ``replicate`` (default), ``constant``, ``reflect``, ``reflect_101``, ``wrap``.
``p``               probability of transforming a window. Default 1.
=================== ===========================================================================

Any other key is passed to ``albumentations.Affine`` as is (``keep_ratio``, ``fill``, ...), which is
built with ``strict=True``: a misspelt option is a :class:`~ichseg.errors.ConfigError`, not a
warning that albumentations would print and then ignore. (``Affine(rotate=20)`` itself would
mean "always 20 degrees"; here a single number is a symmetric range.)

Shear: Keras reads ``shear_range=0.1`` as radians in its early versions and as degrees from 2.2.
0.1 degree does nothing visible, so the default is the radian reading, ``0.1 rad = 5.73 degrees``.
Set ``shear: 0.1`` for the literal degree reading.

:class:`Augmentation` samples each window's matrix with albumentations (the same random parameters
and matrix as ``Affine``) and warps image and mask with ``cv2.warpAffine`` directly, as
``Affine.apply`` does, skipping albumentations' per-call bookkeeping (about 1.5-2x faster on
160x160 windows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from ichseg.errors import ConfigError

#: Keras' shear_range=0.1 read as radians, in degrees.
PAPER_SHEAR_DEGREES = round(math.degrees(0.1), 2)

#: The paper's augmentation, in this module's option vocabulary.
PAPER_AUGMENTATION: dict[str, Any] = {
    "rotate": 20.0,
    "translate": 0.1,
    "shear": PAPER_SHEAR_DEGREES,
    "scale": (0.8, 1.2),
    "interpolation": "linear",
    "mask_interpolation": "nearest",
    "border_mode": "replicate",
    "p": 1.0,
}

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
BORDER_MODES: dict[str, int] = {
    "constant": cv2.BORDER_CONSTANT,
    "replicate": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT,
    "wrap": cv2.BORDER_WRAP,
    "reflect_101": cv2.BORDER_REFLECT_101,
}


class Augmentation:
    """A random affine transform applied identically to an image and its mask.

    Call with an ``(H, W)`` or ``(H, W, C)`` uint8/float32 image and an ``(H, W)`` uint8 mask;
    returns the transformed pair (new arrays, same shapes and dtypes). :attr:`transform` is the
    underlying ``albumentations.Affine``.
    """

    def __init__(self, transform: Any, options: Mapping[str, Any]) -> None:
        self.transform = transform
        self.options = dict(options)
        fill_mask = transform.fill_mask
        zero_fill = (
            all(v == 0 for v in fill_mask) if isinstance(fill_mask, Sequence) else fill_mask == 0
        )
        self._fast_sampling = all(
            hasattr(transform, name)
            for name in ("_get_translate_params", "_get_shear_params", "_get_scale")
        )
        self._empty_stays_empty = transform.border_mode != cv2.BORDER_CONSTANT or zero_fill

    def __repr__(self) -> str:
        return f"Augmentation({self.options!r})"

    def reseed(self, seed: int) -> None:
        """Reset the random state (call once per data-loader worker with a distinct seed)."""
        self.transform.set_random_seed(int(seed) % 2**32)

    def sample_matrix(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The next random 2x3 matrix for an ``(H, W)`` image, or None when ``p`` says skip."""
        transform = self.transform
        if transform.p < 1.0 and transform.py_random.random() >= transform.p:
            return None
        if transform.fit_output or not self._fast_sampling:
            params = transform.get_params_dependent_on_data({"shape": shape}, {})
            return np.asarray(params["matrix"][:2], dtype=np.float64)
        # The draws of Affine.get_params_dependent_on_data, in its order, without its second
        # (bounding-box) matrix; the matrix in closed form (see affine_matrix).
        translate = transform._get_translate_params(shape)
        shear = transform._get_shear_params()
        scale = transform._get_scale(
            transform.scale, transform.keep_ratio, transform.balanced_scale, transform.py_random
        )
        rotate = transform.py_random.uniform(*transform.rotate)
        height, width = shape
        center = (width / 2 - 0.5, height / 2 - 0.5)
        return affine_matrix(translate, shear, scale, rotate, center)

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        out_image: np.ndarray | None = None,
        out_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Transform ``image`` and ``mask`` with one random matrix (into ``out_*`` if given)."""
        height, width = image.shape[:2]
        matrix = self.sample_matrix((height, width))
        if matrix is None:
            if out_image is None or out_mask is None:
                return image.copy(), mask.copy()
            out_image[...] = image
            out_mask[...] = mask
            return out_image, out_mask
        return self.warp(image, mask, matrix, out_image, out_mask)

    def warp(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        matrix: np.ndarray,
        out_image: np.ndarray | None = None,
        out_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply a 2x3 ``matrix`` to image and mask as ``Affine.apply`` / ``apply_to_mask`` do."""
        transform = self.transform
        height, width = image.shape[:2]
        channels = 1 if image.ndim == 2 else image.shape[2]
        if channels > 4:
            params = {
                "matrix": np.vstack([matrix, [0.0, 0.0, 1.0]]),
                "output_shape": (height, width),
            }
            warped = transform.apply(image, **params)
            if out_image is not None:
                out_image[...] = warped
                warped = out_image
            warped_mask = transform.apply_to_mask(mask, **params)
            if out_mask is not None:
                out_mask[...] = warped_mask
                warped_mask = out_mask
            return warped, warped_mask
        warped = cv2.warpAffine(
            image,
            matrix,
            (width, height),
            dst=_cv2_view(out_image, image),
            flags=transform.interpolation,
            borderMode=transform.border_mode,
            borderValue=_border_value(transform.fill),
        )
        if self._empty_stays_empty and not mask.any():
            # An empty mask warps to an empty mask: skip the warp (most training windows).
            warped_mask = np.zeros_like(mask) if out_mask is None else out_mask
            warped_mask.fill(0)
        else:
            warped_mask = cv2.warpAffine(
                mask,
                matrix,
                (width, height),
                dst=out_mask,
                flags=transform.mask_interpolation,
                borderMode=transform.border_mode,
                borderValue=_border_value(transform.fill_mask),
            )
        if image.ndim == 3 and warped.ndim == 2:
            warped = warped[:, :, None]
        return _into(out_image, warped), _into(out_mask, warped_mask)


def _into(out: np.ndarray | None, result: np.ndarray) -> np.ndarray:
    """``out`` holding ``result`` (cv2 allocates a new array when ``dst`` does not fit)."""
    if out is None:
        return result
    if not np.shares_memory(out, result):
        out[...] = result.reshape(out.shape)
    return out


def affine_matrix(
    translate: Mapping[str, float],
    shear: Mapping[str, float],
    scale: Mapping[str, float],
    rotate: float,
    center: tuple[float, float],
) -> np.ndarray:
    """2x3 matrix of albumentations' ``create_affine_transformation_matrix``, in closed form.

    ``center @ translate @ shear @ rotate @ scale @ center^-1`` with angles in degrees; about 10x
    faster than composing six 3x3 numpy matrices.
    """
    angle = math.radians(rotate % 360)
    cos, sin = math.cos(angle), math.sin(angle)
    tan_x, tan_y = math.tan(math.radians(shear["x"])), math.tan(math.radians(shear["y"]))
    sx, sy = scale["x"], scale["y"]
    a00 = (cos - tan_x * sin) * sx
    a01 = (sin + tan_x * cos) * sy
    a10 = (tan_y * cos - sin) * sx
    a11 = (tan_y * sin + cos) * sy
    cx, cy = center
    return np.array(
        [
            [a00, a01, translate["x"] + cx - a00 * cx - a01 * cy],
            [a10, a11, translate["y"] + cy - a10 * cx - a11 * cy],
        ]
    )


def _cv2_view(out: np.ndarray | None, image: np.ndarray) -> np.ndarray | None:
    """cv2 writes single-channel results as (H, W): give it that view of an (H, W, 1) buffer."""
    if out is None:
        return None
    return out[:, :, 0] if out.ndim == 3 and out.shape[2] == 1 else out


def _border_value(fill: Any) -> tuple[float, ...]:
    if isinstance(fill, Sequence):
        return tuple(float(v) for v in fill)
    return (float(fill),) * 4


def affine_arguments(options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``albumentations.Affine`` keyword arguments for ``options`` over the paper's defaults."""
    user = _plain(dict(options or {}))
    if "translate" in user and "translate_percent" in user:
        raise ConfigError(
            "augmentation options translate and translate_percent are the same setting: give one"
        )
    merged = {**PAPER_AUGMENTATION, **user}
    if "translate_percent" in user or "translate_px" in user:
        merged.pop("translate")
    arguments: dict[str, Any] = {}
    for key, value in merged.items():
        if key == "rotate":
            arguments["rotate"] = _symmetric(key, value)
        elif key == "translate":
            span = _symmetric(key, value)
            arguments["translate_percent"] = {"x": span, "y": span}
        elif key == "shear":
            arguments["shear"] = {"x": _symmetric(key, value), "y": (0.0, 0.0)}
        elif key == "scale":
            if isinstance(value, int | float):
                value = (1.0 - float(value), 1.0 + float(value))
            arguments["scale"] = _range(key, value)
        elif key in ("interpolation", "mask_interpolation", "border_mode"):
            arguments[key] = _flag(key, value)
        else:
            arguments[key] = value
    return arguments


def _symmetric(key: str, value: Any) -> tuple[float, float]:
    """A number m means [-m, m]; a pair is a range."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (-abs(float(value)), abs(float(value)))
    return _range(key, value)


def _range(key: str, value: Any) -> tuple[float, float]:
    if isinstance(value, Mapping):
        return value  # type: ignore[return-value]  # per-axis dicts go to Affine unchanged
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"augmentation option {key}={value!r} must be a number or a [low, high] pair"
        ) from None
    if low > high:
        raise ConfigError(f"augmentation option {key}={list(value)} has low > high")
    return (low, high)


def _flag(key: str, value: Any) -> int:
    table = BORDER_MODES if key == "border_mode" else INTERPOLATIONS
    if isinstance(value, str):
        try:
            return table[value.lower()]
        except KeyError:
            raise ConfigError(
                f"augmentation option {key}={value!r} is not one of {', '.join(table)}"
            ) from None
    return int(value)


def build_augmentation(options: Mapping[str, Any] | bool | None = None) -> Augmentation | None:
    """The training augmentation from ``options`` (None or False: off; True or {}: the paper's).

    Raises :class:`ConfigError` for an unknown option or an invalid value.
    """
    if options is None or options is False:
        return None
    if options is True:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"augmentation options must be a mapping, got {type(options).__name__}")
    import albumentations as A

    arguments = affine_arguments(options)
    if arguments.pop("strict", True) is not True:
        raise ConfigError("augmentation option strict cannot be turned off")
    try:
        transform = A.Affine(**arguments, strict=True)
    except (ValueError, TypeError) as err:
        text = str(err).strip()
        first_line = text.splitlines()[0] if text else type(err).__name__
        raise ConfigError(f"invalid augmentation options: {first_line}") from None
    return Augmentation(transform, {**PAPER_AUGMENTATION, **_plain(dict(options))})


def _plain(value: Any) -> Any:
    """Mappings to dicts and non-string sequences to tuples (configs may hold list-like objects)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return tuple(_plain(v) for v in value)
    return value
