"""Which GPU a rank takes, and the start-up refusal of a GPU config torch cannot serve (CPU tests:
the CUDA queries are replaced, so they run on any machine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from core import dist
from core.config import load_config


@pytest.mark.parametrize(("visible", "local_rank", "index"), [
    (8, 3, 3),  # every process sees the host's GPUs (torchrun): the one at LOCAL_RANK
    (1, 3, 0),  # each process sees only its own (CUDA_VISIBLE_DEVICES per process): index 0
    (1, 0, 0),
])
def test_each_rank_takes_the_gpu_it_was_given(monkeypatch, visible, local_rank, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert dist.gpu_index() == index
    assert dist.device() == torch.device("cuda", index)


def test_a_rank_without_a_gpu_of_its_own_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=3 but this process sees only 2 GPUs "
                                           r"\(CUDA_VISIBLE_DEVICES=0,1\)"):
        dist.gpu_index()


def _driver(tmp_path, monkeypatch, *, cuda: bool, hidden: bool = False):
    from train import preflight

    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05\n")
    monkeypatch.setattr(preflight, "NVIDIA_DRIVER", version)

    def is_available() -> bool:
        if not cuda and not hidden:  # hidden GPUs: torch has nothing to warn about
            import warnings
            warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old", stacklevel=1)
        return cuda

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    if hidden:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    else:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return preflight


def test_a_driver_torch_cannot_use_stops_the_run_instead_of_a_silent_cpu_run(tmp_path, monkeypatch):
    preflight = _driver(tmp_path, monkeypatch, cuda=False)
    with pytest.raises(preflight.PreflightError) as err:
        preflight._check_hardware(load_config(None, []))
    message = str(err.value)
    assert "has an NVIDIA driver but torch" in message and "driver on your system is too old" in message
    assert "535.104.05" in message and "CUDA_VISIBLE_DEVICES=" in message and "\n" not in message


def test_hiding_the_gpus_on_purpose_trains_on_the_cpu(tmp_path, monkeypatch):
    preflight = _driver(tmp_path, monkeypatch, cuda=False, hidden=True)
    preflight._check_hardware(load_config(None, []))  # fp32 on the CPU: allowed
    with pytest.raises(preflight.PreflightError, match="engine.precision=bf16: mixed precision needs a"):
        preflight._check_hardware(load_config(None, ["engine.precision=bf16"]))
    with pytest.raises(preflight.PreflightError, match="cluster.feature_precision=bf16: needs a CUDA GPU"):
        preflight._check_hardware(load_config(None, ["cluster.feature_precision=bf16"]))


def test_bf16_on_a_gpu_without_it_is_refused(tmp_path, monkeypatch):
    preflight = _driver(tmp_path, monkeypatch, cuda=True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla V100")
    preflight._check_hardware(load_config(None, ["engine.precision=fp16"]))
    with pytest.raises(preflight.PreflightError, match="Tesla V100 has no bf16 support"):
        preflight._check_hardware(load_config(None, ["engine.precision=bf16"]))


def test_the_cpu_suite_hides_cuda_from_itself_and_its_subprocesses():
    """tests/conftest.py's seal: on a GPU host the CPU suite must still run its CPU golden paths."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "0"


@pytest.mark.parametrize(("builds", "words"), [
    ((), "faiss is not installed; install exactly one build"),
    (("faiss-cpu", "faiss-gpu"), "faiss-cpu and faiss-gpu are both installed"),
])
def test_none_or_both_faiss_builds_stop_the_clis_with_one_line(monkeypatch, builds, words):
    from core import install
    from core.cli import UserError

    monkeypatch.setattr(install, "installed", lambda name: name in builds)
    with pytest.raises(UserError, match=words):
        install.check_faiss_build()


def test_this_environment_has_exactly_one_faiss_build():
    from core import install

    assert install.check_faiss_build() in install.FAISS_BUILDS


def test_faiss_gpu_asked_for_without_a_gpu_stops_at_start_up(tmp_path, monkeypatch):
    preflight = _driver(tmp_path, monkeypatch, cuda=False, hidden=True)
    with pytest.raises(preflight.PreflightError, match="cluster.search=faiss-gpu: cannot run here: the "
                                                       "features are on the CPU"):
        preflight._check_hardware(load_config(None, ["cluster.search=faiss-gpu"]))


def test_dali_asked_for_where_it_does_not_import_stops_at_start_up(tmp_path, monkeypatch):
    import builtins

    preflight = _driver(tmp_path, monkeypatch, cuda=False, hidden=True)
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali") or name == "pipeline.dali_loader":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(preflight.PreflightError, match="data.backend=dali"):
        preflight._check_hardware(load_config(None, ["data.backend=dali"]))
    preflight._check_hardware(load_config(None, ["data.backend=torch"]))  # the reference loader needs none
