"""Benchmark: hierarchical k-means + concentration, ours (1 and 2 gloo ranks) vs the reference.

The reference procedure (method.md §2.3-2.4), rewritten from it here: one process, faiss.Clustering
on host numpy with the official settings per level (niter, nredo, seed = level index, max/min
points per centroid 1000/10, flat L2 index), `index.search` for the assignments, then the
per-sample Python loop of the official PCL/HCSC code for the concentration and Python list
propagation of the assignments. Ours: `cluster.hierarchy.hierarchical_kmeans` on 1 rank and on 2
spawned gloo ranks, each rank generating only its own rows.

Features: N random unit vectors in 128-d around 1000 planted directions. Every run happens in its
own spawned process; memory is that process's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`)
and its increment over the RSS measured after imports and process-group setup, before any data
exists (the increment is what clustering itself holds). Time excludes data generation.

Usage: python bench/cluster.py            (~2 min on 2 cores: N=20k, nredo 2)
       python bench/cluster.py --full     (N=200k, niter 20, nredo 5: the recorded numbers)
       --prune-ablation adds ours on 1 rank with cluster.prune=false (every row searched).
Last line: one JSON object (docs/architecture.md#benchmarks).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = [3000, 2000, 1000]
D, CENTERS, NOISE, BLOCK = 128, 1000, 1.2, 1024  # small blocks: generation adds ~no memory


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
                        early_stop: bool = False) -> dict:
    """The official run_hkmeans + PCL concentration, one process (method.md §2.3-2.4).

    `early_stop=False` reproduces the official code's faiss (1.7.x, pinned with torch 1.8.1): every
    restart runs all `niter` iterations. faiss >= 1.8 stops a restart once the objective stops
    improving (`early_stop_threshold` 0); -1 turns that off.
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
    return {"seconds": t_faiss + t_post, "faiss_s": t_faiss, "post_s": t_post, "objective": objectives}


def _reference_worker(args: dict, queue) -> None:
    torch.set_num_threads(args["threads"])
    base = _rss_mb()
    x = planted_rows(0, args["n"]).numpy()
    out = reference_procedure(x, LEVELS, args["niter"], args["nredo"], 0.2)
    if args["ref_early_stop"]:  # the same procedure with faiss 1.15's own early stop
        fast = reference_procedure(x, LEVELS, args["niter"], args["nredo"], 0.2, early_stop=True)
        out.update({f"es_{key}": value for key, value in fast.items()})
    queue.put({**out, "base_mb": base, "peak_mb": _peak_mb()})


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
    cfg = ClusterConfig(niter=args["niter"], nredo=args["nredo"], prune=args.get("prune", True))
    dist.barrier()
    t0 = time.perf_counter()
    protos = hierarchical_kmeans(idx, feats, num_samples=args["n"], num_clusters=LEVELS, cfg=cfg,
                                 temperature=0.2)
    dist.barrier()
    result = {"seconds": time.perf_counter() - t0, "objective": [s.final_objective for s in protos.stats],
              "level_s": [s.seconds for s in protos.stats],
              "iterations": [s.iterations for s in protos.stats],
              "searched": [round(s.searched, 3) for s in protos.stats],
              "base_mb": base, "peak_mb": _peak_mb()}
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
        res = hierarchical_kmeans(idx, feats, num_samples=args["n"], num_clusters=LEVELS, cfg=run_cfg,
                                  temperature=0.2, previous=prev)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="N=200k, niter 20, nredo 5")
    parser.add_argument("--n", type=int, help="number of features (default 20k, --full 200k)")
    parser.add_argument("--nredo", type=int, help="restarts (default 2, --full 5)")
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-start comparison")
    parser.add_argument("--no-ref-early-stop", action="store_true",
                        help="skip the second reference run with faiss >= 1.8 early stopping")
    parser.add_argument("--warm-baseline", action="store_true",
                        help="also run the faithful cold clustering on the drifted features")
    parser.add_argument("--prune-ablation", action="store_true",
                        help="also run ours on 1 rank with cluster.prune=false (every row searched)")
    opts = parser.parse_args()
    args = {"n": opts.n or (200_000 if opts.full else 20_000), "nredo": opts.nredo or (5 if opts.full else 2),
            "niter": opts.niter, "threads": os.cpu_count() or 1, "warm": not opts.no_warm,
            "warm_baseline": opts.warm_baseline, "ref_early_stop": not opts.no_ref_early_stop}
    print(f"config: {args}, levels {LEVELS}, d={D}", flush=True)
    ref = _spawn(_reference_worker, 1, args)[0]
    print(f"reference: {ref['seconds']:.1f}s (faiss {ref['faiss_s']:.1f}s, "
          f"python post {ref['post_s']:.2f}s), objective {ref['objective']}, peak {ref['peak_mb']:.0f} MB",
          flush=True)
    if "es_seconds" in ref:
        print(f"reference with faiss 1.15 early stop: {ref['es_seconds']:.1f}s "
              f"(faiss {ref['es_faiss_s']:.1f}s), objective {ref['es_objective']}", flush=True)
    one = _spawn(_ours_worker, 1, args)[0]
    print(f"ours 1 rank: {one['seconds']:.1f}s (levels {[round(s, 2) for s in one['level_s']]}, "
          f"kept restarts' iterations {one['iterations']}, fraction of row searches needed "
          f"{one['searched']}), "
          f"objective {one['objective']}, peak {one['peak_mb']:.0f} MB (base {one['base_mb']:.0f})",
          flush=True)
    if args["warm"]:
        print(f"warm start on drifted features: {one['warm_seconds']:.1f}s objective {one['warm_objective']}"
              + (f"; faithful cold on the same: {one['cold_seconds']:.1f}s objective {one['cold_objective']}"
                 if "cold_seconds" in one else ""), flush=True)
    if opts.prune_ablation:
        unpruned = _spawn(_ours_worker, 1, {**args, "prune": False, "warm": False})[0]
        print(f"ours 1 rank, cluster.prune=false: {unpruned['seconds']:.1f}s "
              f"(levels {[round(s, 2) for s in unpruned['level_s']]}), objective {unpruned['objective']}",
              flush=True)
    two = _spawn(_ours_worker, 2, args)
    for r, res in enumerate(two):
        print(f"ours 2 ranks, rank {r}: {res['seconds']:.1f}s, peak {res['peak_mb']:.0f} MB "
              f"(base {res['base_mb']:.0f}, increment {res['peak_mb'] - res['base_mb']:.0f})", flush=True)
    inc_one = one["peak_mb"] - one["base_mb"]
    inc_two = max(r["peak_mb"] - r["base_mb"] for r in two)
    ratio = ref["seconds"] / one["seconds"]
    summary = {
        "bench": "cluster", "ours": round(one["seconds"], 2), "baseline": round(ref["seconds"], 2),
        "unit": "s", "ratio": round(ratio, 3), "goal": 2.0, "meets_goal": ratio >= 2.0,
        "n": args["n"], "nredo": args["nredo"], "niter": args["niter"],
        "objective_rel_diff": abs(one["objective"][0] - ref["objective"][0]) / ref["objective"][0],
        "searched_fraction": one["searched"], "iterations": one["iterations"],
        "ref_faiss_s": round(ref["faiss_s"], 2), "ref_python_post_s": round(ref["post_s"], 3),
        "two_rank_s": round(max(r["seconds"] for r in two), 2),
        "mem_increment_mb_1rank": round(inc_one, 1), "mem_increment_mb_2rank": round(inc_two, 1),
        "mem_increment_ratio": round(inc_two / inc_one, 3),
        "peak_rss_ratio": round(max(r["peak_mb"] for r in two) / one["peak_mb"], 3),
        "mem_goal": 0.6, "mem_meets_goal": inc_two / inc_one <= 0.6,
    }
    if opts.prune_ablation:
        summary["ours_unpruned"] = round(unpruned["seconds"], 2)
        summary["prune_speedup"] = round(unpruned["seconds"] / one["seconds"], 3)
    if "es_seconds" in ref:
        summary["baseline_faiss_early_stop"] = round(ref["es_seconds"], 2)
        summary["ratio_vs_faiss_early_stop"] = round(ref["es_seconds"] / one["seconds"], 3)
    if args["warm"]:
        summary["warm_s"] = round(one["warm_seconds"], 2)
        summary["warm_objective_l1"] = one["warm_objective"][0]
        if "cold_seconds" in one:
            summary["warm_cold_s"] = round(one["cold_seconds"], 2)
            summary["warm_cold_objective_l1"] = one["cold_objective"][0]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
