"""scripts/gpu_check.sh --cpu-smoke: the GPU acceptance run's every stage at toy size on the CPU, so
the script a GPU session depends on cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = {"env", "pytest", "engine", "throughput", "kmeans", "cli", "two_ranks"}


@pytest.mark.slow
def test_every_stage_passes_at_toy_size_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--cpu-smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    log_file = tmp_path / "gpu_check.log"
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    assert proc.returncode == 0, proc.stdout + log[-6000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["stages"]) == STAGES and result["ok"]
    stages = result["stages"]
    assert not stages["env"]["missing"] and stages["env"]["cuda_available"] is False
    for zero in ("zero0", "zero1"):
        engine = stages["engine"][zero]
        assert engine["not_fp32"] == [] and engine["state_differs_after_load"] == []
        # on the CPU the continuation after a load is the uninterrupted run's, to float rounding
        assert engine["after_save"] == pytest.approx(engine["after_load"], rel=1e-6)
    assert stages["throughput"]["torch_images_per_s"] > 0 and stages["throughput"]["hcsc_vs_moco"] > 0
    assert stages["kmeans"]["iterations"] >= 1 and stages["kmeans"]["floor_s"] > 0
    cli = stages["cli"]
    assert cli["exit_after_sigterm"] == 0 and cli["checkpoint_after_sigterm"] and cli["resumed"]
    assert cli["knn"]["knn"]["5"]["top1"] >= 0
    for rank in ("rank0", "rank1"):
        assert stages["two_ranks"][rank]["kmeans_objective_equal"] is True


def test_a_missing_results_folder_is_a_usage_error():
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: scripts/gpu_check.sh OUT_DIR [--cpu-smoke]" in proc.stderr
