#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The report test renders the HTML page in a real headless browser (Debian's chromium).
if [ ! -x /usr/bin/chromium ]; then
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
.venv/bin/python -m pytest "$@"
