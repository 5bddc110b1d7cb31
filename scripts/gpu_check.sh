#!/usr/bin/env bash
# The GPU acceptance run (README.md#gpu): one command, at most 6 minutes on one GPU, for a machine
# with PyTorch preinstalled and no internet. Writes OUT/gpu_check.log and OUT/gpu_check.json.
#   scripts/gpu_check.sh OUT              # on the GPU machine (wheels from scripts/gpu_wheels.sh)
#   scripts/gpu_check.sh OUT --cpu-smoke  # the same stages at toy size on a CPU (CI runs this)
# Each stage runs in its own process under its own timeout; a failed or timed-out stage is
# recorded as such and the next one still runs. Exit status 0 only when every stage passed.
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR [--cpu-smoke]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
SMOKE=${2:-}
if [ -n "$SMOKE" ] && [ "$SMOKE" != --cpu-smoke ]; then
    echo "gpu_check: unknown option $SMOKE (only --cpu-smoke)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
LOG=$OUT/gpu_check.log
rm -rf "$OUT/stages" && mkdir -p "$OUT/stages"
: > "$LOG"
# On the CPU the smoke sizes are small, but a 2-core machine is slower than the GPU host's 16.
FACTOR=1
if [ -n "$SMOKE" ]; then FACTOR=3; export CUDA_VISIBLE_DEVICES=; fi

# The wheels carried here by scripts/gpu_wheels.sh, where this Python lacks what they hold.
if { [ -d .gpu-wheels ] || [ -d .gpu-wheels-dali ]; } \
        && ! "$PY" -c "import deepspeed, webdataset, omegaconf, faiss, pydantic" >/dev/null 2>&1; then
    SITE=/tmp/hcsc-gpu-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
        $(ls .gpu-wheels/*.whl .gpu-wheels-dali/*.whl 2>/dev/null) >>"$LOG" 2>&1 \
        || { echo "gpu_check: installing the carried wheels failed (see $LOG)"; exit 1; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

stage() {  # name, timeout in seconds (GPU)
    local name=$1 limit=$(( $2 * FACTOR )) start=$SECONDS
    echo "=== $name (timeout ${limit}s)" >>"$LOG"
    timeout --kill-after=10 "$limit" "$PY" scripts/gpu_check.py "$name" --out "$OUT" $SMOKE >>"$LOG" 2>&1
    local code=$?
    [ $code -eq 124 ] || [ $code -eq 137 ] && echo "gpu_check $name: TIMED OUT after ${limit}s" >>"$LOG"
    echo "gpu_check $name: exit $code after $(( SECONDS - start )) s"
}

pytest_stage() {
    local limit=$(( 50 * FACTOR )) start=$SECONDS
    echo "=== pytest -m gpu (timeout ${limit}s)" >>"$LOG"
    timeout --kill-after=10 "$limit" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests \
        > "$OUT/pytest.txt" 2>&1
    local code=$?
    cat "$OUT/pytest.txt" >>"$LOG"
    "$PY" - "$OUT" "$code" "$(( SECONDS - start ))" <<'PYEOF'
import json, sys
from pathlib import Path
out, code, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lines = [l for l in (out / "pytest.txt").read_text(errors="replace").splitlines() if l.strip()]
summary = lines[-1] if lines else ""
(out / "stages" / "pytest.json").write_text(json.dumps(
    {"ok": code == 0, "exit": code, "summary": summary, "seconds": seconds}, indent=2) + "\n")
PYEOF
    echo "gpu_check pytest: exit $code after $(( SECONDS - start )) s"
}

stage env 20
pytest_stage
stage engine 50
stage throughput 80
stage kmeans 40
stage cli 70
stage two_ranks 30
"$PY" scripts/gpu_check.py merge --out "$OUT"
code=$?
echo "gpu_check: $([ $code -eq 0 ] && echo 'every stage passed' || echo 'FAILED') in ${SECONDS} s; $OUT/gpu_check.json, log $LOG"
exit $code
