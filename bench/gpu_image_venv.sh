#!/usr/bin/env bash
# The GPU machine's software, on this CPU: a side virtual environment with what the lent H200's image runs
# (torch 2.11 + CUDA 13.0, Triton 3.6, transformers 5.17; bench/results/gpu_h200/env_kernels.txt), then the fast
# test tier in it. A GPU session has 15 minutes; what breaks on that stack (not on the pinned torch 2.13) is found
# here first.
#
#   bash bench/gpu_image_venv.sh            build .venv-gpu-image (once, ~2 min, ~4 GB: PyPI's torch 2.11 is a
#                                           CUDA build, which runs on a CPU), then pytest -m "not slow" in it
#   bash bench/gpu_image_venv.sh ARGS...    build, then pytest ARGS... in it
#
# The checkout runs from PYTHONPATH: nothing of it is installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-gpu-image
if [ ! -f "$venv/.installed" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0
    # NumPy below 2.4: Triton 3.6's interpreter fails beside 2.4 (triton-lang/triton#9171)
    "$venv/bin/pip" install -q transformers==5.17.0 "numpy<2.4" gguf accelerate safetensors tqdm networkx \
        matplotlib onnx onnxscript onnx-ir onnxruntime pytest
    touch "$venv/.installed"
fi
"$venv/bin/python" -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'triton', triton.__version__)"
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m "not slow")
PYTHONPATH="$PWD" exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "${args[@]}"
