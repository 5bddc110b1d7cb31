"""Feature quality on Fashion-MNIST: HCSC vs MoCo v2 (the same code with `hcsc.enabled=false`: no
clustering, no selection, no prototype loss) vs the random-init encoder.

Each method trains with `configs/demo_fmnist.yaml` (narrow small-stem ResNet-18 at 32 px) on the same
shards, seed and epochs; then, on the test split: weighted kNN top-1 (k=200, T=0.07, `hcsc-eval
knn`), linear-probe top-1 (`hcsc-eval linear`) and NMI of k-means with 10 clusters
(`hcsc-eval cluster`). Wall time per training run is printed (the CPU budget).

    python bench/quality.py                          # about 2 minutes: 2000 train images, 1 epoch
    python bench/quality.py --full                   # 60k train, 10k test, 2 seeds (hours on 2 cores)
    python bench/quality.py --train-limit 20000 --epochs 8 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/shards.py etc. would otherwise shadow the packages
BIN = Path(sys.executable).parent
FMNIST = "/usr/share/datasets/fashion-mnist"


def _run(cmd: list[str], log_path: Path) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    log_path.with_suffix(".out").write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"bench/quality.py: {' '.join(cmd[:3])} failed (rc {proc.returncode}); "
                         f"see {log_path}")
    return proc.stdout


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def build_shards(out: Path, train_limit: int | None, test_limit: int | None) -> Path:
    from shards.build import build_shards as build

    folder = out / f"fmnist-{train_limit or 'all'}-{test_limit or 'all'}"
    build(f"fashion-mnist:{FMNIST}:train", folder, split="train", limit=train_limit, workers=2)
    build(f"fashion-mnist:{FMNIST}:test", folder, split="val", limit=test_limit, workers=2)
    return folder


def train(method: str, seed: int, shards: Path, out: Path, epochs: int) -> tuple[Path, float]:
    run_dir = out / f"{method}-seed{seed}-ep{epochs}"
    cmd = [str(BIN / "hcsc-train"), "--config", "configs/demo_fmnist.yaml", f"data.shards={shards}",
           f"run.output_dir={run_dir}", f"run.seed={seed}", f"optim.epochs={epochs}",
           f"hcsc.enabled={'true' if method == 'hcsc' else 'false'}", "hcsc.warmup_epochs=1",
           "data.val_split=''", "run.checkpoint_every=1000"]
    start = time.perf_counter()
    _run(cmd, out / f"{run_dir.name}.train.log")
    return run_dir, time.perf_counter() - start


def random_init_checkpoint(out: Path, seed: int) -> Path:
    import torch

    from model.checkpoint_io import official_state_dict
    from model.hcsc import HCSC
    from train.config import load_config

    cfg = load_config(ROOT / "configs" / "demo_fmnist.yaml")
    torch.manual_seed(seed)
    path = out / f"random-init-seed{seed}.pth.tar"
    torch.save({"epoch": 0, "state_dict": official_state_dict(HCSC(cfg.model, cfg.hcsc))}, path)
    return path


def evaluate(checkpoint: Path, shards: Path, out: Path, name: str, linear_epochs: int) -> dict[str, float]:
    base = ["--checkpoint", str(checkpoint), "--encoder", "resnet18_small_w16", "--image-size", "32",
            "--resize", "32"]
    common = [*base, "--train-shards", str(shards), "--val-shards", str(shards)]
    knn = _last_json(_run([str(BIN / "hcsc-eval"), "knn", *common, "--k", "200", "--T", "0.07"],
                          out / f"{name}.knn.log"))
    clus = _last_json(_run([str(BIN / "hcsc-eval"), "cluster", *base, "--shards", str(shards),
                            "--split", "val", "--num-clusters", "10"], out / f"{name}.cluster.log"))
    lin = _last_json(_run([str(BIN / "hcsc-eval"), "linear", *common, "--out", str(out / f"{name}-linear"),
                           "--epochs", str(linear_epochs), "--batch-size", "256",
                           "--milestones", f"{int(linear_epochs * 0.6)},{int(linear_epochs * 0.8)}"],
                          out / f"{name}.linear.log"))
    return {"knn_top1": _pick(knn, "top1"), "linear_top1": _pick(lin, "best_top1"), "nmi": _pick(clus, "nmi")}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="60k/10k images, 2 seeds, the recorded setting")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--linear-epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args()
    quick = not args.full
    train_limit = args.train_limit or (2000 if quick else None)
    test_limit = args.test_limit or (1000 if quick else None)
    epochs = args.epochs or (2 if quick else 20)
    linear_epochs = args.linear_epochs or (5 if quick else 30)
    seeds = args.seeds or ([0] if quick else [0, 1])
    out = ROOT / "bench" / "out" / "quality"
    out.mkdir(parents=True, exist_ok=True)
    shards = build_shards(ROOT / "bench" / "out", train_limit, test_limit)
    rows = []
    for seed in seeds:
        for method in ("hcsc", "moco"):
            run_dir, seconds = train(method, seed, shards, out, epochs)
            scores = evaluate(run_dir, shards, out, run_dir.name, linear_epochs)
            rows.append({"method": method, "seed": seed, "train_s": round(seconds, 1), **scores})
            print(json.dumps(rows[-1]), flush=True)
        scores = evaluate(random_init_checkpoint(out, seed), shards, out, f"random-seed{seed}", linear_epochs)
        rows.append({"method": "random-init", "seed": seed, "train_s": 0.0, **scores})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\ntrain images {train_limit or 60000}, test images {test_limit or 10000}, epochs {epochs}, "
          f"linear epochs {linear_epochs}, seeds {seeds}")
    print(f"{'method':12s} {'seed':>4s} {'train s':>8s} {'kNN top1':>9s} {'linear':>7s} {'NMI':>6s}")
    for r in rows:
        print(f"{r['method']:12s} {r['seed']:4d} {r['train_s']:8.1f} {r['knn_top1']:9.2f} "
              f"{r['linear_top1']:7.2f} {r['nmi']:6.3f}")

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
                      "knn_random_init": round(mean("random-init", "knn_top1"), 2)}))


if __name__ == "__main__":
    main()
