"""Training curves for `hcsc-eval report`, from a run's ``metrics.jsonl`` (`core.logs.MetricsWriter`).

Each line is one JSON record ``{"kind", "step", ...}``. The kinds read here: ``train`` (per logged
step: the losses, their per-level terms ``<name>/l<level>`` with level 1 the finest, the kept
fractions of ICSC and PCSC), ``cluster`` (per epoch and level: the clustering of the training
split, with ``nmi`` / ``purity`` when the shards carry labels), ``knn`` (the monitor after an
epoch), ``init`` and ``final`` (the same evaluation before and after training). The trainer's
records grow over time, and a run killed mid-write leaves a cut line, so every kind and key is
optional: a chart is drawn from whatever series exist, and unreadable lines are skipped.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

MAX_POINTS = 400  # per drawn series; a long run logs ~10^5 steps, which an SVG path need not carry
LEVEL_KEY = re.compile(r"^(?P<name>[A-Za-z_]+)/l(?P<level>\d+)$")


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    color: int = 0  # index into the page's palette
    dashed: bool = False


@dataclass
class Chart:
    title: str
    xlabel: str
    note: str  # one sentence: what the curve measures and how to read it
    series: list[Series] = field(default_factory=list)
    percent: bool = False  # the values are percentages (axis from 0)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def thin(x: list[float], y: list[float], limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most `limit` points: consecutive points averaged in equal buckets (keeps the trend, and
    a noisy per-step loss reads better averaged than subsampled)."""
    if len(x) <= limit:
        return x, y
    edges = [round(i * len(x) / limit) for i in range(limit + 1)]
    pairs = [(sum(x[a:b]) / (b - a), sum(y[a:b]) / (b - a)) for a, b in zip(edges, edges[1:], strict=False)
             if b > a]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _series(records: list[dict], key: str, xkey: str, label: str, **style) -> Series | None:
    pts = [(x, y) for r in records if (x := _number(r.get(xkey))) is not None
           and (y := _number(r.get(key))) is not None]
    if not pts:
        return None
    pts.sort(key=lambda p: p[0])
    xs, ys = thin([p[0] for p in pts], [p[1] for p in pts])
    return Series(label, xs, ys, **style)


def _levels(records: list[dict], name: str) -> list[int]:
    found = set()
    for r in records:
        for key in r:
            m = LEVEL_KEY.match(key)
            if m and m["name"] == name:
                found.add(int(m["level"]))
    return sorted(found)


def _chart(title: str, xlabel: str, note: str, series: list[Series | None], percent: bool = False
           ) -> Chart | None:
    kept = [s for s in series if s is not None]
    return Chart(title, xlabel, note, kept, percent) if kept else None


def _per_level(records: list[dict], solid: str, dashed: str, xkey: str) -> list[Series | None]:
    out: list[Series | None] = []
    for lvl in sorted(set(_levels(records, solid)) | set(_levels(records, dashed))):
        out.append(_series(records, f"{solid}/l{lvl}", xkey, f"{solid} L{lvl}", color=lvl - 1))
        out.append(_series(records, f"{dashed}/l{lvl}", xkey, f"{dashed} L{lvl}", color=lvl - 1, dashed=True))
    return out


def _all_zero(s: Series | None) -> bool:
    return s is not None and not any(s.y)


def _evaluations(records: list[dict], key: str, epochs: int | None) -> list[tuple[float, float]]:
    """(epochs trained, value) of `key` over the init, knn and final records."""
    seen = [e for r in records if (e := _number(r.get("epoch"))) is not None]
    # the final evaluation follows the last epoch: the config's count, or the last one seen (a run
    # extended with a larger optim.epochs, or no config at all)
    end = max(float(epochs or 0), max(seen) + 1 if seen else 1.0)
    pts = []
    for r in records:
        kind, value, epoch = r.get("kind"), _number(r.get(key)), _number(r.get("epoch"))
        if value is None:
            continue
        if kind == "init":
            pts.append((0.0, value))
        elif kind == "knn" and epoch is not None:
            pts.append((epoch + 1, value))  # the monitor runs after epoch `epoch`
        elif kind == "final":
            pts.append((end, value))
    return sorted(pts)


def _eval_series(records: list[dict], key: str, label: str, epochs: int | None, **style) -> Series | None:
    pts = _evaluations(records, key, epochs)
    return Series(label, [p[0] for p in pts], [p[1] for p in pts], **style) if pts else None


def _cluster_series(records: list[dict], key: str, **style) -> list[Series | None]:
    by_level: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        if r.get("kind") != "cluster":
            continue
        level, epoch, value = _number(r.get("level")), _number(r.get("epoch")), _number(r.get(key))
        if level is not None and epoch is not None and value is not None:
            by_level[int(level)].append((epoch, value))
    return [Series(f"{key} L{lvl}", [p[0] for p in sorted(pts)], [p[1] for p in sorted(pts)], color=lvl - 1,
                   **style) for lvl, pts in sorted(by_level.items())]


def charts(records: list[dict], *, epochs: int | None = None) -> list[Chart]:
    """The report's training charts, each only when its records exist.

    Args:
        records: `core.logs.read_jsonl` of the run's metrics.jsonl.
        epochs: ``optim.epochs`` of the run, where the final evaluation is placed (None: one epoch
            after the last one seen).
    """
    train = [r for r in records if r.get("kind") == "train"]
    found: list[Chart | None] = []
    local = [_series(train, k, "step", k, color=c, dashed=True)
             for k, c in (("loss_local_inst", 3), ("loss_local_proto", 4))]
    found.append(_chart(
        "Training loss", "step",
        "loss = loss_inst (instance InfoNCE, summed over levels once clustering starts) + loss_proto "
        "(prototype InfoNCE, averaged over levels), docs/method.md §5.1; the jump at the end of the "
        "warm-up is the instance term counted once per level.",
        [_series(train, "loss", "step", "loss", color=0),
         _series(train, "loss_inst", "step", "loss_inst", color=1),
         _series(train, "loss_proto", "step", "loss_proto", color=2),
         *[s for s in local if not _all_zero(s)]]))
    found.append(_chart(
        "Loss per level", "step",
        "The instance (solid) and prototype (dashed) InfoNCE at each level, L1 the finest; the prototype "
        "term is only defined after the warm-up.", _per_level(train, "loss_inst", "loss_proto", "step")))
    found.append(_chart(
        "Kept negatives per level", "step",
        "kept_inst: the fraction of queue negatives ICSC keeps at that level (docs/method.md §3); "
        "kept_proto (dashed): the fraction of candidate prototype negatives PCSC keeps (§4), always 1 at "
        "the top level, which is never selected. A low value means many negatives looked like the "
        "query's own cluster and were dropped.", _per_level(train, "kept_inst", "kept_proto", "step")))
    found.append(_chart(
        "Top-1 of the positive per level", "step",
        "How often the positive key (acc_inst, solid) or the own prototype (acc_proto, dashed) has the "
        "largest logit among its negatives, in percent.",
        _per_level(train, "acc_inst", "acc_proto", "step"), percent=True))
    found.append(_chart(
        "kNN top-1 per epoch", "epochs trained",
        "Weighted kNN classification of the validation split by the training split's trunk features "
        "(docs/method.md §7.1): top-1 (solid) and top-5 (dashed) in percent; epoch 0 is the encoder at "
        "initialisation, the last point the final evaluation.",
        [_eval_series(records, "knn_top1", "top-1", epochs, color=0),
         _eval_series(records, "knn_top5", "top-5", epochs, color=0, dashed=True)], percent=True))
    found.append(_chart(
        "Clustering of the training split per epoch", "epoch",
        "NMI (solid) and purity (dashed) of each level's clustering, computed at the start of the epoch, "
        "against the training labels (only when the shards carry labels).",
        [*_cluster_series(records, "nmi"), *_cluster_series(records, "purity", dashed=True)]))
    return [c for c in found if c is not None]
