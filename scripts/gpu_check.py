"""The GPU acceptance run's stages (README.md#gpu); `scripts/gpu_check.sh` runs each in its own
process with its own timeout and merges their JSON into one file.

    python scripts/gpu_check.py STAGE --out DIR [--cpu-smoke]

Stages (each writes DIR/stages/STAGE.json with "ok", its figures and, on failure, "error"):
  env         versions, the GPU, the driver, which optional backends import.
  engine      a ResNet-50 HCSC step through the DeepSpeed engine in bf16, ZeRO 0 and 1: finite
              losses, fp32 momentum encoder, queue and BatchNorm buffers, save -> load -> continue.
  throughput  images/s of the real step fed by on-device synthetic batches, by the torch reference
              loader from JPEG shards and by DALI (when it imports); HCSC step / MoCo step.
  kmeans      level-1 k-means of 1.28M x 128 rows into 3000 with the torch search, against the
              arithmetic floor 2 N k d iterations / (measured fp32 GEMM rate, TF32 off).
  cli         hcsc-train on synthetic JPEG shards: train, SIGTERM, resume to the end; hcsc-eval knn.
  two_ranks   two processes on one GPU over gloo: every collective of core/dist.py, a 2-rank k-means.
`--cpu-smoke` runs the same stages at toy size on the CPU (tests/test_gpu_check.py, in CI), so the
script cannot rot between GPU runs. Goals (data-fed >= 0.9 x synthetic, HCSC <= 1.10 x MoCo,
k-means <= 3 x floor) are reported beside the figures, never asserted: they are measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, uninstalled on the GPU machine

import torch  # noqa: E402


@dataclass(frozen=True)
class Size:
    """The one place where the GPU run and the CPU smoke run differ."""

    encoder: str
    precision: str
    image_size: int
    batch: int
    queue: int
    levels: tuple[int, ...]
    dataset: int  # rows of the synthetic prototypes (the dataset the step thinks it trains on)
    jpegs: int  # train images in the synthetic shards (val gets a quarter)
    jpeg_side: int
    warmup: int
    timed: int
    kmeans_rows: int
    kmeans_k: int
    kmeans_dim: int
    workers: int
    cli_precision: str


GPU = Size("resnet50", "bf16", 224, 128, 16384, (3000, 2000, 1000), 1_281_167, 2048, 320, 5, 20,
           1_281_167, 3000, 128, max(1, min(12, (os.cpu_count() or 2) - 2)), "bf16")
SMOKE = Size("resnet18_small", "fp32", 32, 16, 128, (16, 8, 4), 512, 128, 48, 2, 4,
             4000, 64, 16, 1, "fp32")
GOALS = {"data_fed_vs_synthetic": 0.9, "hcsc_vs_moco": 1.10, "kmeans_vs_floor": 3.0}


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- env


def stage_env(size: Size, out: Path) -> dict:
    found: dict = {"python": platform.python_version(), "torch": torch.__version__,
                   "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                   "cpu_count": os.cpu_count(), "size": asdict(size)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                     cudnn=torch.backends.cudnn.version())
    driver = Path("/proc/driver/nvidia/version")
    if driver.exists():
        found["driver"] = driver.read_text().splitlines()[0].strip()
    for module in ("nvidia.dali", "faiss", "deepspeed", "webdataset", "omegaconf", "pydantic"):
        found[module] = _version(module)
    found["faiss_gpus"] = _faiss_gpus()
    required = ("deepspeed", "webdataset", "omegaconf", "faiss", "pydantic")
    found["missing"] = [m for m in required if not found[m][0].isdigit() and found[m] != "present"]
    found["ok"] = not found["missing"] and (size is SMOKE or found["cuda_available"])
    return found


def _version(module: str) -> str:
    try:
        imported = __import__(module, fromlist=["__version__"])
    except Exception as err:  # reported, not raised: the other stages say what it breaks
        return f"missing ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return str(getattr(imported, "__version__", "present"))


def _faiss_gpus() -> int:
    try:
        import faiss
        return int(faiss.get_num_gpus())
    except Exception:  # noqa: BLE001 -- no faiss or a CPU build: no faiss GPU
        return 0


# ------------------------------------------------------------------------------- the step


def _config(size: Size, run_dir: Path, *extra: str):
    from core.config import load_config

    levels = "[" + ",".join(map(str, size.levels)) + "]"
    return load_config(None, [f"model.encoder={size.encoder}", f"engine.precision={size.precision}",
                              f"data.image_size={size.image_size}", f"data.batch_size={size.batch}",
                              f"model.queue_size={size.queue}", f"hcsc.num_clusters={levels}",
                              f"run.output_dir={run_dir}", *extra], world=1)


def _engine(cfg):
    from core import dist
    from model.hcsc import HCSC
    from train.engine import Engine, prepare_environment

    prepare_environment()
    dist.init(timeout_s=300)
    torch.manual_seed(0)
    return Engine(HCSC(cfg.model, cfg.hcsc), cfg, lr=0.03)


def _prototypes(size: Size, dim: int, temperature: float):
    """Random hierarchical prototypes over `size.dataset` rows (the step's cost does not depend on
    how they were found): bench/step.py's, on this device."""
    from bench.step import synthetic_prototypes

    return synthetic_prototypes(size.dataset, list(size.levels), dim, temperature).to(device())


def _synthetic_batch(size: Size):
    from pipeline.batch import Batch

    g = torch.Generator().manual_seed(1)
    views = [torch.randn(size.batch, 3, size.image_size, size.image_size, generator=g) for _ in range(2)]
    idx = torch.randperm(size.dataset, generator=g)[: size.batch]
    return Batch(views, idx, torch.zeros(size.batch, dtype=torch.long)).to(device())


def _not_fp32(module: torch.nn.Module) -> list[str]:
    """Every parameter or buffer of the momentum encoder, the queue and BatchNorm that is not fp32."""
    names = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers())
             if n.startswith(("encoder_k", "queue")) or "running_" in n]
    return [f"{n}:{t.dtype}" for n, t in names if t.is_floating_point() and t.dtype != torch.float32]


def stage_engine(size: Size, out: Path) -> dict:
    from train import checkpoint

    found: dict = {}
    for zero in (0, 1):
        run_dir = out / f"engine-zero{zero}"
        cfg = _config(size, run_dir, f"engine.zero_stage={zero}")
        engine = _engine(cfg)
        protos = _prototypes(size, cfg.model.dim, cfg.model.temperature)
        batch = _synthetic_batch(size)
        losses = [float(engine.train_step(batch, protos, epoch=1)["loss"]) for _ in range(3)]
        point = checkpoint.ResumePoint(epoch=1, batch_in_epoch=3, global_step=3)
        checkpoint.save(engine, str(run_dir), point, config_yaml="", keep_last=1)
        saved = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        after = [float(engine.train_step(batch, protos, epoch=1)["loss"]) for _ in range(2)]
        resumed = _engine(cfg)
        checkpoint.load(resumed, checkpoint.resolve(str(run_dir), "auto"), device())
        differs = [k for k, v in resumed.module.state_dict().items() if not torch.equal(v, saved[k])]
        continued = [float(resumed.train_step(batch, protos, epoch=1)["loss"]) for _ in range(2)]
        finite = all(map(torch.isfinite, map(torch.tensor, losses + after + continued)))
        wrong_dtype = _not_fp32(engine.module)
        # The continuation equals the uninterrupted run up to cuDNN's run-to-run float differences.
        close = all(abs(a - b) <= 1e-2 * max(1.0, abs(a)) for a, b in zip(after, continued, strict=True))
        found[f"zero{zero}"] = {"losses": losses, "after_save": after, "after_load": continued,
                                "finite": finite, "not_fp32": wrong_dtype,
                                "state_differs_after_load": differs, "continuation_close": close,
                                "ok": finite and not wrong_dtype and not differs and close}
    found["ok"] = all(v["ok"] for v in found.values())
    return found


# --------------------------------------------------------------------------- throughput


def _timed_steps(engine, batches, protos, steps: int) -> float:
    """images/s of `steps` train steps over `batches` (an iterator), one device sync at the end."""
    sync()
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(steps), batches, strict=False):
        engine.train_step(batch, protos, epoch=1)
        images += len(batch)
    sync()
    return images / (time.perf_counter() - start)


def _repeat(batch):
    while True:
        yield batch


def stage_throughput(size: Size, out: Path) -> dict:
    from pipeline import build_loader

    shards = synthetic_shards(size, out)
    cfg = _config(size, out / "throughput", f"data.shards={shards}", f"data.workers={size.workers}")
    engine = _engine(cfg)
    protos = _prototypes(size, cfg.model.dim, cfg.model.temperature)
    batch = _synthetic_batch(size)
    _timed_steps(engine, _repeat(batch), protos, size.warmup)
    _timed_steps(engine, _repeat(batch), None, size.warmup)
    hcsc = _timed_steps(engine, _repeat(batch), protos, size.timed)
    moco = _timed_steps(engine, _repeat(batch), None, size.timed)
    found: dict = {"synthetic_images_per_s": hcsc, "moco_images_per_s": moco, "hcsc_vs_moco": moco / hcsc,
                   "goal_hcsc_vs_moco": GOALS["hcsc_vs_moco"]}
    backends = ["torch"] + (["dali"] if _version("nvidia.dali")[0].isdigit() else [])
    for backend in backends:
        data = cfg.data.__class__(**{**vars(cfg.data), "backend": backend})
        per_epoch = size.jpegs // size.batch
        rates = []
        for epoch in range(2):  # the first epoch pays the workers' start; the second is measured
            loader = build_loader(data, split="train", mode="train", rank=0, world=1, epoch=epoch, seed=0,
                                  device=device())
            try:
                rates.append(_timed_steps(engine, iter(loader), protos, per_epoch))
            finally:
                loader.close()
        found[f"{backend}_images_per_s"] = rates[-1]
        found[f"{backend}_vs_synthetic"] = rates[-1] / hcsc
    found["goal_data_fed_vs_synthetic"] = GOALS["data_fed_vs_synthetic"]
    found["ok"] = all(v > 0 for k, v in found.items() if k.endswith("images_per_s"))
    return found


def synthetic_shards(size: Size, out: Path) -> Path:
    """Train and val splits of smooth random JPEGs in 4 classes, built by the shard CLI (reused)."""
    import numpy as np
    from PIL import Image

    shards = out / "shards"
    if (shards / "_info.json").exists():
        return shards
    rng = np.random.default_rng(0)
    for split, count in (("train", size.jpegs), ("val", max(size.jpegs // 4, 32))):
        folder = out / f"jpegs-{split}"
        for i in range(count):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth content: JPEG-typical size
            img = Image.fromarray(coarse).resize((size.jpeg_side, size.jpeg_side * 3 // 4), Image.BICUBIC)
            (folder / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
            img.save(folder / f"c{i % 4}" / f"{i:05d}.jpg", quality=90)
        subprocess.run([sys.executable, "-m", "shards.cli", "build", "--source", f"imagefolder:{folder}",
                        "--out", str(shards), "--split", split, "--quiet", "--no-fsync",
                        "--workers", str(size.workers)], check=True, cwd=ROOT, env=_env())
    return shards


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
            "PYTHONPATH": path}


# ------------------------------------------------------------------------------- k-means


def gemm_flops_per_s(d: int, k: int) -> float:
    """Measured fp32 rate (TF32 off, as the k-means search) of the search's own GEMM shape."""
    rows = 65536 if torch.cuda.is_available() else 4096
    a = torch.randn(rows, d, device=device())
    b = torch.randn(d, k, device=device())
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(3):
            a @ b
        sync()
        start, reps = time.perf_counter(), 20
        for _ in range(reps):
            a @ b
        sync()
        return 2.0 * rows * d * k * reps / (time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def stage_kmeans(size: Size, out: Path) -> dict:
    import torch.nn.functional as F

    from cluster.kmeans import kmeans

    n, k, d = size.kmeans_rows, size.kmeans_k, size.kmeans_dim
    g = torch.Generator(device=device()).manual_seed(0)
    x = F.normalize(torch.randn(n, d, device=device(), generator=g), dim=1)
    ids = torch.arange(n, device=device())
    rate = gemm_flops_per_s(d, k)
    sync()
    start = time.perf_counter()
    result = kmeans(x, ids, num_samples=n, k=k, niter=20, nredo=1, seed=0,
                    max_points_per_centroid=1000, min_points_per_centroid=10, distributed=False,
                    search="torch")
    sync()
    seconds = time.perf_counter() - start
    iterations = result.iterations  # one restart: all the Lloyd iterations that ran
    floor = 2.0 * n * k * d * iterations / rate
    found = {"rows": n, "k": k, "dim": d, "nredo": 1, "iterations": iterations,
             "seconds": seconds, "gemm_tflops_fp32": rate / 1e12, "floor_s": floor,
             "kmeans_vs_floor": seconds / floor, "goal_kmeans_vs_floor": GOALS["kmeans_vs_floor"],
             "objective": float(result.objective)}
    found["ok"] = torch.isfinite(torch.tensor(found["objective"])).item()
    return found


# ----------------------------------------------------------------------------------- CLI


def stage_cli(size: Size, out: Path) -> dict:
    """The user's path: train, SIGTERM mid-run (checkpoint, exit 0), rerun to resume, kNN."""
    shards = synthetic_shards(size, out)
    run_dir = out / "cli-run"
    backend = "dali" if _version("nvidia.dali")[0].isdigit() else "torch"
    command = [sys.executable, "-m", "train.cli", "--config", str(ROOT / "configs" / "debug.yaml"),
               f"data.shards={shards}", f"run.output_dir={run_dir}", f"data.backend={backend}",
               f"engine.precision={size.cli_precision}", "optim.epochs=4", "run.max_steps_per_epoch=8",
               "data.batch_size=8", "model.queue_size=64", "eval.knn_k=5"]
    log = (out / "cli.log").open("w")
    first = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and _train_records(metrics) < 2:
        time.sleep(0.2)
    trained_before_stop = _train_records(metrics)
    first.send_signal(signal.SIGTERM)
    stopped_code = first.wait(timeout=120)
    checkpoint_after_stop = (run_dir / "checkpoints" / "latest").is_file()
    second = subprocess.run(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, timeout=600)
    knn_json = out / "cli-knn.json"
    knn = subprocess.run([sys.executable, "-m", "evaluate.cli", "knn", "--checkpoint", str(run_dir),
                          "--train-shards", str(shards), "--val-shards", str(shards), "--k", "5",
                          "--backend", backend, "--out", str(knn_json), "--force"],
                         cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, timeout=300)
    log.close()
    text = (out / "cli.log").read_text(errors="replace")
    found = {"backend": backend, "train_records_before_sigterm": trained_before_stop,
             "exit_after_sigterm": stopped_code, "checkpoint_after_sigterm": checkpoint_after_stop,
             "resumed": "resumed from" in text, "exit_after_resume": second.returncode,
             "final_record": _has_final(metrics), "knn_exit": knn.returncode,
             "knn": json.loads(knn_json.read_text()) if knn_json.exists() else None}
    found["ok"] = (stopped_code == 0 and checkpoint_after_stop and found["resumed"] and second.returncode == 0
                   and found["final_record"] and knn.returncode == 0)
    return found


def _train_records(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    return sum('"kind": "train"' in line for line in metrics.read_text().splitlines())


def _has_final(metrics: Path) -> bool:
    return metrics.exists() and any('"kind": "final"' in line for line in metrics.read_text().splitlines())


# ------------------------------------------------------------------------------ two ranks


def _rank_collectives(rank: int, world: int, port: int, size: Size, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from core import dist

    try:
        dist.init(backend="gloo", timeout_s=120)
        dev = dist.device()  # one GPU seen by both: both take cuda:0
        checks = {"device": str(dev)}
        mine = torch.tensor([float(rank)], device=dev)
        rows = torch.full((rank + 1, 3), float(rank), device=dev)
        checks["all_gather_cat"] = dist.all_gather_cat(rows).cpu().tolist() == [[0.0] * 3] + [[1.0] * 3] * 2
        checks["all_gather_equal"] = dist.all_gather_equal(mine.clone()).cpu().tolist() == [0.0, 1.0]
        checks["all_reduce_sum"] = float(dist.all_reduce_sum(mine + 1)) == 3.0
        checks["broadcast_"] = dist.broadcast_(mine.clone()).cpu().tolist() == [0.0]
        checks["broadcast_object"] = dist.broadcast_object({"r": rank}) == {"r": 0}
        checks["all_gather_object"] = dist.all_gather_object(rank) == [0, 1]
        checks.update(_two_rank_kmeans(size, dev))
        results.put((rank, checks, ""))
    except BaseException:  # every failure goes back to the parent with its traceback
        results.put((rank, {}, traceback.format_exc()))
    finally:
        dist.shutdown()


def _two_rank_kmeans(size: Size, dev: torch.device) -> dict:
    """The sharded k-means on two ranks equals the one-process k-means of the same rows."""
    from cluster.kmeans import kmeans
    from core import dist

    n, k, d = 2000, 20, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    ids = torch.arange(n)
    mine = ids % 2 == dist.rank()
    args = {"num_samples": n, "k": k, "niter": 10, "nredo": 2, "seed": 0, "max_points_per_centroid": 1000,
            "min_points_per_centroid": 10, "search": "torch"}
    sharded = kmeans(x[mine].to(dev), ids[mine].to(dev), **args)
    alone = kmeans(x.to(dev), ids.to(dev), distributed=False, **args)
    return {"kmeans_objective_equal": abs(float(sharded.objective) - float(alone.objective))
            <= 1e-6 * abs(float(alone.objective))}


def stage_two_ranks(size: Size, out: Path) -> dict:
    import torch.multiprocessing as mp

    from train.engine import _free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_collectives, args=(r, 2, port, size, results)) for r in range(2)]
    for p in procs:
        p.start()
    found: dict = {}
    for _ in procs:
        rank, checks, error = results.get(timeout=300)
        found[f"rank{rank}"] = checks if not error else {"error": error}
    for p in procs:
        p.join(timeout=60)
    found["ok"] = all(v and "error" not in v and all(x for x in v.values() if isinstance(x, bool))
                      for v in found.values())
    return found


STAGES = {"env": stage_env, "engine": stage_engine, "throughput": stage_throughput, "kmeans": stage_kmeans,
          "cli": stage_cli, "two_ranks": stage_two_ranks}


def merge(out: Path, stages: list[str]) -> dict:
    """One JSON of every stage's result (a stage that left none: failed, its log says why)."""
    merged: dict = {"stages": {}}
    for name in stages:
        path = out / "stages" / f"{name}.json"
        merged["stages"][name] = json.loads(path.read_text()) if path.exists() else \
            {"ok": False, "error": "no result: killed by its timeout or crashed (see gpu_check.log)"}
    merged["ok"] = all(s.get("ok") for s in merged["stages"].values())
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=[*STAGES, "merge"])
    parser.add_argument("--out", required=True, type=Path, help="results folder")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (CI)")
    parser.add_argument("--stages", default=",".join(["pytest", *STAGES]),
                        help="merge: the stages that were run, comma separated")
    args = parser.parse_args(argv)
    if args.stage == "merge":
        merged = merge(args.out, args.stages.split(","))
        (args.out / "gpu_check.json").write_text(json.dumps(merged, indent=2) + "\n")
        return 0 if merged["ok"] else 1
    size = SMOKE if args.cpu_smoke else GPU
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    (args.out / "stages").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        found = STAGES[args.stage](size, args.out)
    except Exception as err:  # the stage failed: its result says how, the next stages still run
        traceback.print_exc()
        found = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    found["seconds"] = round(time.perf_counter() - start, 2)
    (args.out / "stages" / f"{args.stage}.json").write_text(json.dumps(found, indent=2, default=str) + "\n")
    print(f"gpu_check {args.stage}: {'ok' if found.get('ok') else 'FAILED'} in {found['seconds']} s")
    return 0 if found.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
