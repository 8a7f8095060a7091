"""The benchmarks under bench/ run: the GPU script's CPU rehearsal end to end, and the options."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
NUMBER = r"[-+]?\d+(?:\.\d+)?"


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, cwd=BENCH.parent
    )


@pytest.mark.slow
def test_gpu_script_dry_run_prints_every_measurement() -> None:
    done = run(["bash", str(BENCH / "gpu.sh"), "--dry-run"], timeout=600)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    for label in ("paper U-Net", "windowed_plus"):
        assert re.search(rf"^{label}: training {NUMBER} windows/s", out, re.M), out
        assert re.search(rf"^{label}: GPU idle share waiting for the loader {NUMBER} %", out, re.M)
        assert re.search(rf"^{label}: ratio plain / lightning: {NUMBER}", out, re.M)
    assert re.search(r"^windowed_plus compiled: skipped", out, re.M)
    assert re.search(rf"^stitched evaluation: {NUMBER} s per scan", out, re.M)
    assert re.search(rf"outside the forward: {NUMBER} s = {NUMBER} %", out)
    assert re.search(rf"^predict: {NUMBER} s for a 2-slice 128x128 scan", out, re.M)
    assert "FAILED" not in out
    assert re.search(r"^gpu bench: all steps ok", out, re.M)


def test_gpu_script_without_cuda_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the full run is not a fast test")
    done = run([sys.executable, str(BENCH / "gpu.py")], timeout=60)
    assert done.returncode == 2
    assert "--dry-run" in done.stdout


def test_train_loop_help_names_the_size_options() -> None:
    done = run([sys.executable, str(BENCH / "train_loop.py"), "--help"], timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--epochs", "--batches", "--base-filters", "--repeats"):
        assert option in done.stdout


def test_forward_timer_counts_calls_and_keeps_outputs() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from evaluate import ForwardTimer
    finally:
        sys.path.remove(str(BENCH))
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 8, 8)
    expected = net(x)
    timer = ForwardTimer(net, torch.device("cpu"))
    assert torch.equal(net(x), expected)
    net(x)
    assert timer.calls == 2 and timer.seconds > 0
