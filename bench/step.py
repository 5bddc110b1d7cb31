"""Step benchmark: HCSC step time / MoCo v2 step time on the same model and batch.

CPU, 2 threads, resnet18_small at 32 px, batch 64, queue 16384, prototypes 3000/2000/1000 over a
synthetic dataset of N = 50k. A step is forward + backward + SGD step (the momentum update and the
enqueue happen inside forward). Three models with the same initial weights run interleaved, round
by round, so that load from other processes hits all of them alike; medians after warm-up.

- MoCo v2: `HCSC` with no prototypes (the warm-up path: one InfoNCE).
- HCSC (ours): instance and prototype selection on, vectorised (boolean masks, cached per-epoch
  constants, no host syncs).
- HCSC logging step: the same, plus the per-level metrics (`model.step_terms.step_metrics`) that the
  trainer computes only on its logging steps (every `run.log_every` steps).
- Reference port: the reference's construction ported as described in docs/method.md §3, §4 and §9
  item 10: the full (K, M) queue-to-prototype softmax every step, `range(im2cluster.max())` and Python
  `set` differences for the prototype negatives, a per-query loop for their keep probabilities.
  Written here only, to show what vectorising buys; same maths, same losses.

Usage: ``python bench/step.py`` (quick, ~2 min on 2 cores) or ``--full`` (the recorded numbers).
The last output line is one JSON object (docs/architecture.md#benchmarks).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# `python bench/step.py` puts bench/ first on sys.path, where bench/cluster.py and bench/pipeline.py
# would shadow the packages of the same names.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.prototypes import Prototypes  # noqa: E402
from core.config import HCSCConfig, ModelConfig  # noqa: E402
from model import losses  # noqa: E402
from model.hcsc import HCSC, StepLogits  # noqa: E402
from pipeline.batch import Batch  # noqa: E402

log = logging.getLogger("bench.step")
GOAL = 1.10


class ReferenceHCSC(HCSC):
    """HCSC with the reference's per-step set-based selection (single crop only)."""

    def _hcsc_losses(self, q, local_q, k, queue, idx, protos, terms):
        T = self.model_cfg.temperature
        l_pos, l_neg = (q * k).sum(1, keepdim=True), q @ queue
        loss_inst = q.new_zeros(())
        loss_proto = q.new_zeros(())
        for lvl, (y_all, cents, dens) in enumerate(zip(protos.im2cluster, protos.centroids, protos.density,
                                                       strict=True)):
            labels = y_all[idx]
            with torch.no_grad():  # sample_neg_instance: full softmax of the queue over M_l prototypes
                assign = torch.softmax(queue.t() @ cents.t() / dens.clamp_min(1e-3), dim=1)
                prob = (1 - assign[:, labels].t()).clamp(0, 0.999)
                mask = torch.bernoulli(prob)
            terms.inst_logits.append(torch.cat([l_pos, l_neg * mask], 1) / T)
            loss_inst = loss_inst + losses.info_nce(terms.inst_logits[-1])
            loss_proto = loss_proto + self._reference_proto_ce(q, labels, y_all, lvl, protos)
        zero = q.new_zeros(())
        return {"loss_inst": loss_inst, "loss_proto": loss_proto / protos.num_levels,
                "loss_local_inst": zero, "loss_local_proto": zero}

    def _reference_proto_ce(self, q, labels, y_all, lvl, protos):
        cents, dens = protos.centroids[lvl], protos.density[lvl]
        neg_ids = sorted(set(range(int(y_all.max()))) - set(labels.tolist()))  # host sync + sets
        neg = torch.tensor(neg_ids, device=q.device)
        pos_logit = (q * cents[labels]).sum(1, keepdim=True) / dens[labels][:, None]
        neg_logit = q @ cents[neg].t()
        if self.hcsc_cfg.proto_selection and lvl < protos.num_levels - 1:
            up = protos.density[lvl + 1]
            up = up / up.mean() * self.model_cfg.temperature
            rows = []
            for y in labels.tolist():  # per-query loop, as in the reference
                parent = int(protos.cluster2cluster[lvl][y])
                p = torch.softmax(protos.logits[lvl][neg] / up, dim=1)[:, parent]
                rows.append((1 - p).clamp(1e-4, 0.999))
            neg_logit = neg_logit * torch.bernoulli(torch.stack(rows))
        return losses.info_nce(torch.cat([pos_logit, neg_logit / dens[neg]], 1))


def synthetic_prototypes(n: int, sizes: list[int], dim: int, temperature: float, seed: int = 0) -> Prototypes:
    g = torch.Generator().manual_seed(seed)
    y = [torch.randint(0, sizes[0], (n,), generator=g)]
    parents = []
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        p = torch.cat([torch.arange(hi), torch.randint(0, hi, (lo - hi,), generator=g)])
        parents.append(p)
        y.append(p[y[-1]])
    cents = [F.normalize(torch.randn(m, dim, generator=g), dim=1) for m in sizes]
    dens = [torch.rand(m, generator=g) + 0.5 for m in sizes]
    dens = [d / d.mean() * temperature for d in dens]
    logits = [a @ b.t() for a, b in zip(cents, cents[1:], strict=False)]
    return Prototypes(y, cents, dens, parents, logits)


def build(kind: str, mcfg: ModelConfig, hcfg: HCSCConfig) -> tuple[HCSC, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights for every variant
    model = (ReferenceHCSC if kind == "reference" else HCSC)(mcfg, hcfg)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    return model.train(), opt


def step(model: HCSC, opt: torch.optim.Optimizer, batch: Batch, protos: Prototypes | None,
         metrics: bool = False) -> tuple[float, float]:
    """One training step; returns (wall seconds, process CPU seconds over all threads).

    `metrics`: also compute the per-level metrics, as the trainer does on its logging steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(batch, protos, epoch=1, metrics=metrics)["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def loss_part_ms(model: HCSC, protos: Prototypes | None, reps: int = 5) -> float:
    """Best-of-`reps` process-CPU ms of the step minus the encoders: logits, selection, CE, their
    backward and the enqueue, on random unit embeddings. CPU time and the minimum make it robust to
    other processes' load (it counts spinning threads too, so read it with `--threads 1`)."""
    g = torch.Generator().manual_seed(2)
    k = F.normalize(torch.randn(64, model.model_cfg.dim, generator=g), dim=1)
    idx = torch.randint(0, 50_000, (64,), generator=g)
    best = float("inf")
    for _ in range(reps):
        q = F.normalize(torch.randn(64, model.model_cfg.dim, generator=g), dim=1).requires_grad_(True)
        start = time.process_time()
        terms = StepLogits()
        queue = model.queue.clone()
        if protos is None:
            out = model._moco_losses(q, [], k, queue, terms)
        else:
            out = model._hcsc_losses(q, [], k, queue, idx, protos, terms)
        sum(out.values()).backward()
        model._enqueue(k, idx)
        best = min(best, time.process_time() - start)
    return best * 1000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more measured steps (recorded numbers)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    warmup, measured = (2, 15) if args.full else (1, 4)
    mcfg = ModelConfig(encoder="resnet18_small", dim=128, queue_size=16384)
    sizes = [3000, 2000, 1000]
    protos = synthetic_prototypes(50_000, sizes, mcfg.dim, mcfg.temperature)
    variants = {
        "moco": (*build("moco", mcfg, HCSCConfig(sizes, 0, instance_selection=False, proto_selection=False)),
                 None),
        "hcsc": (*build("hcsc", mcfg, HCSCConfig(sizes, 0)), protos),
        "hcsc_logging_step": (*build("hcsc", mcfg, HCSCConfig(sizes, 0)), protos),
        "reference": (*build("reference", mcfg, HCSCConfig(sizes, 0)), protos),
    }
    g = torch.Generator().manual_seed(1)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for r in range(warmup + measured):
        batch = Batch([torch.randn(64, 3, 32, 32, generator=g) for _ in range(2)],
                      torch.randint(0, 50_000, (64,), generator=g), torch.zeros(64, dtype=torch.long))
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # cancel drift in load
        for name in order:
            model, opt, p = variants[name]
            t = step(model, opt, batch, p, metrics=name == "hcsc_logging_step")
            if r >= warmup:
                times[name].append(t)
        log.info("round %d (wall s, cpu s): %s", r,
                 {n: tuple(round(x, 2) for x in v[-1]) for n, v in times.items() if v})
    wall = {name: statistics.median(t[0] for t in v) for name, v in times.items()}
    cpu = {name: statistics.median(t[1] for t in v) for name, v in times.items()}
    paired = statistics.median(h[0] / m[0] for h, m in zip(times["hcsc"], times["moco"], strict=True))
    loss_ms = {name: loss_part_ms(variants[name][0], variants[name][2]) for name in variants}
    ratio = wall["hcsc"] / wall["moco"]
    result = {"bench": "step", "ours": round(wall["hcsc"], 4), "baseline": round(wall["moco"], 4),
              "unit": "s/step", "ratio": round(ratio, 4), "goal": GOAL, "meets_goal": ratio <= GOAL,
              "baseline_desc": "MoCo v2 step (the same HCSC module without prototypes), same model and batch",
              # HCSC's step does more by design (selection, prototype losses): the ratio is its overhead
              "equal_work": False,
              "paired_ratio_median": round(paired, 4),
              "reference_port": round(wall["reference"], 4),
              "logging_step_ratio": round(wall["hcsc_logging_step"] / wall["hcsc"], 4),
              "reference_port_ratio": round(wall["reference"] / wall["moco"], 4),
              "cpu_ratio": round(cpu["hcsc"] / cpu["moco"], 4),
              "reference_port_cpu_ratio": round(cpu["reference"] / cpu["moco"], 4),
              "loss_part_cpu_ms": {n: round(v, 1) for n, v in loss_ms.items()},
              "steps_measured": measured, "threads": args.threads,
              "setup": "resnet18_small 32px, batch 64, K 16384, M 3000/2000/1000, N 50k, CPU"}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
