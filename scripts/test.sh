#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# DeepSpeed on the CPU with gloo unless there is a GPU (the engine also sets this itself).
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || export DS_ACCELERATOR=cpu
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
