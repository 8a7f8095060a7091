"""The one inference recipe: a network and its two specs turn a scan into probabilities on the
scan's own grid and a mask.

::

    HU (H, W, N) -> CT windows as uint8 channels -> working size (N, C, S, S)   working_slices
      -> tiles through the network, blended, or whole slices (N, S, S)   working_probabilities
      -> back to the scan's grid (N, H, W), temperature-scaled                  probabilities
      -> threshold, closing / opening scaled to the grid (N, H, W) bool                   mask

The stitched evaluation feeds it the working-size slices of its slice store (built by the same
windowing and resampling as :meth:`Predictor.working_slices`); ``ichseg.predict`` feeds it HU
volumes. Both therefore produce the same probabilities and masks for the same scan
(tests/test_recipe_roundtrip.py). The steps are :mod:`ichseg.inference.stitch` and
:mod:`ichseg.eval.postprocess`; this module only composes them under the specs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ichseg.data.windowing import stack_windows, to_working_size
from ichseg.errors import IchsegError
from ichseg.eval.calibration import apply_temperature
from ichseg.eval.postprocess import grid_scale, postprocess_thresholds
from ichseg.inference.stitch import full_slice, stitch, to_original_grid
from ichseg.specs import InferenceSpec, InputSpec

#: Network batches per chunk of slices sent to the device (and per progress-bar step).
BATCHES_PER_CHUNK = 4


class NonFinitePrediction(IchsegError):
    """The network gave NaN or infinite probabilities (diverged weights, or an overflow)."""


def resolve_autocast(autocast: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an :class:`InferenceSpec` ``autocast`` on ``device``; None: off.

    Autocast only ever applies on CUDA; ``"auto"`` is bf16 there (fp16 where bf16 is not
    supported).
    """
    if device.type != "cuda" or autocast == "none":
        return None
    if autocast == "fp16":
        return torch.float16
    if autocast == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Predictor:
    """A network with its :class:`InputSpec` and :class:`InferenceSpec`.

    ``net`` maps ``(B, in_channels, s, s)`` float inputs in [0, 1] to logits ``(B, 1, s, s)``
    (an :class:`~ichseg.models.UNet`, an :class:`~ichseg.models.intensity_band.IntensityBand`, or a
    LightningModule's forward). It runs on ``device`` (default: its parameters' device) in eval
    mode under ``torch.inference_mode``; inputs are cast to its floating-point parameter dtype.
    Non-finite probabilities raise :class:`NonFinitePrediction` naming ``source`` (default: the
    checkpoint file of a network from :func:`ichseg.checkpoint.load_model`).
    """

    def __init__(
        self,
        net: Callable[[torch.Tensor], torch.Tensor],
        input_spec: InputSpec,
        inference_spec: InferenceSpec,
        device: torch.device | str | None = None,
        source: str | None = None,
    ) -> None:
        if not isinstance(input_spec, InputSpec) or not isinstance(inference_spec, InferenceSpec):
            raise TypeError("Predictor takes an InputSpec and an InferenceSpec")
        parameters = list(net.parameters()) if isinstance(net, torch.nn.Module) else []
        if device is None:
            device = parameters[0].device if parameters else "cpu"
        self.net = net
        self.input_spec = input_spec
        self.inference_spec = inference_spec
        self.device = torch.device(device)
        self.source = source or getattr(net, "ichseg_checkpoint", None) or "the network"
        self.amp_dtype = resolve_autocast(inference_spec.autocast, self.device)
        self.input_dtype = next(
            (p.dtype for p in parameters if p.is_floating_point()), torch.float32
        )

    # ------------------------------------------------------------------ the steps

    def working_slices(self, hu: np.ndarray) -> np.ndarray:
        """``(N, C, S, S)`` uint8: the CT windows of an ``(H, W, N)`` HU volume at the working
        size, as the slice store holds training slices."""
        spec = self.input_spec
        windows = stack_windows(np.moveaxis(hu, 2, 0), spec.channels, np.uint8)  # (C, N, H, W)
        slices = np.moveaxis(windows, 0, 1)
        return np.ascontiguousarray(to_working_size(slices, spec.working_size, spec.working_mode))

    def _model(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_dtype != torch.float32:
            images = images.to(self.input_dtype)
        return self.net(images)

    def working_probabilities(self, slices: np.ndarray, progress: Any = None) -> torch.Tensor:
        """``(N, S, S)`` float32 CPU probabilities of one volume's uint8 working slices
        ``(N, C, S, S)`` in order.

        Slices go to the device in chunks (with ``context_slices`` neighbours on each side, so
        that every slice sees the same neighbours as in one pass); ``progress`` (a tqdm bar)
        advances by the tiles of each chunk.
        """
        spec, run = self.input_spec, self.inference_spec
        n_slices, size = int(slices.shape[0]), spec.working_size
        per_slice = spec.tiles_per_slice
        chunk = max(1, -(-run.tile_batch_size * BATCHES_PER_CHUNK // per_slice))
        k = spec.context_slices
        amp = {"amp": self.amp_dtype is not None, "amp_dtype": self.amp_dtype or torch.bfloat16}
        out = torch.empty((n_slices, size, size), dtype=torch.float32)
        for start in range(0, n_slices, chunk):
            stop = min(start + chunk, n_slices)
            low, high = max(0, start - k), min(n_slices, stop + k)
            part = torch.from_numpy(np.array(slices[low:high], dtype=np.uint8, order="C"))
            images = part.to(self.device, non_blocking=True).to(torch.float32).mul_(1.0 / 255.0)
            common = {
                "device": self.device, "output_device": "cpu", "context_slices": k,
                "rows": slice(start - low, stop - low), **amp,
            }  # fmt: skip
            if spec.mode == "windowed":
                maps = stitch(
                    self._model, images, spec.tile_size, spec.tile_stride,
                    tile_batch_size=run.tile_batch_size, blend=run.blend,  # type: ignore[arg-type]
                    sigma_scale=run.sigma_scale, **common,
                )  # fmt: skip
            else:
                maps = full_slice(self._model, images, batch_size=run.tile_batch_size, **common)
            if not bool(torch.isfinite(maps).all()):
                bad = int((~torch.isfinite(maps)).sum())
                raise NonFinitePrediction(
                    f"{self.source}: the network gives {bad} NaN or infinite probabilities on "
                    f"slices {start}-{stop - 1} (diverged weights, or an overflow under "
                    f"autocast {self.inference_spec.autocast!r}); no mask is written from them"
                )
            out[start:stop] = maps
            if progress is not None:
                progress.update((stop - start) * per_slice)
        return out

    def probabilities(
        self, slices: np.ndarray, shape: Sequence[int], progress: Any = None
    ) -> np.ndarray:
        """``(N, H, W)`` float32 probabilities on the scan's in-plane grid ``shape`` (H, W) from
        its working slices ``(N, C, S, S)``, scaled by the spec's ``temperature`` (when not 1)."""
        working = self.working_probabilities(slices, progress)
        native = to_original_grid(
            working, (int(shape[0]), int(shape[1])), self.input_spec.working_mode
        )
        temperature = self.inference_spec.temperature
        return native if temperature == 1.0 else apply_temperature(native, temperature)

    def scale(self, shape: Sequence[int]) -> tuple[float, float]:
        """Pixels of the scan's ``(H, W)`` grid per pixel of ``reference_size`` slices: the scale
        of the closing / opening sizes (and of the evaluation's detection area)."""
        spec = self.input_spec
        return grid_scale(
            shape, spec.working_size, spec.working_mode, self.inference_spec.reference_size
        )

    def mask(self, probabilities: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """``(N, H, W)`` bool mask of scan-grid probabilities: the threshold (default the spec's),
        then the closing / opening, exactly as the evaluation counts it."""
        config = self.inference_spec.postprocess_config(threshold)
        levels = [config.threshold]
        return postprocess_thresholds(
            probabilities, levels, config, self.scale(probabilities.shape)
        )[0]

    # ------------------------------------------------------------------ whole scans

    def predict_hu(self, hu: np.ndarray, progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(H, W, N)`` float32 and mask ``(H, W, N)`` bool of an ``(H, W, N)``
        int16 HU volume (slices on the third axis, as CT-ICH's NIfTI files)."""
        native = self.probabilities(self.working_slices(hu), hu.shape[:2], progress)
        mask = self.mask(native)
        return np.moveaxis(native, 0, 2), np.moveaxis(mask, 0, 2)
