"""Feature quality on Fashion-MNIST: HCSC vs MoCo v2 (the same code with `hcsc.enabled=false`: no
clustering, no selection, no prototype loss) vs the random-init encoder, over seeds, with the spread.

Each method trains with `configs/demo_fmnist.yaml` (narrow small-stem ResNet-18 at 28 px) on the
same shards, seeds and epochs; then, on the test split ("val" in the shards): weighted kNN top-1
(k=200, T=0.07, `hcsc-eval knn`, the whole train split as the bank), NMI of k-means with 10
clusters (`hcsc-eval cluster`) and linear-probe top-1 (method.md §7.1 protocol, shortened).

The linear probe's epoch is chosen on a held-out part of the TRAINING split, never on the test
split: `hcsc-eval linear` keeps the epoch with the best accuracy on the split it evaluates, which
is the test split here, and that is selection on the test set. So `probe` below runs the same
protocol (evaluate.linear.train_linear) on the train split minus a seeded 10 % (`holdout_mask`),
scores every epoch on that 10 % and on the test split, and reports the test top-1 of the epoch
that was best on the 10 %. The test-selected best is kept beside it, named as such, only to
compare with records made before this change.

Results are keyed by `quality_key`: sha256 of the working-tree contents of every .py file of
core/, shards/, pipeline/, cluster/, model/, train/ and evaluate/ (train imports evaluate), the
config, this script, bench/_common.py, the settings and the library versions. The record goes to
bench/results/quality-<mode>.json (committed) with the command, machine, wall and CPU time and
seeds. A stored record whose key differs from the code of now is stale: it is printed, if at all,
with every line marked STALE and its key, and then rerun. Intermediate results (trainings,
evaluations) are cached under bench/out/quality/quality-<mode>-<key>/ so an interrupted run resumes; a
cache of other code is never reused.

CPU budget: with `--parallel` HCSC and MoCo of one seed train at the same time, one core each
(`OMP_NUM_THREADS=1`, one DALI thread), so whatever else runs on the machine slows both alike;
each run's wall time and its CPU time (user + system, from `wait4`) are reported.

    python bench/quality.py --smoke             # ~3 min: checks that it all runs; not a figure,
                                                # recorded under bench/out/results/ (not committed)
    python bench/quality.py                     # quick: 2000 train images, 2 epochs, 2 seeds
    python bench/quality.py --full --parallel   # the recorded setting: 30k train as the demo, the
                                                # config's 4 epochs, full 10k test, 2 seeds
    python bench/quality.py --full --parallel --status   # is its stored record current? (trains
                                                         # nothing; the same flags: they are settings)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/: bench/shards.py etc. would shadow the packages

import _common as common  # noqa: E402  (bench/_common.py)

BIN = Path(sys.executable).parent
FMNIST = "/usr/share/datasets/fashion-mnist"
CONFIG = "configs/demo_fmnist.yaml"
METHODS = ("hcsc", "moco")
METRICS = ("knn_top1", "linear_top1", "nmi")
# What decides the numbers: the packages hcsc-train and hcsc-eval run (train imports evaluate), the
# config, the probe and bookkeeping here.
CODE_FOLDERS = ("core", "shards", "pipeline", "cluster", "model", "train", "evaluate")
CODE_FILES = (CONFIG, "bench/quality.py", "bench/_common.py")
LIBRARIES = ("torch", "torchvision", "nvidia-dali-cuda120", "faiss-cpu", "numpy", "webdataset")
WORK = ROOT / "bench" / "out" / "quality"  # trainings and cached parts, one folder per key (ignored)
HOLDOUT_SEED = 12345  # fixed, not the run seed: every method and seed is selected on the same images
# The modes; `epochs` None = the config's optim.epochs. `max_steps` caps steps per epoch (smoke only).
MODES = {
    "smoke": {"train_limit": 1000, "test_limit": 500, "epochs": 2, "max_steps": 4, "linear_epochs": 2,
              "seeds": [0], "holdout": 0.1},
    "quick": {"train_limit": 2000, "test_limit": 1000, "epochs": 2, "max_steps": 0, "linear_epochs": 5,
              "seeds": [0, 1], "holdout": 0.1},
    "full": {"train_limit": 30000, "test_limit": None, "epochs": None, "max_steps": 0, "linear_epochs": 10,
             "seeds": [0, 1], "holdout": 0.1},
}


# ---------------------------------------------------------------------------------------------
# Keys, settings, stored records (no torch: tests/test_bench.py loads this file)


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def quality_key(settings: dict, root: Path = common.ROOT) -> str:
    """The code key of a quality result: code, config, this script, settings and libraries."""
    extra = {"settings": settings, "libraries": library_versions()}
    return common.code_key(CODE_FOLDERS, CODE_FILES, extra=extra, root=root)


def resolve_settings(mode: str, overrides: dict) -> tuple[dict, str]:
    """(settings, record name): the mode's values with the given overrides; a mode with overrides
    is recorded as "custom", so it never replaces the mode's own record."""
    settings = dict(MODES[mode])
    changed = {k: v for k, v in overrides.items() if k in settings and v is not None and v != settings[k]}
    settings.update(changed)
    if settings["epochs"] is None:
        settings["epochs"] = _config_epochs()
    settings["parallel"] = bool(overrides.get("parallel"))
    return settings, (f"quality-{mode}" if not changed else "quality-custom")


def _config_epochs() -> int:
    from core.config import load_config

    return load_config(ROOT / CONFIG, world=1).optim.epochs


def holdout_mask(num_samples: int, fraction: float, seed: int = HOLDOUT_SEED):
    """Bool numpy array over dataset indices 0..num_samples-1: the held-out part of the training
    split (round(fraction x num_samples) indices, at least 1, drawn with a fixed seed)."""
    import numpy as np

    count = min(num_samples - 1, max(1, round(fraction * num_samples)))
    mask = np.zeros(num_samples, dtype=bool)
    mask[np.random.default_rng(seed).permutation(num_samples)[:count]] = True
    return mask


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None from one value), min and max."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    sd = statistics.stdev(clean) if len(clean) > 1 else None
    return {"mean": round(statistics.fmean(clean), 4), "sd": None if sd is None else round(sd, 4),
            "min": round(min(clean), 4), "max": round(max(clean), 4), "n": len(clean)}


def summarize(rows: list[dict]) -> dict:
    """Per method and metric the spread over seeds, and HCSC - MoCo v2 paired by seed."""
    out: dict = {}
    for method in ("hcsc", "moco", "random-init"):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {m: spread([r[m] for r in mine]) for m in (*METRICS, "train_wall_s", "train_cpu_s")}
    by_seed = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out["hcsc_minus_moco"] = {}
    for m in METRICS:
        diffs = [by_seed["hcsc", s][m] - by_seed["moco", s][m] for s in seeds
                 if ("hcsc", s) in by_seed and ("moco", s) in by_seed]
        out["hcsc_minus_moco"][m] = {"per_seed": [round(d, 4) for d in diffs], **spread(diffs)}
    return out


def table(record: dict, status: str) -> list[str]:
    """The printed table of a record; every line marked when the record is not current."""
    mark = common.stale_prefix(status)
    s = record["settings"]
    lines = [f"{record['name']}: train images {s['train_limit'] or 60000}, test images "
             f"{s['test_limit'] or 10000}, epochs {s['epochs']}, linear epochs {s['linear_epochs']} (epoch "
             f"chosen on {s['holdout']:.0%} of the train split), seeds {s['seeds']}, "
             f"key {record['key'][:16]}, written {record.get('written', '?')}",
             f"{'method':12s} {'seed':>4s} {'wall s':>8s} {'CPU s':>8s} {'kNN top1':>9s} {'linear':>7s} "
             f"{'(epoch)':>7s} {'NMI':>6s}"]
    for r in record["rows"]:
        lines.append(f"{r['method']:12s} {r['seed']:4d} {r['train_wall_s']:8.1f} {r['train_cpu_s']:8.1f} "
                     f"{r['knn_top1']:9.2f} {r['linear_top1']:7.2f} {r['linear_epoch']:7d} {r['nmi']:6.3f}")
    summary = record["summary"]
    for method in ("hcsc", "moco", "random-init"):
        cells = []
        for m in METRICS:
            sp = summary[method][m]
            if sp["mean"] is not None:
                sd = "" if sp["sd"] is None else f" sd {sp['sd']:.3g}"
                cells.append(f"{m} {sp['mean']:.4g}{sd} [{sp['min']:.4g}, {sp['max']:.4g}]")
        lines.append(f"mean over seeds, {method}: " + "; ".join(cells))
    diff = summary["hcsc_minus_moco"]
    lines.append("HCSC - MoCo v2 per seed: " + "; ".join(f"{m} {diff[m]['per_seed']}" for m in METRICS))
    return [mark + line for line in lines]


def headline(record: dict) -> dict:
    """The last JSON line (docs/architecture.md#benchmarks keys, plus this bench's)."""
    summary = record["summary"]
    ours, base = summary["hcsc"]["knn_top1"]["mean"], summary["moco"]["knn_top1"]["mean"]
    ratio = ours / base if ours is not None and base else float("nan")
    return {"bench": "quality_fmnist_knn_top1", "ours": ours, "baseline": base,
            "unit": "% kNN top-1 (k=200, T=0.07), mean over seeds", "ratio": round(ratio, 4),
            "goal": "HCSC >= MoCo v2 (paper claim)",
            "meets_goal": ours is not None and base is not None and ours >= base,
            "baseline_desc": "MoCo v2: the same code and config with hcsc.enabled=false, same data, epochs "
                             "and seeds; random init evaluated alike",
            "equal_work": True, "budget": "equal epochs; each method's train CPU is reported, not equalised",
            "linear": {m: summary[m]["linear_top1"] for m in ("hcsc", "moco", "random-init")},
            "nmi": {m: summary[m]["nmi"] for m in ("hcsc", "moco", "random-init")},
            "knn": {m: summary[m]["knn_top1"] for m in ("hcsc", "moco", "random-init")},
            "hcsc_minus_moco": summary["hcsc_minus_moco"],
            "train_cpu_s": {m: summary[m]["train_cpu_s"]["mean"] for m in METHODS},
            "seeds": record["settings"]["seeds"], "mode": record["mode"], "key": record["key"],
            "command": record["command"], "machine": record["machine"], "wall_s": record["wall_s"],
            "cpu_s": record["cpu_s"]}


# ---------------------------------------------------------------------------------------------
# Running


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
    """The demo's shards: `train_limit` train images drawn with the shard seed (30000 = exactly
    scripts/demo.sh's), the test split as "val"."""
    from shards.build import build_shards as build

    folder = out / f"fmnist-{train_limit or 'all'}-{test_limit or 'all'}"
    build(f"fashion-mnist:{FMNIST}:train", folder, split="train", limit=train_limit, workers=2,
          show_progress=False)
    build(f"fashion-mnist:{FMNIST}:test", folder, split="val", limit=test_limit, workers=2,
          show_progress=False)
    return folder


class Bench:
    """One setting; every training and evaluation cached in `out/results/` (the keyed folder)."""

    def __init__(self, shards: Path, out: Path, settings: dict) -> None:
        from core.config import load_config

        self.shards, self.out, self.settings = shards, out, settings
        self.threads = 1 if settings["parallel"] else None
        self.workers = 1 if settings["parallel"] else 2
        cfg = load_config(ROOT / CONFIG, world=1)
        self.image_size, self.resize = cfg.data.image_size, cfg.data.eval_resize
        self.encoder = cfg.model.encoder
        self.reused: list[str] = []  # parts kept from an interrupted run of the same key
        (out / "results").mkdir(parents=True, exist_ok=True)

    def _cached(self, name: str, fn):
        path = self.out / "results" / f"{name}.json"
        if path.is_file():
            print(f"{name}: kept from an earlier run of the same code and settings ({path})", flush=True)
            self.reused.append(name)
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
        run_dir = self.out / f"{method}-seed{seed}"
        resumed = (run_dir / "checkpoints").is_dir()
        s = self.settings
        cmd = [str(BIN / "hcsc-train"), "--config", CONFIG, f"data.shards={self.shards}",
               f"run.output_dir={run_dir}", f"run.seed={seed}", f"optim.epochs={s['epochs']}",
               f"hcsc.enabled={'true' if method == 'hcsc' else 'false'}", "data.val_split=",
               "run.checkpoint_every=1", f"data.workers={self.workers}",
               f"run.max_steps_per_epoch={s['max_steps']}"]
        print(f"training {run_dir.name} ...", flush=True)
        _, wall, cpu = _run(cmd, self.out / f"{run_dir.name}.train.log", self.threads)
        # resumed: the times cover only the part after the checkpoint it resumed from
        return {"run_dir": str(run_dir), "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
                "threads": self.threads, "resumed": resumed}

    def evaluate(self, checkpoint: Path, name: str) -> dict:
        # encoder and sizes from the config: the random-init checkpoint (official layout) stores
        # neither, and hcsc-eval would fall back to resnet50 at 224/256 for it; each command's own
        # default interpolation (bicubic for knn and cluster, method.md §7.1)
        base = ["--checkpoint", str(checkpoint), "--encoder", self.encoder, "--image-size",
                str(self.image_size), "--resize", str(self.resize), "--workers", str(self.workers)]
        log = self.out / name
        evaluate = str(BIN / "hcsc-eval")
        knn, *_ = _run([evaluate, "knn", *base, "--train-shards", str(self.shards), "--val-shards",
                        str(self.shards), "--k", "200", "--T", "0.07"], log.with_suffix(".knn.log"),
                       self.threads)
        clus, *_ = _run([evaluate, "cluster", *base, "--shards", str(self.shards), "--split", "val",
                         "--num-clusters", "10"], log.with_suffix(".cluster.log"), self.threads)
        spec = {"checkpoint": str(checkpoint), "shards": str(self.shards), "out": f"{log}-linear",
                "epochs": self.settings["linear_epochs"], "holdout": self.settings["holdout"],
                "encoder": self.encoder, "image_size": self.image_size, "resize": self.resize,
                "workers": self.workers, "seed": 0}
        lin, *_ = _run([sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(spec)],
                       log.with_suffix(".linear.log"), self.threads)
        return {"knn_top1": _pick(_last_json(knn), "top1"), "nmi": _pick(_last_json(clus), "nmi"),
                **_last_json(lin)}


def random_init_checkpoint(out: Path, seed: int) -> Path:
    import torch

    from core.config import load_config
    from model.checkpoint_io import official_state_dict
    from model.hcsc import HCSC

    cfg = load_config(ROOT / CONFIG, world=1)
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


def probe(spec: dict) -> dict:
    """Linear probe (method.md §7.1 protocol, `spec["epochs"]` epochs, decay at 60 % and 80 %) whose
    epoch is chosen on the held-out part of the train split; runs in its own process.

    Mirrors `evaluate.commands.run_linear` on one process: the same loaders (linear-mode train
    augmentation, eval-mode features with bilinear resize), classifier and `train_linear`. The
    differences: training batches drop the held-out rows (a batch keeps about 90 % of its 256),
    and `evaluate` scores both the held-out rows (as "top1", which `train_linear` selects on) and
    the test split (as "test_top1").
    """
    import torch

    from cluster.features import split_features
    from evaluate.checkpoints import load_backbone
    from evaluate.data import data_config
    from evaluate.linear import LinearConfig, accuracy_counts, make_classifier, train_linear
    from pipeline import build_loader
    from shards.format import split_info

    shards, seed, epochs = spec["shards"], spec["seed"], spec["epochs"]
    info = split_info(shards, "train")
    held = torch.from_numpy(holdout_mask(info.num_samples, spec["holdout"]))
    loader = {"image_size": spec["image_size"], "resize": spec["resize"], "interpolation": "bilinear",
              "batch_size": 256, "workers": spec["workers"]}
    cfg = data_config(shards, **loader)
    trunk, feat_dim = load_backbone(spec["checkpoint"], spec["encoder"])
    test = split_features(trunk, cfg, "val", seed=seed)
    train_feats = split_features(trunk, cfg, "train", seed=seed)
    rows = held[train_feats.idx]
    hold_feats, hold_cls = train_feats.feats[rows], train_feats.cls[rows]
    del train_feats

    def batches(epoch: int):
        data = build_loader(cfg, split="train", mode="linear", rank=0, world=1, epoch=epoch, seed=seed,
                            device=torch.device("cpu"))
        try:
            for batch in data:
                keep = ~held[batch.idx]
                if keep.any():
                    with torch.no_grad():
                        feats = trunk(batch.views[0][keep]).float()
                    yield feats, batch.cls[keep]
        finally:
            data.close()

    def scores(fc) -> dict[str, float]:
        hold, test_acc = accuracy_counts(fc, hold_feats, hold_cls), accuracy_counts(fc, test.feats, test.cls)
        return {**hold, "test_top1": test_acc["top1"], "test_top5": test_acc["top5"]}

    milestones = sorted({max(1, int(epochs * 0.6)), max(1, int(epochs * 0.8))})
    protocol = LinearConfig(epochs=epochs, milestones=milestones)
    torch.manual_seed(seed)
    result = train_linear(make_classifier(feat_dim, info.num_classes), batches, scores, protocol,
                          out_dir=spec["out"])
    chosen = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return {"linear_top1": chosen["test_top1"], "linear_epoch": result.best_epoch,
            "linear_holdout_top1": chosen["top1"], "linear_last_top1": result.history[-1]["test_top1"],
            # selected on the test split itself: optimistic, for comparison with older records only
            "linear_test_selected_top1": max(h["test_top1"] for h in result.history),
            "linear_holdout_images": int(held.sum()), "linear_train_images": int((~held).sum()),
            "linear_epochs": epochs, "linear_milestones": milestones}


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
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the recorded setting (see the module docstring)")
    mode.add_argument("--smoke", action="store_true", help="a few steps on 1000 images: checks that it runs")
    parser.add_argument("--parallel", action="store_true",
                        help="train HCSC and MoCo of a seed at the same time, one core each")
    parser.add_argument("--status", action="store_true",
                        help="only say whether the stored record is current (and print it, marked if stale)")
    parser.add_argument("--rerun", action="store_true", help="run even when the stored record is current")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--linear-epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one linear probe, JSON spec
    args = parser.parse_args()
    if args.probe:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        print(json.dumps(probe(json.loads(args.probe))), flush=True)
        return

    host = common.machine()  # first: the load average the run starts under
    wall0, cpu0 = time.perf_counter(), common.cpu_seconds()
    mode_name = "full" if args.full else "smoke" if args.smoke else "quick"
    settings, name = resolve_settings(mode_name, {
        "train_limit": args.train_limit, "test_limit": args.test_limit, "epochs": args.epochs,
        "linear_epochs": args.linear_epochs, "seeds": args.seeds, "parallel": args.parallel})
    key = quality_key(settings)
    # a smoke run checks the plumbing; its numbers are not figures, so it is not committed
    store = common.ResultFile((common.SCRATCH_RESULTS if args.smoke else common.RESULTS) / f"{name}.json")
    status, stored = store.status(key), store.read()
    print(store.describe(key), flush=True)
    if stored is not None and (args.status or status == "current" or status == "stale"):
        for line in table(stored, status):
            print(line, flush=True)
    if args.status:
        return
    if status == "current" and not args.rerun:
        print("current: the code and settings are those it was measured with (--rerun to measure again)")
        print(json.dumps(headline(stored)), flush=True)
        return
    if status == "stale":
        print("the stored record above is STALE: rerunning", flush=True)

    out = WORK / f"{name}-{key[:16]}"
    out.mkdir(parents=True, exist_ok=True)
    shards = build_shards(out, settings["train_limit"], settings["test_limit"])
    bench = Bench(shards, out, settings)
    rows = [row for seed in settings["seeds"] for row in run_seed(bench, seed, settings["parallel"])]
    key_at_end = quality_key(settings)
    record = {"bench": "quality", "name": name, "mode": mode_name, "key": key, "key_at_end": key_at_end,
              "key_covers": {"folders": list(CODE_FOLDERS), "files": list(CODE_FILES),
                             "libraries": library_versions()},
              "command": common.command(), "machine": host, "git": common.git_state(CODE_FOLDERS),
              "settings": settings, "seeds": settings["seeds"], "config": CONFIG,
              # of this invocation; parts reused from an interrupted run of the same key are listed
              "wall_s": round(time.perf_counter() - wall0, 1), "cpu_s": round(common.cpu_seconds() - cpu0, 1),
              "reused_parts": bench.reused,
              "rows": rows, "summary": summarize(rows)}
    store.write(record)
    status = store.status(key_at_end)
    print(store.describe(key_at_end), flush=True)
    for line in table(store.read() or record, status):
        print(line, flush=True)
    if status != "current":  # no JSON line: a script reading the last line must not take it as current
        print("the code changed while this ran: the record is stored but STALE; run it again", flush=True)
        return
    print(json.dumps(headline(record)), flush=True)


if __name__ == "__main__":
    main()
