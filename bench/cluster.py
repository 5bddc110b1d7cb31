"""Benchmark: hierarchical k-means + concentrations, ours against the official procedure (issue 15).

Baseline (the headline): the official `run_hkmeans` procedure (method.md §2.3-2.4), rewritten from it
here, in one process. Per level, `faiss.Clustering` on host numpy set up as the official code sets
it (niter, nredo, seed = level index, max/min points per centroid 1000/10, a flat L2 index) and
with every other field at the pinned faiss's (1.15.1) own defaults, early stopping included: faiss
>= 1.8 ends a restart once its objective stops improving. Then `index.search` for the assignment,
the official per-sample Python loop for the concentrations and Python list propagation of the
labels. `--faiss17` adds, beside it, the same procedure with every restart running all `niter`
iterations (`early_stop_threshold = -1`, what the official code's faiss 1.7 did), which earlier
versions of this script used as the headline.

Ours: `cluster.hierarchy.hierarchical_kmeans` on 1 rank (the headline) and on 2 spawned gloo ranks
(memory), each rank generating only its own rows; `--search` sets `cluster.search`.

Equal work: `equal_work` is true when both sides clustered the same rows into the same levels with
the same niter, nredo, seeds and number of threads, the baseline with faiss's default stopping, and
both reached the same objective (sum of squared distances of the final assignment) at every level,
relative difference <= OBJECTIVE_TOL. `meets_goal` needs it.

Sizes. Quick (default): N = 20k into 2000/200/20, nredo 2. Level l+1 clusters the centroids of
level l, so these sizes give 10 rows per centroid at every level (faiss's own minimum: fewer, and
k-means of the upper levels is mostly deciding ties). `--full`: N = 200k into 3000/2000/1000,
nredo 5, the recorded numbers (levels 2-3 then have 1.5 and 2 rows per centroid, as in the
official runs); it also stores them in bench/results/cluster.json keyed by the code it measured
(bench/_common.py `record_run`), and prints no JSON line when the code changed while it ran.

Features: N random unit vectors in 128-d around 1000 planted directions. Every run happens in its
own spawned process; memory is that process's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`)
and its increment over the RSS measured after imports and process-group setup, before any data
exists (the increment is what clustering itself holds). Time excludes data generation.

Usage: python bench/cluster.py            (about 1 min on 2 cores)
       python bench/cluster.py --full     (N=200k, 3000/2000/1000, niter 20, nredo 5)
       --prune-ablation adds ours on 1 rank with cluster.prune=false (every row searched).
Last line: one JSON object (docs/architecture.md#benchmarks) with baseline_desc, equal_work, the
parameters, the command and the machine (CPU model, load average at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/: bench/cluster.py must not shadow the package

import _common as common  # noqa: E402  (bench/_common.py)

QUICK_N, QUICK_LEVELS, QUICK_NREDO = 20_000, [2000, 200, 20], 2
FULL_N, FULL_LEVELS, FULL_NREDO = 200_000, [3000, 2000, 1000], 5
MIN_ROWS_PER_CENTROID = 10  # faiss's min_points_per_centroid; the quick sizes respect it everywhere
OBJECTIVE_TOL = 1e-3  # relative difference of a level's objective that still counts as equal
D, CENTERS, NOISE, BLOCK = 128, 1000, 1.2, 1024  # small blocks: generation adds ~no memory
BASELINE_DESC = ("official run_hkmeans: faiss.Clustering per level on host numpy, faiss {faiss} "
                 "defaults (early stop on), niter/nredo/seeds/1000-10 points per centroid as the "
                 "official code, flat L2 index, Python concentration loop; 1 process")
CODE = (["cluster", "core"], ["bench/cluster.py", "bench/_common.py"])


def planted_rows(lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    """Rows lo..hi-1 of the global feature set, generated block by block (no rank holds more)."""
    means = F.normalize(torch.randn(CENTERS, D, generator=torch.Generator().manual_seed(seed)), dim=1)
    out = torch.empty(hi - lo, D)
    for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1 if hi > lo else 0):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b + 1)
        rows = F.normalize(means[torch.randint(0, CENTERS, (BLOCK,), generator=g)]
                           + NOISE * torch.randn(BLOCK, D, generator=g) / D**0.5, dim=1)
        a, z = max(lo, b * BLOCK), min(hi, (b + 1) * BLOCK)
        out[a - lo: z - lo] = rows[a - b * BLOCK: z - b * BLOCK]
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_procedure(x: np.ndarray, levels: list[int], niter: int, nredo: int, temperature: float,
                        early_stop: bool = True) -> dict:
    """The official run_hkmeans + PCL concentration, one process (method.md §2.3-2.4).

    Only the fields the official code sets are set; `early_stop=False` (`--faiss17`) also turns off
    faiss >= 1.8's early stop (`early_stop_threshold` -1), so that every restart runs all `niter`
    iterations as the official code's faiss 1.7 did.
    """
    import faiss

    t_faiss = t_post = 0.0
    im2cluster: list[list[int]] = []
    objectives = []
    data, prev = x, None
    for seed, k in enumerate(levels):
        t0 = time.perf_counter()
        clus = faiss.Clustering(data.shape[1], k)
        clus.verbose, clus.niter, clus.nredo, clus.seed = False, niter, nredo, seed
        clus.max_points_per_centroid, clus.min_points_per_centroid = 1000, 10
        if not early_stop:
            clus.early_stop_threshold = -1.0
        index = faiss.IndexFlatL2(data.shape[1])
        clus.train(data, index)
        dist, labels = index.search(data, 1)
        t1 = time.perf_counter()
        assignment = [int(n[0]) for n in labels]
        centroids = faiss.vector_to_array(clus.centroids).reshape(k, -1)
        members: list[list[float]] = [[] for _ in range(k)]
        for i, c in enumerate(assignment):
            members[c].append(dist[i][0])
        density = np.zeros(k)
        for c, ds in enumerate(members):
            if len(ds) > 1:
                density[c] = (np.asarray(ds) ** 0.5).mean() / np.log(len(ds) + 10)
        dmax = density.max()
        for c, ds in enumerate(members):
            if len(ds) <= 1:
                density[c] = dmax
        density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
        density = temperature * density / density.mean()
        normed = F.normalize(torch.from_numpy(centroids), p=2, dim=1)
        if seed == 0:
            im2cluster.append(assignment)
        else:
            im2cluster.append([assignment[c] for c in im2cluster[-1]])
            _ = torch.mm(prev, normed.t())  # logits A^{l-1}, as the official code
        prev = normed
        data = normed.numpy()
        objectives.append(float(dist.astype(np.float64).sum()))
        t_faiss += t1 - t0
        t_post += time.perf_counter() - t1
    return {"seconds": t_faiss + t_post, "faiss_s": t_faiss, "post_s": t_post, "objective": objectives,
            "threads": faiss.omp_get_max_threads()}


def _reference_worker(args: dict, queue) -> None:
    import faiss

    torch.set_num_threads(args["threads"])
    base = _rss_mb()
    x = planted_rows(0, args["n"]).numpy()
    out = reference_procedure(x, args["levels"], args["niter"], args["nredo"], 0.2)
    if args["faiss17"]:
        every = reference_procedure(x, args["levels"], args["niter"], args["nredo"], 0.2, early_stop=False)
        out.update({f"faiss17_{key}": value for key, value in every.items()})
    queue.put({**out, "base_mb": base, "peak_mb": _peak_mb(), "faiss_version": faiss.__version__})


def _ours_worker(rank: int, world: int, port: int, args: dict, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import faiss

    from cluster.hierarchy import hierarchical_kmeans
    from core import dist
    from core.config import ClusterConfig

    threads = max(1, args["threads"] // world)  # the ranks share the host's cores
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    dist.init(backend="gloo", timeout_s=3600)
    base = _rss_mb()
    lo, hi = rank * args["n"] // world, (rank + 1) * args["n"] // world
    feats, idx = planted_rows(lo, hi), torch.arange(lo, hi)
    cfg = ClusterConfig(niter=args["niter"], nredo=args["nredo"], prune=args.get("prune", True),
                        search=args["search"])
    dist.barrier()
    t0 = time.perf_counter()
    protos = hierarchical_kmeans(idx, feats, num_samples=args["n"], num_clusters=args["levels"], cfg=cfg,
                                 temperature=0.2)
    dist.barrier()
    result = {"seconds": time.perf_counter() - t0, "objective": [s.final_objective for s in protos.stats],
              "level_s": [s.seconds for s in protos.stats],
              "iterations": [s.iterations for s in protos.stats],
              "searched": [round(s.searched, 3) for s in protos.stats],
              "base_mb": base, "peak_mb": _peak_mb(), "threads": threads}
    if world == 1 and args["warm"] and args.get("prune", True):
        result.update(_warm_start(feats, idx, protos, cfg, args))
    queue.put((rank, result))
    dist.shutdown()


def _warm_start(feats: torch.Tensor, idx: torch.Tensor, previous, cfg, args: dict) -> dict:
    """Next epoch: features drift a little; warm start vs the faithful cold run on the same data."""
    import dataclasses

    from cluster.hierarchy import hierarchical_kmeans

    g = torch.Generator().manual_seed(7)
    feats.add_(0.05 * torch.randn(feats.shape, generator=g) / D**0.5)
    feats.copy_(F.normalize(feats, dim=1))
    out = {}
    for name, run_cfg, prev in (("warm", dataclasses.replace(cfg, warm_start=True), previous),
                                ("cold", cfg, None)):
        if name == "cold" and not args["warm_baseline"]:
            continue
        t0 = time.perf_counter()
        res = hierarchical_kmeans(idx, feats, num_samples=args["n"], num_clusters=args["levels"],
                                  cfg=run_cfg, temperature=0.2, previous=prev)
        out[f"{name}_seconds"] = time.perf_counter() - t0
        out[f"{name}_objective"] = [s.final_objective for s in res.stats]
    return out


def _spawn(target, world: int, args: dict) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if target is _reference_worker:
        procs = [ctx.Process(target=target, args=(args, queue))]
    else:
        procs = [ctx.Process(target=target, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=7200) for _ in procs]
    for p in procs:
        p.join()
    if target is _reference_worker:
        return results
    return [r for _, r in sorted(results, key=lambda item: item[0])]


def rows_per_centroid(n: int, levels: list[int]) -> list[float]:
    """Rows each level clusters per centroid: N at level 1, then the level below's centroids."""
    return [round(rows / k, 2) for rows, k in zip([n, *levels[:-1]], levels, strict=True)]


def _parse_args() -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="N=200k into 3000/2000/1000, nredo 5")
    parser.add_argument("--n", type=int, help=f"number of features (default {QUICK_N}, --full {FULL_N})")
    parser.add_argument("--levels", type=lambda s: [int(k) for k in s.split(",")],
                        help=f"clusters per level, fine to coarse, e.g. 2000,200,20 (default {QUICK_LEVELS}, "
                             f"--full {FULL_LEVELS})")
    parser.add_argument("--nredo", type=int, help=f"restarts (default {QUICK_NREDO}, --full {FULL_NREDO})")
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--search", default="auto", help="ours' cluster.search (default auto)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-start comparison")
    parser.add_argument("--no-two-ranks", action="store_true", help="skip ours on 2 ranks (memory)")
    parser.add_argument("--faiss17", action="store_true",
                        help="also run the baseline with every iteration (faiss 1.7, early stop off)")
    parser.add_argument("--warm-baseline", action="store_true",
                        help="also run the faithful cold clustering on the drifted features")
    parser.add_argument("--prune-ablation", action="store_true",
                        help="also run ours on 1 rank with cluster.prune=false (every row searched)")
    opts = parser.parse_args()
    args = {"mode": "full" if opts.full else "quick",
            "n": opts.n or (FULL_N if opts.full else QUICK_N),
            "levels": opts.levels or (FULL_LEVELS if opts.full else QUICK_LEVELS),
            "nredo": opts.nredo or (FULL_NREDO if opts.full else QUICK_NREDO),
            "niter": opts.niter, "d": D, "threads": os.cpu_count() or 1, "search": opts.search,
            "warm": not opts.no_warm, "warm_baseline": opts.warm_baseline, "faiss17": opts.faiss17,
            "two_ranks": not opts.no_two_ranks}
    return opts, args


def main() -> None:
    opts, args = _parse_args()
    machine = common.machine()
    key = common.code_key(*CODE, extra=args)
    per_centroid = rows_per_centroid(args["n"], args["levels"])
    print(f"config: {args}, rows per centroid per level {per_centroid}", flush=True)
    if args["mode"] == "quick" and min(per_centroid) < MIN_ROWS_PER_CENTROID:
        print(f"warning: fewer than {MIN_ROWS_PER_CENTROID} rows per centroid at some level "
              f"({per_centroid}): the upper levels' k-means is then mostly ties", flush=True)
    ref = _spawn(_reference_worker, 1, args)[0]
    print(f"baseline (official, faiss {ref['faiss_version']} defaults): {ref['seconds']:.1f}s "
          f"(faiss {ref['faiss_s']:.1f}s, python post {ref['post_s']:.2f}s), objective {ref['objective']}, "
          f"peak {ref['peak_mb']:.0f} MB", flush=True)
    if "faiss17_seconds" in ref:
        print(f"baseline with every iteration (faiss 1.7 behaviour): {ref['faiss17_seconds']:.1f}s, "
              f"objective {ref['faiss17_objective']}", flush=True)
    one = _spawn(_ours_worker, 1, args)[0]
    print(f"ours 1 rank: {one['seconds']:.1f}s (levels {[round(s, 2) for s in one['level_s']]}, "
          f"kept restarts' iterations {one['iterations']}, fraction of row searches needed "
          f"{one['searched']}), objective {one['objective']}, peak {one['peak_mb']:.0f} MB "
          f"(base {one['base_mb']:.0f})", flush=True)
    if args["warm"]:
        print(f"warm start on drifted features: {one['warm_seconds']:.1f}s objective {one['warm_objective']}"
              + (f"; faithful cold on the same: {one['cold_seconds']:.1f}s objective {one['cold_objective']}"
                 if "cold_seconds" in one else ""), flush=True)
    unpruned = None
    if opts.prune_ablation:
        unpruned = _spawn(_ours_worker, 1, {**args, "prune": False, "warm": False})[0]
        print(f"ours 1 rank, cluster.prune=false: {unpruned['seconds']:.1f}s "
              f"(levels {[round(s, 2) for s in unpruned['level_s']]}), objective {unpruned['objective']}",
              flush=True)
    two = _spawn(_ours_worker, 2, {**args, "warm": False}) if args["two_ranks"] else []
    for r, res in enumerate(two):
        print(f"ours 2 ranks, rank {r}: {res['seconds']:.1f}s, peak {res['peak_mb']:.0f} MB "
              f"(base {res['base_mb']:.0f}, increment {res['peak_mb'] - res['base_mb']:.0f})", flush=True)

    rel_diff = [(o - b) / b for o, b in zip(one["objective"], ref["objective"], strict=True)]
    equal_objective = all(abs(r) <= OBJECTIVE_TOL for r in rel_diff)
    # the rows, levels, niter, nredo and seeds are the same by construction; threads are checked
    equal_settings = one["threads"] == ref["threads"]
    equal_work = equal_settings and equal_objective
    ratio = ref["seconds"] / one["seconds"]
    summary = {
        "bench": "cluster", "ours": round(one["seconds"], 2), "baseline": round(ref["seconds"], 2),
        "unit": "s", "ratio": round(ratio, 3), "goal": 2.0, "meets_goal": ratio >= 2.0 and equal_work,
        "baseline_desc": BASELINE_DESC.format(faiss=ref["faiss_version"]),
        "equal_work": equal_work, "equal_objective": equal_objective, "objective_tol": OBJECTIVE_TOL,
        "objective": {"ours": one["objective"], "baseline": ref["objective"],
                      "rel_diff": [float(f"{r:.3g}") for r in rel_diff]},
        **{k: args[k] for k in ("mode", "n", "levels", "nredo", "niter", "d", "search")},
        "threads": {"ours": one["threads"], "baseline": ref["threads"]},
        "rows_per_centroid": per_centroid,
        "searched_fraction": one["searched"], "iterations": one["iterations"],
        "ref_faiss_s": round(ref["faiss_s"], 2), "ref_python_post_s": round(ref["post_s"], 3),
        "faiss": ref["faiss_version"], "torch": torch.__version__,
        "command": common.command(), "machine": machine,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()], "key": key,
    }
    if "faiss17_seconds" in ref:
        summary["baseline_faiss17"] = round(ref["faiss17_seconds"], 2)
        summary["ratio_vs_faiss17"] = round(ref["faiss17_seconds"] / one["seconds"], 3)
        summary["objective"]["baseline_faiss17"] = ref["faiss17_objective"]
    if two:
        inc_one = one["peak_mb"] - one["base_mb"]
        inc_two = max(r["peak_mb"] - r["base_mb"] for r in two)
        summary.update({
            "two_rank_s": round(max(r["seconds"] for r in two), 2),
            "mem_increment_mb_1rank": round(inc_one, 1), "mem_increment_mb_2rank": round(inc_two, 1),
            "mem_increment_ratio": round(inc_two / inc_one, 3),
            "peak_rss_ratio": round(max(r["peak_mb"] for r in two) / one["peak_mb"], 3),
            "mem_goal": 0.6, "mem_meets_goal": inc_two / inc_one <= 0.6})
    if unpruned is not None:
        summary["ours_unpruned"] = round(unpruned["seconds"], 2)
        summary["prune_speedup"] = round(unpruned["seconds"] / one["seconds"], 3)
    if args["warm"]:
        summary["warm_s"] = round(one["warm_seconds"], 2)
        summary["warm_objective_l1"] = one["warm_objective"][0]
        if "cold_seconds" in one:
            summary["warm_cold_s"] = round(one["cold_seconds"], 2)
            summary["warm_cold_objective_l1"] = one["cold_objective"][0]
    # --full: stored with the code key; figures measured while the code changed print no JSON line
    if args["mode"] == "full" and not common.record_run("cluster", key, CODE, args, summary):
        return
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
