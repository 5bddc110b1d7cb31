#!/usr/bin/env bash
# Gather, on a machine with the package registry, the wheels that a GPU machine with PyTorch
# preinstalled but no internet lacks (Python 3.12, manylinux x86_64), into .gpu-wheels/ (ignored by
# git). scripts/gpu_check.sh installs them from there (--no-index) before its stages.
#   scripts/gpu_wheels.sh          # stage 1: webdataset, omegaconf, DeepSpeed (built as a wheel),
#                                  #          faiss-cpu, pydantic and what they need; at most 60 MB
#   scripts/gpu_wheels.sh --dali   # stage 2, optional: DALI's CUDA 13 build and its libraries
#                                  #          (about 200 MB more; into .gpu-wheels-dali/)
# Versions are constraints.txt's. Packages the GPU image already has (torch, numpy, PyYAML, psutil,
# einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py, tqdm, packaging...) are not fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}
pin() { grep -i "^$1==" constraints.txt | head -1 || { echo "gpu_wheels: $1 is not pinned in constraints.txt" >&2; exit 2; }; }
fetch() {  # binary wheels for the GPU machine's Python, whatever this machine's is
    local dest=$1; shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$@"
}

if [ "${1:-}" = "--dali" ]; then
    dest=.gpu-wheels-dali
    mkdir -p "$dest"
    fetch "$dest" "$(pin nvidia-dali-cuda130)" "$(pin nvidia-nvimgcodec-cu13)" "$(pin nvidia-nvjpeg)" \
        "$(pin nvidia-nvjpeg2k-cu13)" "$(pin nvidia-nvtiff-cu13)" "$(pin nvidia-libnvcomp-cu13)" \
        "$(pin astunparse)" "$(pin gast)" "$(pin optree)" "$(pin makefun)" "$(pin nvtx)"
else
    dest=.gpu-wheels
    mkdir -p "$dest"
    fetch "$dest" "$(pin webdataset)" "$(pin braceexpand)" "$(pin omegaconf)" "$(pin faiss-cpu)" \
        "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
        "$(pin hjson)"
    # DeepSpeed is published as a source archive only; its wheel is pure Python (ops build at run time).
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$(pin deepspeed)"
fi
size=$(du -sm "$dest" | cut -f1)
echo "gpu_wheels: $(ls "$dest" | wc -l) wheels, ${size} MB in $dest"
if [ "$dest" = .gpu-wheels ] && [ "$size" -gt 60 ]; then
    echo "gpu_wheels: $dest holds ${size} MB, more than the 60 MB a device call may carry" >&2
    exit 1
fi
