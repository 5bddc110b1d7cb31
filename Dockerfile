# HCSC trainer image: CUDA 12 runtime, the pinned constraints, the project, faiss-gpu.
#   docker build -t hcsc .
#   docker run --gpus all --ipc=host -v /data:/data hcsc hcsc-train --config configs/hcsc_r50_200ep.yaml \
#       data.shards=/data/in1k-shards
# Not built in CI (no Docker engine on the CI machines); keep it simple and in step with constraints.txt.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev g++ ninja-build git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/hcsc
COPY constraints.txt pyproject.toml README.md ./
COPY shards shards
COPY pipeline pipeline
COPY model model
COPY cluster cluster
COPY train train
COPY evaluate evaluate
COPY configs configs
# The gpu extra adds faiss-gpu; faiss-cpu (a base dependency) is removed so `import faiss` is the GPU build.
RUN pip install --upgrade pip \
    && pip install -c constraints.txt ".[gpu]" \
    && pip uninstall -y faiss-cpu \
    && pip install -c constraints.txt --force-reinstall --no-deps faiss-gpu

ENTRYPOINT []
CMD ["hcsc-train", "--help"]
