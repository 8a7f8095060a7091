"""Stitching windows into slices: averaging, the window grid, batching, MONAI equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichseg.data.tiles import make_grid
from ichseg.errors import ConfigError
from ichseg.inference.stitch import (
    coverage_map,
    full_slice,
    stitch,
    tile_weights,
    to_original_grid,
    window_weights,
)


def identity_logits(x: torch.Tensor) -> torch.Tensor:
    """logit = the first input channel, position-independent."""
    return x[:, :1].clone()


def small_net(channels: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 1, 3, padding=1),
    )


@pytest.mark.parametrize("size", [640, 512, (200, 330)])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_constant_model_gives_the_constant(size, mode) -> None:
    height, width = (size, size) if isinstance(size, int) else size
    logit = 0.7
    model = lambda x: torch.full((x.shape[0], 1, *x.shape[-2:]), logit)  # noqa: E731
    out = stitch(model, torch.rand(2, 1, height, width), blend=mode, tile_batch_size=13)
    assert out.shape == (2, height, width) and out.dtype == torch.float32
    expected = torch.sigmoid(torch.tensor(logit))
    assert torch.allclose(out, expected.expand_as(out), rtol=0, atol=1e-6)  # float32 rounding


@pytest.mark.parametrize("size", [640, 512])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_position_independent_model_gives_its_function(size, mode) -> None:
    x = torch.randn(3, 1, size, size) * 4
    out = stitch(identity_logits, x, blend=mode, tile_batch_size=20)
    assert torch.allclose(out, torch.sigmoid(x[:, 0]), rtol=0, atol=1e-6)  # float32 rounding


def test_coverage_is_the_1_2_4_pattern_at_640() -> None:
    counts = coverage_map(640, 160, 80)
    expected = torch.full((640, 640), 4.0)
    expected[:80, :] /= 2
    expected[-80:, :] /= 2
    expected[:, :80] /= 2
    expected[:, -80:] /= 2
    assert torch.equal(counts, expected)
    assert sorted(torch.unique(counts).tolist()) == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("size", [512, (600, 650), 161])
def test_coverage_matches_the_grid_with_an_edge_aligned_last_window(size) -> None:
    grid = make_grid(size, 160, 80)
    assert torch.equal(coverage_map(size, 160, 80), torch.from_numpy(grid.coverage()).float())
    if size == 512:
        assert sorted(set(grid.corners[:, 0].tolist())) == [0, 80, 160, 240, 320, 352]


def test_tile_weights() -> None:
    assert torch.equal(tile_weights(160), torch.ones(160, 160))
    gauss = tile_weights(160, "gaussian")
    assert gauss.shape == (160, 160)
    assert torch.equal(gauss, gauss.flip(0)) and torch.equal(gauss, gauss.T)  # centred, symmetric
    assert gauss.min().item() == pytest.approx(1e-3)  # MONAI's floor
    sigma = 0.125 * 160
    centre = np.exp(-(0.5**2) / (2 * sigma**2)) ** 2  # pixels 79 and 80 are 0.5 from the centre
    assert gauss.max().item() == pytest.approx(centre, rel=1e-6)
    with pytest.raises(ConfigError):
        tile_weights(160, "median")  # type: ignore[arg-type]


def test_batches_of_slices_and_window_batches_do_not_change_the_result() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 5, padding=2)  # output depends on the window border: a real test
    x = torch.rand(3, 1, 512, 512)
    together = stitch(net, x, tile_batch_size=49)
    separately = torch.cat([stitch(net, x[i : i + 1], tile_batch_size=49) for i in range(3)])
    assert torch.allclose(together, separately, rtol=0, atol=1e-6)
    for batch in (5, 1000):  # (batch size 1 is slow only because of oneDNN per-call setup)
        assert torch.allclose(stitch(net, x, tile_batch_size=batch), together, rtol=0, atol=1e-6)


def test_windows_are_cut_at_the_grid_positions() -> None:
    """A model that reports each pixel's own coordinate stitches back to the coordinate map."""
    height, width = 330, 250
    coords = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    x = torch.cat([coords, torch.zeros_like(coords)], dim=1)  # two channels
    seen: list[torch.Tensor] = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch[:, 0, 0, 0].clone())  # top-left pixel id of each window
        return batch[:, :1] / 1e6  # small logits: sigmoid is monotone and exact enough

    out = stitch(model, x, tile_size=160, tile_stride=80, tile_batch_size=4)
    grid = make_grid((height, width), 160, 80)
    expected_corners = grid.corners[:, 0] * width + grid.corners[:, 1]
    assert torch.cat(seen).long().tolist() == expected_corners.tolist()
    assert torch.allclose(out[0], torch.sigmoid(coords[0, 0] / 1e6), rtol=0, atol=1e-7)


def test_model_mode_is_restored_and_dropout_is_off() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Dropout(0.5))
    model.train()
    x = torch.rand(1, 1, 320, 320)
    first, second = stitch(model, x), stitch(model, x)
    assert model.training
    assert not first.is_inference()  # an ordinary tensor: usable outside inference mode
    assert torch.equal(first, second)


def test_full_slice_has_the_same_format() -> None:
    net = small_net()
    x = torch.rand(5, 1, 160, 192)
    out = full_slice(net, x, batch_size=2)
    assert out.shape == (5, 160, 192) and out.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(out, torch.sigmoid(net(x))[:, 0], atol=1e-6)
    # a slice that is exactly one window stitches to the full-slice output
    square = x[:, :, :160, :160]
    assert torch.allclose(
        stitch(net, square, tile_size=160, tile_stride=80), full_slice(net, square), atol=1e-6
    )


def test_bad_input_and_bad_model_output() -> None:
    with pytest.raises(ConfigError):
        stitch(identity_logits, torch.rand(1, 640, 640))
    with pytest.raises(ConfigError):
        stitch(lambda x: x[:, :1, :10, :10], torch.rand(1, 1, 320, 320))
    with pytest.raises(ConfigError):
        stitch(identity_logits, torch.rand(1, 1, 100, 100))  # window larger than the slice


def test_to_original_grid() -> None:
    probabilities = torch.full((2, 640, 640), 0.25)
    resized = to_original_grid(probabilities, (512, 512), mode="resize")
    assert resized.shape == (2, 512, 512) and resized.dtype == np.float32
    assert np.allclose(resized, 0.25)
    cropped = to_original_grid(probabilities, (650, 650), mode="crop")
    assert cropped.shape == (2, 650, 650)
    assert np.all(cropped[:, :5] == 0) and np.all(cropped[:, :, -5:] == 0)
    assert np.all(cropped[:, 5:-5, 5:-5] == 0.25)


# --------------------------------------------------------------------------- MONAI


@pytest.mark.parametrize(
    ("size", "channels", "mode"),
    [
        (640, 1, "constant"),
        (512, 1, "constant"),
        ((330, 250), 2, "constant"),
        (640, 1, "gaussian"),
        (512, 1, "gaussian"),
    ],
)
def test_equals_monai_sliding_window_inference(size, channels, mode) -> None:
    monai_inferers = pytest.importorskip("monai.inferers")
    height, width = (size, size) if isinstance(size, int) else size
    net = small_net(channels)
    x = torch.rand(2, channels, height, width)
    ours = stitch(net, x, tile_size=160, tile_stride=80, tile_batch_size=16, blend=mode)
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(
            x,
            roi_size=(160, 160),
            sw_batch_size=16,
            predictor=lambda w: torch.sigmoid(net(w)),
            overlap=0.5,
            mode=mode,
        )
    assert theirs.shape == (2, 1, height, width)
    assert torch.allclose(ours, theirs[:, 0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_amp() -> None:
    net = small_net().cuda()
    x = torch.rand(2, 1, 640, 640)
    reference = stitch(net.cpu(), x)
    net.cuda()
    on_gpu = stitch(net, x)
    assert on_gpu.device.type == "cpu"  # returned where the slices were
    assert torch.allclose(on_gpu, reference, atol=1e-5)
    with_amp = stitch(net, x, amp=True, amp_dtype=torch.bfloat16, output_device="cuda")
    assert with_amp.device.type == "cuda" and with_amp.dtype == torch.float32
    assert torch.allclose(with_amp.cpu(), reference, atol=2e-2)


def test_the_earlier_keyword_names_still_work_with_a_warning() -> None:
    x = torch.rand(1, 1, 64, 64)
    expected = stitch(identity_logits, x, tile_size=32, tile_stride=16, blend="gaussian")
    with pytest.warns(FutureWarning, match=r"stitch\(window=...\) is now tile_size=..."):
        old = stitch(identity_logits, x, window=32, stride=16, window_batch_size=3, mode="gaussian")
    assert torch.equal(old, expected)
    assert window_weights is tile_weights
    with pytest.raises(TypeError, match="both window= and tile_size="):
        stitch(identity_logits, x, window=32, tile_size=32)
