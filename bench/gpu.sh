#!/usr/bin/env bash
# The GPU benchmark in one command (bench/gpu.py has the steps): training windows/s of the paper
# U-Net and of windowed_plus (bf16-mixed, channels_last, with and without torch.compile), the GPU
# idle share, stitched evaluation seconds per scan and prediction seconds for a 40-slice 512x512
# scan. Under 8 minutes on one H200.
#   bench/gpu.sh              # on a CUDA machine
#   bench/gpu.sh --dry-run    # the same steps at tiny sizes on the CPU (about a minute)
# Exit status: 0 when every step ran, 1 when one failed. PYTHON picks the interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$here/gpu.py" "$@"
