"""Feature quality on Fashion-MNIST: HCSC vs MoCo v2 (the same code with `hcsc.enabled=false`: no
clustering, no selection, no prototype loss) vs the random-init encoder.

Each method trains with `configs/demo_fmnist.yaml` (narrow small-stem ResNet-18; 28 px now, the
results in BENCHMARKS.md were made with its earlier 32 px settings) on the same shards, seed and
epochs; then, on the test split: weighted kNN top-1 (k=200, T=0.07, `hcsc-eval knn`), linear-probe
top-1 (`hcsc-eval linear`) and NMI of k-means with 10 clusters (`hcsc-eval cluster`).

The CPU budget: with `--parallel` (the recorded setting) HCSC and MoCo of one seed train at the same
time, one core each (`OMP_NUM_THREADS=1`, one DALI thread), so whatever else runs on the machine
slows both alike; each run's wall time and its CPU time (user + system, from `wait4`) are reported.
Every finished run and evaluation is kept under `bench/out/quality/results/`, and a rerun of the
same command skips it, so the hours of `--full` can be spread over several sessions (an interrupted
training resumes from its last epoch checkpoint; its times then cover the last part only, marked).

    python bench/quality.py                          # about 3 minutes: 2000 train images, 2 epochs
    python bench/quality.py --full --parallel        # 60k train, 10k test, 8 epochs, 2 seeds (hours)
    python bench/quality.py --train-limit 20000 --epochs 8 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/shards.py etc. would otherwise shadow the packages
BIN = Path(sys.executable).parent
FMNIST = "/usr/share/datasets/fashion-mnist"
METHODS = ("hcsc", "moco")


def _run(cmd: list[str], log_path: Path, threads: int | None) -> tuple[str, float, float]:
    """(stdout, wall s, CPU s) of one command; CPU is user + system of the process tree it waited for."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with log_path.open("w") as log, log_path.with_suffix(".out").open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=log, text=True)
        # wait4, not Popen.wait: the rusage of this child alone (runs overlap with --parallel, so
        # RUSAGE_CHILDREN deltas would mix them). It covers the grandchildren the child waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench/quality.py: {' '.join(cmd[:3])} failed (rc {proc.returncode}); "
                         f"see {log_path}")
    return log_path.with_suffix(".out").read_text(), wall, usage.ru_utime + usage.ru_stime


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def build_shards(out: Path, train_limit: int | None, test_limit: int | None) -> Path:
    from shards.build import build_shards as build

    folder = out / f"fmnist-{train_limit or 'all'}-{test_limit or 'all'}"
    build(f"fashion-mnist:{FMNIST}:train", folder, split="train", limit=train_limit, workers=2)
    build(f"fashion-mnist:{FMNIST}:test", folder, split="val", limit=test_limit, workers=2)
    return folder


class Bench:
    """One setting (shards, epochs, linear epochs, threads); results cached per run in `results/`."""

    def __init__(self, shards: Path, out: Path, epochs: int, linear_epochs: int, threads: int | None):
        self.shards, self.out, self.epochs, self.linear_epochs = shards, out, epochs, linear_epochs
        self.threads = threads
        self.workers = 1 if threads == 1 else 2
        self.setting = f"{shards.name}-ep{epochs}-lin{linear_epochs}"
        (out / "results").mkdir(parents=True, exist_ok=True)

    def _cached(self, name: str, fn):
        path = self.out / "results" / f"{name}-{self.setting}.json"
        if path.is_file():
            print(f"{name}: kept from an earlier run ({path.name})", flush=True)
            return json.loads(path.read_text())
        result = fn()
        path.write_text(json.dumps(result))
        return result

    def method(self, method: str, seed: int) -> dict:
        """Train (or reuse) and evaluate one method for one seed."""
        name = f"{method}-seed{seed}"
        train = self._cached(f"{name}-train", lambda: self.train(method, seed))
        row = {"method": method, "seed": seed, **train}
        row.update(self._cached(f"{name}-eval", lambda: self.evaluate(Path(train["run_dir"]), name)))
        print(json.dumps(row), flush=True)
        return row

    def random_init(self, seed: int) -> dict:
        name = f"random-seed{seed}"
        row = {"method": "random-init", "seed": seed, "train_wall_s": 0.0, "train_cpu_s": 0.0}
        row.update(self._cached(f"{name}-eval",
                                lambda: self.evaluate(random_init_checkpoint(self.out, seed), name)))
        print(json.dumps(row), flush=True)
        return row

    def train(self, method: str, seed: int) -> dict:
        run_dir = self.out / f"{method}-seed{seed}-{self.setting}"
        resumed = (run_dir / "checkpoints").is_dir()
        cmd = [str(BIN / "hcsc-train"), "--config", "configs/demo_fmnist.yaml", f"data.shards={self.shards}",
               f"run.output_dir={run_dir}", f"run.seed={seed}", f"optim.epochs={self.epochs}",
               f"hcsc.enabled={'true' if method == 'hcsc' else 'false'}", "hcsc.warmup_epochs=1",
               "data.val_split=''", "run.checkpoint_every=1", f"data.workers={self.workers}"]
        print(f"training {run_dir.name} ...", flush=True)
        _, wall, cpu = _run(cmd, self.out / f"{run_dir.name}.train.log", self.threads)
        return {"run_dir": str(run_dir), "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
                "threads": self.threads, "resumed": resumed}

    def evaluate(self, checkpoint: Path, name: str) -> dict[str, float]:
        # bilinear for every command: the recorded (cached) results were measured with it, before
        # knn/cluster defaulted to method.md §7.1's bicubic (28 px images upscaled to 32: a minor change)
        base = ["--checkpoint", str(checkpoint), "--encoder", "resnet18_small_w16", "--image-size", "32",
                "--resize", "32", "--interpolation", "bilinear", "--workers", str(self.workers)]
        common = [*base, "--train-shards", str(self.shards), "--val-shards", str(self.shards)]
        log = self.out / f"{name}-{self.setting}"
        evaluate = str(BIN / "hcsc-eval")
        knn, *_ = _run([evaluate, "knn", *common, "--k", "200", "--T", "0.07"], log.with_suffix(".knn.log"),
                       self.threads)
        clus, *_ = _run([evaluate, "cluster", *base, "--shards", str(self.shards), "--split", "val",
                         "--num-clusters", "10"], log.with_suffix(".cluster.log"), self.threads)
        epochs = self.linear_epochs
        lin, *_ = _run([evaluate, "linear", *common, "--out", f"{log}-linear", "--epochs", str(epochs),
                        "--batch-size", "256", "--milestones", f"{int(epochs * 0.6)},{int(epochs * 0.8)}"],
                       log.with_suffix(".linear.log"), self.threads)
        return {"knn_top1": _pick(_last_json(knn), "top1"),
                "linear_top1": _pick(_last_json(lin), "best_top1"), "nmi": _pick(_last_json(clus), "nmi")}


def random_init_checkpoint(out: Path, seed: int) -> Path:
    import torch

    from core.config import load_config
    from model.checkpoint_io import official_state_dict
    from model.hcsc import HCSC

    cfg = load_config(ROOT / "configs" / "demo_fmnist.yaml")
    torch.manual_seed(seed)
    path = out / f"random-init-seed{seed}.pth.tar"
    torch.save({"epoch": 0, "state_dict": official_state_dict(HCSC(cfg.model, cfg.hcsc))}, path)
    return path


def _pick(result, key: str) -> float:
    """The first value named `key` anywhere in a CLI's JSON result."""
    if isinstance(result, dict):
        if key in result and isinstance(result[key], int | float):
            return float(result[key])
        values = result.values()
    elif isinstance(result, list):
        values = result
    else:
        return float("nan")
    for value in values:
        found = _pick(value, key)
        if found == found:  # not NaN
            return found
    return float("nan")


def run_seed(bench: Bench, seed: int, parallel: bool) -> list[dict]:
    """HCSC, MoCo and random init for one seed; with `parallel` the two trainings overlap, and the
    random-init evaluation takes the slot of whichever method finishes first."""
    if not parallel:
        return [bench.method(m, seed) for m in METHODS] + [bench.random_init(seed)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(bench.method, m, seed) for m in METHODS]
        futures.append(pool.submit(bench.random_init, seed))
        return [f.result() for f in futures]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="60k/10k images, 8 epochs, 2 seeds")
    parser.add_argument("--parallel", action="store_true",
                        help="train HCSC and MoCo of a seed at the same time, one core each")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--linear-epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args()
    quick = not args.full
    train_limit = args.train_limit or (2000 if quick else None)
    test_limit = args.test_limit or (1000 if quick else None)
    epochs = args.epochs or (2 if quick else 8)
    linear_epochs = args.linear_epochs or (5 if quick else 10)
    seeds = args.seeds or ([0] if quick else [0, 1])
    out = ROOT / "bench" / "out" / "quality"
    out.mkdir(parents=True, exist_ok=True)
    shards = build_shards(ROOT / "bench" / "out", train_limit, test_limit)
    bench = Bench(shards, out, epochs, linear_epochs, 1 if args.parallel else None)
    rows = [row for seed in seeds for row in run_seed(bench, seed, args.parallel)]
    print(f"\ntrain images {train_limit or 60000}, test images {test_limit or 10000}, epochs {epochs}, "
          f"linear epochs {linear_epochs}, seeds {seeds}, "
          f"{'parallel, 1 core each' if args.parallel else 'one run at a time, all cores'}")
    print(f"{'method':12s} {'seed':>4s} {'wall s':>8s} {'CPU s':>8s} {'kNN top1':>9s} {'linear':>7s} "
          f"{'NMI':>6s}")
    for r in rows:
        print(f"{r['method']:12s} {r['seed']:4d} {r['train_wall_s']:8.1f} {r['train_cpu_s']:8.1f} "
              f"{r['knn_top1']:9.2f} {r['linear_top1']:7.2f} {r['nmi']:6.3f}")

    def mean(method: str, key: str) -> float:
        vals = [r[key] for r in rows if r["method"] == method]
        return sum(vals) / len(vals)

    ours, base = mean("hcsc", "knn_top1"), mean("moco", "knn_top1")
    print(json.dumps({"bench": "quality_fmnist_knn_top1", "ours": round(ours, 2), "baseline": round(base, 2),
                      "unit": "% kNN top-1 (k=200, T=0.07)", "ratio": round(ours / base, 4),
                      "goal": "HCSC >= MoCo v2 (paper claim)", "meets_goal": ours >= base,
                      "linear_hcsc": round(mean("hcsc", "linear_top1"), 2),
                      "linear_moco": round(mean("moco", "linear_top1"), 2),
                      "nmi_hcsc": round(mean("hcsc", "nmi"), 4), "nmi_moco": round(mean("moco", "nmi"), 4),
                      "knn_random_init": round(mean("random-init", "knn_top1"), 2),
                      "train_cpu_min_hcsc": round(mean("hcsc", "train_cpu_s") / 60, 1),
                      "train_cpu_min_moco": round(mean("moco", "train_cpu_s") / 60, 1), "seeds": seeds}))


if __name__ == "__main__":
    main()
