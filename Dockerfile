# HCSC trainer image: one CUDA 13 stack (torch's cu130 wheels, DALI's cuda130 wheel), Python 3.12.
#   docker build -t hcsc .                       # faiss-cpu: k-means searches in torch on the GPU
#   docker build --build-arg FAISS=gpu -t hcsc . # faiss-gpu and its pinned CUDA 12 user space
#   docker run --gpus all --ipc=host -v /data:/data hcsc hcsc-train --config configs/hcsc_r50_200ep.yaml \
#       data.shards=/data/in1k-shards
# Needs an NVIDIA driver >= 580 (CUDA 13.0); the base image's label makes the container runtime
# refuse an older one at start instead of torch silently seeing no GPU. Not built in CI (no Docker
# engine on the CI machines); the pins are constraints.txt's, as everywhere else.
FROM nvidia/cuda:13.0.1-base-ubuntu24.04

# cpu | gpu: the pyproject extra that brings faiss (exactly one build; core/install.py)
ARG FAISS=cpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# The CUDA libraries come from the pip wheels (torch's nvidia-*-cu13, DALI's nvjpeg...); the base
# image only adds the driver requirement. g++ and ninja: DeepSpeed builds its few JIT ops at run time.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev g++ ninja-build git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/hcsc
COPY constraints.txt pyproject.toml README.md ./
COPY core core
COPY shards shards
COPY pipeline pipeline
COPY model model
COPY cluster cluster
COPY train train
COPY evaluate evaluate
COPY configs configs
COPY scripts scripts
RUN pip install --upgrade pip \
    && pip install -c constraints.txt torch torchvision \
    && pip install -c constraints.txt ".[${FAISS}]" \
    && python -c "import torch, nvidia.dali, faiss; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

ENTRYPOINT []
CMD ["hcsc-train", "--help"]
