"""Shared fixtures: a gloo process pool on loopback, the GPU skip, real data locations."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _selects_gpu_tests(config) -> bool:
    """`-m gpu` (or any marker expression that names gpu without negating it)."""
    expr = config.getoption("markexpr") or ""
    return "gpu" in expr and "not gpu" not in expr


def pytest_configure(config):
    """The CPU suite hides CUDA from itself and its subprocesses: on a GPU host it would otherwise
    switch its golden CPU runs, its gloo ranks and its DALI pipelines to the GPU (two ranks on one
    GPU, cuda:1 on a one-GPU host). GPU tests run only when selected (`pytest -m gpu`)."""
    if _selects_gpu_tests(config):
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if torch.cuda.is_available():  # CUDA was initialised before this hook: the seal would be a lie
        raise pytest.UsageError("CUDA was initialised before tests/conftest.py could hide it; "
                                "run the CPU suite in a fresh process, or select GPU tests with -m gpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = ("needs CUDA and this machine has none" if _selects_gpu_tests(config)
              else "needs CUDA, which the CPU suite hides: run `pytest -m gpu` on a GPU host")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from core import dist

    try:
        dist.init(backend="gloo", timeout_s=120)
        # Pickled by value: a tensor sent through the queue as-is would be shared by file
        # descriptor, which races with this process exiting.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # report every failure to the parent, with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.shutdown()


def run_on_ranks(fn: Callable, world: int = 2, *args: Any, timeout: float = 180) -> list[Any]:
    """Run `fn(*args)` on `world` spawned gloo processes; return each rank's result in rank order.

    `fn` must be a module-level function (it is pickled by reference); its result must pickle.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            out[rank] = pickle.loads(value) if status == "ok" else value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed function failed\n" + "\n".join(errors))
    return [out[r] for r in range(world)]


@pytest.fixture
def dist_run() -> Callable[..., list[Any]]:
    """`dist_run(fn, world, *args)` -> [result of rank 0, result of rank 1, ...]."""
    return run_on_ranks


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{FASHION_MNIST} missing: run scripts/setup.sh "
                    "(installs the Debian package dataset-fashion-mnist)")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def foolbox_jpegs() -> list[Path]:
    """The 20 real ImageNet JPEGs shipped by the foolbox wheel (read as files, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        pytest.fail("foolbox not installed: run scripts/setup.sh (pip install --no-deps foolbox)")
    files = sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))
    assert len(files) == 20, f"expected 20 foolbox JPEGs, found {len(files)}"
    return files
