#!/usr/bin/env bash
# Set up (idempotent), lint, type-check, and run the test suite. Extra arguments go to pytest.
#   scripts/test.sh           everything (what CI runs: .ci/run); prints the 15 slowest tests
#   scripts/test.sh --fast    the unit tests only (-m "not slow and not dist"), about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
args=()
for arg in "$@"; do
    if [ "$arg" = --fast ]; then fast=1; else args+=("$arg"); fi
done
scripts/setup.sh
# The report test renders the HTML page in a real headless browser (Debian's chromium).
if [ "$fast" = 0 ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "test: installing the Debian package chromium (report rendering test)"
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "test: chromium missing, the report rendering test will skip; run: sudo apt-get install chromium"
    fi
fi
# DeepSpeed on the CPU with gloo unless there is a GPU (the engine also sets this itself).
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || export DS_ACCELERATOR=cpu
.venv/bin/ruff check .
.venv/bin/mypy
if [ "$fast" = 1 ]; then
    exec .venv/bin/python -m pytest -m "not slow and not dist" ${args[@]+"${args[@]}"}
fi
exec .venv/bin/python -m pytest --durations=15 ${args[@]+"${args[@]}"}
