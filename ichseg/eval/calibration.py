"""Calibrated probabilities: temperature scaling, the expected calibration error and a reliability
diagram, over pixels (or a seeded pixel sample). No Lightning; see docs/evaluation.md.

Temperature scaling (Guo et al. 2017) divides the network's logit by one positive scalar ``T``
fitted on the validation split (:func:`fit_temperature`): ``p_cal = sigmoid(logit(p) / T)``
(:func:`apply_temperature`). It is monotonic, so a threshold ``t`` on the raw probabilities selects
exactly the pixels that ``apply_temperature(t, T)`` selects on the calibrated ones: calibration
changes the probabilities, never the masks. The expected calibration error
(:func:`expected_calibration_error`) is torchmetrics' binary L1 calibration error: the
bin-weighted mean of ``|fraction of ICH pixels - mean probability|`` over equal-width probability
bins (15 by default).

The stitched evaluation's calibration records are plain functions here: the temperature fitted on
the val pixels of the tuning pass (:func:`fit_on_validation`), the tuned spec and checkpoint record
it implies (:func:`calibrated_operating_spec`, :func:`operating_point_record`), and each report's
ECE and reliability diagram (:func:`split_calibration`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ichseg.eval.tuning import TuningChoice
    from ichseg.specs import InferenceSpec

#: Probabilities are clipped to [EPS, 1 - EPS] before their logit.
EPS = 1e-6
#: Bounds of the fitted temperature.
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
#: Equal-width probability bins of the calibration error and the reliability diagram.
CALIBRATION_BINS = 15
#: At most this many pixels of one scan enter a :class:`PixelSample` ...
PIXELS_PER_SCAN = 200_000
#: ... and at most this many of all scans are used for fitting and the calibration error.
MAX_PIXELS = 2_000_000
#: Seed of the pixel samples (with the patient number: the same pixels in every run).
SAMPLE_SEED = 20240


def _logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for any z


def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float; ValueError unless it is a positive finite number."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)):
        raise ValueError(f"the temperature must be a number, got {temperature!r}")
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the temperature must be a positive finite number, got {temperature!r}")
    return value


def apply_temperature(probabilities: Any, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` as float32, of the same shape (``T == 1``: the input unchanged).

    Computed in float64 from probabilities clipped to [1e-6, 1 - 1e-6], then rounded: the map is
    monotonic, so ``p > t`` exactly where ``apply_temperature(p, T) > apply_temperature(t, T)``
    (up to values within float32 rounding of each other).
    """
    temperature = check_temperature(temperature)
    if temperature == 1.0:
        return np.asarray(probabilities, dtype=np.float32)
    return _sigmoid(_logit(probabilities) / temperature).astype(np.float32)


def calibrated_threshold(threshold: float, temperature: float) -> float:
    """The threshold on calibrated probabilities that selects what ``threshold`` selected on the
    raw ones: the image of its float32 value (masks compare in the probabilities' float32)."""
    if check_temperature(temperature) == 1.0:
        return float(threshold)
    return float(apply_temperature(np.float32(threshold), temperature))


def fit_temperature(
    probabilities: Any,
    targets: Any,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The temperature ``T`` in ``bounds`` minimising the mean binary cross-entropy of
    ``sigmoid(logit(p) / T)`` against ``targets`` (scipy's bounded scalar search on ``log T``).

    Without both classes among the targets nothing can be fitted: 1.0.
    """
    from scipy.optimize import minimize_scalar

    z = _logit(np.asarray(probabilities).reshape(-1))
    y = np.asarray(targets, dtype=bool).reshape(-1)
    if z.shape != y.shape:
        raise ValueError(f"{z.size} probabilities but {y.size} targets")
    if not y.any() or y.all():
        return 1.0
    y = y.astype(np.float64)

    def loss(log_t: float) -> float:
        s = z * math.exp(-log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    low, high = (math.log(b) for b in bounds)
    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def expected_calibration_error(
    probabilities: Any, targets: Any, bins: int = CALIBRATION_BINS
) -> float:
    """torchmetrics' ``BinaryCalibrationError(n_bins=bins, norm="l1")``: the bin-weighted mean of
    ``|accuracy - confidence|``; NaN without pixels."""
    import torch
    from torchmetrics.classification import BinaryCalibrationError

    p = torch.as_tensor(np.asarray(probabilities, dtype=np.float32).reshape(-1))
    t = torch.as_tensor(np.asarray(targets, dtype=bool).reshape(-1).astype(np.int64))
    if p.numel() == 0:
        return math.nan
    metric = BinaryCalibrationError(n_bins=int(bins), norm="l1")
    return float(metric(p, t))


def reliability_bins(
    probabilities: Any, targets: Any, bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of ``[0, 1]`` (as torchmetrics bins, ``p == 1`` in the last bin): mean
    probability (confidence), fraction of positive targets (accuracy) and pixel count; NaN in
    empty bins."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    t = np.asarray(targets, dtype=bool).reshape(-1)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, int(bins) - 1)
    counts = np.bincount(index, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=bins) / counts
        accuracy = np.bincount(index, weights=t.astype(np.float64), minlength=bins) / counts
    return confidence, accuracy, counts


# --------------------------------------------------------------------------- pixel samples


def pixel_sample(
    probabilities: Any, targets: Any, max_pixels: int = MAX_PIXELS, seed: Any = SAMPLE_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform seeded sample (without replacement, in pixel order) of at most ``max_pixels``
    ``(probability, target)`` pairs, as 1-D float32 and bool arrays; all pixels when there are
    fewer. ``seed`` is anything :func:`numpy.random.default_rng` takes."""
    p = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    t = np.asarray(targets, dtype=bool).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{p.size} probabilities but {t.size} targets")
    if p.size <= max_pixels:
        return p.copy(), t.copy()
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(p.size, size=int(max_pixels), replace=False))
    return p[keep], t[keep]


class PixelSample:
    """Seeded pixel samples of several scans (at most ``per_scan`` pixels each, drawn with the
    seed and the scan's key, so the same scan gives the same pixels in any order or process).

    :meth:`add` one scan at a time while it is scored, :meth:`merge` the samples of several
    processes, and read :meth:`arrays` (at most ``max_pixels`` in all).
    """

    def __init__(self, per_scan: int = PIXELS_PER_SCAN, seed: int = SAMPLE_SEED) -> None:
        self.per_scan = int(per_scan)
        self.seed = int(seed)
        self.parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, key: int, probabilities: Any, targets: Any) -> None:
        """Sample one scan's probabilities and targets (any equal shapes)."""
        self.parts[int(key)] = pixel_sample(
            probabilities, targets, self.per_scan, (self.seed, int(key))
        )

    def merge(self, others: Iterable[PixelSample]) -> PixelSample:
        """This sample with every scan of ``others`` (the first seen of a repeated key)."""
        for other in others:
            for key, part in other.parts.items():
                self.parts.setdefault(key, part)
        return self

    def __len__(self) -> int:
        return sum(int(p.size) for p, _ in self.parts.values())

    def arrays(self, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities, targets)`` of the scans in key order, at most ``max_pixels``."""
        keys = sorted(self.parts)
        if not keys:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        p = np.concatenate([self.parts[k][0] for k in keys])
        t = np.concatenate([self.parts[k][1] for k in keys])
        return pixel_sample(p, t, max_pixels, self.seed)


# --------------------------------------------------------------------------- the summary


def calibration_summary(
    probabilities: Any, targets: Any, temperature: float, bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """ECE before and after calibration of CALIBRATED probabilities (the predictor's): after on
    them, before on the same pixels with the temperature undone (``apply_temperature(p, 1 / T)``).
    """
    temperature = check_temperature(temperature)
    after = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    before = apply_temperature(after, 1.0 / temperature)
    return {
        "temperature": temperature,
        "bins": int(bins),
        "pixels": int(after.size),
        "ece_before": expected_calibration_error(before, targets, bins),
        "ece_after": expected_calibration_error(after, targets, bins),
    }


# --------------------------------------------------------------------------- the diagram

_BEFORE = (230, 120, 30)
_AFTER = (40, 100, 200)
_GREY = (150, 150, 150)
_LIGHT = (225, 225, 225)
_BLACK = (20, 20, 20)


def reliability_diagram(
    probabilities_before: Any,
    probabilities_after: Any,
    targets: Any,
    bins: int = CALIBRATION_BINS,
    temperature: float | None = None,
    title: str = "Reliability (pixels)",
    size: int = 480,
) -> Any:
    """A ``PIL.Image`` (RGB): per probability bin, the fraction of ICH pixels against the mean
    probability before (orange) and after (blue, also as bars) calibration, the diagonal of a
    perfectly calibrated model, axis labels and each curve's ECE in the legend. With
    ``probabilities_after`` None only the raw curve is drawn."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, size - 16, 40, size - 56
    width, height = right - left, bottom - top

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * width, bottom - y * height

    for k in range(6):  # grid and ticks
        v = k / 5
        x, y = xy(v, v)
        draw.line([(x, top), (x, bottom)], fill=_LIGHT)
        draw.line([(left, y), (right, y)], fill=_LIGHT)
        draw.text((x - 8, bottom + 6), f"{v:.1f}", fill=_BLACK, font=font)
        draw.text((left - 30, y - 6), f"{v:.1f}", fill=_BLACK, font=font)
    draw.rectangle([left, top, right, bottom], outline=_BLACK)
    draw.text((left, 10), title, fill=_BLACK, font=font)
    draw.text((left + width / 2 - 110, bottom + 24), "confidence (mean probability in bin)",
              fill=_BLACK, font=font)  # fmt: skip
    label = Image.new("RGB", (height, 14), "white")
    ImageDraw.Draw(label).text((height / 2 - 90, 0), "accuracy (fraction of ICH pixels)",
                               fill=_BLACK, font=font)  # fmt: skip
    image.paste(label.rotate(90, expand=True), (4, top))

    series: list[tuple[Any, tuple[int, int, int], str]] = []
    raw_name = "raw" if temperature is None else "before (T = 1)"
    series.append((probabilities_before, _BEFORE, raw_name))
    if probabilities_after is not None:
        after_name = "after" if temperature is None else f"after (T = {temperature:.3g})"
        series.append((probabilities_after, _AFTER, after_name))
    bar_width = width / bins
    confidence, accuracy, counts = reliability_bins(series[-1][0], targets, bins)
    for b in range(bins):  # bars of the last curve, in its own colour, lightly
        if counts[b]:
            x0, y0 = xy(b / bins, accuracy[b])
            colour = tuple(int(255 - 0.25 * (255 - c)) for c in series[-1][1])
            draw.rectangle([x0 + 1, y0, x0 + bar_width - 1, bottom], fill=colour)
    for k in range(0, 40, 2):  # the diagonal, dashed
        draw.line([xy(k / 40, k / 40), xy((k + 1) / 40, (k + 1) / 40)], fill=_GREY, width=2)
    draw.rectangle([left, top, right, bottom], outline=_BLACK)
    legend_y = top + 8
    for probabilities, colour, name in series:
        confidence, accuracy, counts = reliability_bins(probabilities, targets, bins)
        points = [xy(c, a) for c, a, n in zip(confidence, accuracy, counts, strict=True) if n]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ece = expected_calibration_error(probabilities, targets, bins)
        draw.rectangle([left + 8, legend_y + 2, left + 18, legend_y + 10], fill=colour)
        draw.text((left + 24, legend_y), f"{name}: ECE {ece:.4f}", fill=_BLACK, font=font)
        legend_y += 16
    draw.line([(left + 8, legend_y + 6), (left + 18, legend_y + 6)], fill=_GREY)
    draw.text((left + 24, legend_y), "perfect calibration", fill=_BLACK, font=font)
    return image


def save_png(image: Any, path: Any) -> Any:
    """Write a ``PIL.Image`` as PNG atomically; returns the path."""
    from pathlib import Path

    from ichseg.utils.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def image_tensor(image: Any) -> Any:
    """A ``PIL.Image`` as a ``(3, H, W)`` uint8 tensor, as ``SummaryWriter.add_image`` takes it."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# ------------------------------------------------------------------ the evaluation's records


def fit_on_validation(
    sample: PixelSample | None, temperature: float, threshold: float, calibrate: bool = True
) -> dict[str, Any]:
    """The calibration of an operating point tuned on val: the temperature fitted on the val
    pixel ``sample`` (1 without ``calibrate``) on top of the configured ``temperature``, the val
    ECE before / after it, and the tuned ``threshold`` mapped to the calibrated scale."""
    sample = sample if sample is not None else PixelSample()
    probabilities, targets = sample.arrays()
    fitted = fit_temperature(probabilities, targets) if calibrate else 1.0
    bins = CALIBRATION_BINS
    return {
        "split": "val",
        "calibrated": calibrate,
        "temperature": temperature * fitted,
        "fitted_temperature": fitted,
        "pixels": int(probabilities.size),
        "bins": bins,
        "ece_before": expected_calibration_error(probabilities, targets, bins),
        "ece_after": expected_calibration_error(
            apply_temperature(probabilities, fitted), targets, bins
        ),
        "threshold_uncalibrated": threshold,
        "threshold": calibrated_threshold(threshold, fitted),
    }


def calibrated_operating_spec(
    spec: InferenceSpec, choice: TuningChoice, calibration: Mapping[str, Any]
) -> InferenceSpec:
    """``spec`` at the operating point ``choice`` tuned on val, with the temperature fitted
    there (:func:`fit_on_validation`) and the threshold mapped to the calibrated scale, so that
    the masks stay those chosen."""
    threshold = calibrated_threshold(choice.threshold, calibration["fitted_temperature"])
    tuned = spec.with_operating_point(threshold, choice.postprocess)
    return replace(tuned, temperature=calibration["temperature"])


def operating_point_record(
    spec: InferenceSpec, choice: TuningChoice, calibration: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The operating point tuned on val as stored in a checkpoint's metadata: the applied
    ``spec``'s threshold and post-processing, the val Dice of ``choice`` and, after a
    calibration, the temperature and the threshold on the uncalibrated scale."""
    record = {
        "source": "tuned on val",
        "threshold": spec.threshold,
        "postprocess": spec.postprocess,
        "val_dice": None if math.isnan(choice.dice) else choice.dice,
        "fallback": choice.fallback,
        "patients": list(choice.patients),
    }
    if calibration is not None:
        record["temperature"] = spec.temperature
        record["threshold_uncalibrated"] = choice.threshold
        record["calibration_pixels"] = calibration["pixels"]
    return record


def split_calibration(
    pixels: PixelSample, temperature: float, split: str, fit: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], Any]:
    """The report's calibration of ``split``: the ECE before / after ``temperature`` on its pixel
    sample (the predictor's calibrated probabilities; before: the temperature undone), the val
    ``fit`` (:func:`fit_on_validation`) if any, and the reliability diagram (``PIL.Image``)."""
    probabilities, targets = pixels.arrays()
    summary = calibration_summary(probabilities, targets, temperature, CALIBRATION_BINS)
    summary["split"] = split
    summary["diagram"] = "reliability.png"
    if fit is not None:
        summary["fit"] = {k: v for k, v in fit.items() if k != "fitted_temperature"}
    title = f"Reliability: {split} pixels"
    if temperature == 1.0:
        diagram = reliability_diagram(probabilities, None, targets, title=title)
    else:
        raw = apply_temperature(probabilities, 1.0 / temperature)
        diagram = reliability_diagram(raw, probabilities, targets, CALIBRATION_BINS,
                                      temperature, title=title)  # fmt: skip
    return summary, diagram


__all__: Sequence[str] = (
    "CALIBRATION_BINS", "MAX_PIXELS", "PIXELS_PER_SCAN", "PixelSample", "apply_temperature",
    "calibrated_operating_spec", "calibrated_threshold", "calibration_summary",
    "check_temperature", "expected_calibration_error", "fit_on_validation", "fit_temperature",
    "image_tensor", "operating_point_record", "pixel_sample", "reliability_bins",
    "reliability_diagram", "save_png", "split_calibration",
)  # fmt: skip
