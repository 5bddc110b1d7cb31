#!/usr/bin/env bash
# Make .venv with the project (editable, dev extra) at the pinned versions of constraints.txt,
# and the Fashion-MNIST Debian package used by the demo and the tests.
# Idempotent: when pyproject.toml and constraints.txt are unchanged since the last successful
# run, the pip step is skipped and a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.hcsc-setup-stamp

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the project and its pinned dependencies into $VENV (first run: minutes)"
    "$VENV/bin/pip" install -q --upgrade pip
    # torch/torchvision first, on their own: they come from the machine's local wheel copy.
    "$VENV/bin/pip" install -q -c constraints.txt torch torchvision
    # DALI's CUDA 12 build (pinned before the move to one CUDA 13 stack) installs the same module
    # as the CUDA 13 one: remove it first, or the two overwrite each other's files.
    if "$VENV/bin/pip" show -q nvidia-dali-cuda120 >/dev/null 2>&1; then
        echo "setup: replacing nvidia-dali-cuda120 with the pinned CUDA 13 build"
        "$VENV/bin/pip" uninstall -y -q nvidia-dali-cuda120
    fi
    "$VENV/bin/pip" install -q -c constraints.txt -e ".[dev]"
    # foolbox ships 20 real ImageNet JPEGs the tests read as files; its code is never imported,
    # so none of its dependencies are installed.
    "$VENV/bin/pip" install -q -c constraints.txt --no-deps foolbox
    echo "$want" > "$STAMP"
else
    echo "setup: $VENV is up to date"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing the Debian package dataset-fashion-mnist"
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: Fashion-MNIST is missing; run: sudo apt-get install dataset-fashion-mnist"
    fi
fi
