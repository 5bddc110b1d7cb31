"""`hcsc-eval report`: a self-contained HTML page of the cluster hierarchy a run learned.

Two sources of the hierarchy:
  - by default, the prototypes stored with one of our checkpoints (`evaluate.stored`): the
    clustering of the training split that training used at the start of the checkpoint's epoch.
    Members are taken from the stored ``im2cluster``; the images shown for a prototype are its
    members nearest to its centroid, embedded as the trainer embedded them (the momentum encoder
    with its head, docs/method.md §2.2), among all of the split's images or a random subset of
    ``--max-images`` topped up so that every shown prototype has enough candidates;
  - with ``--recluster``, a fresh hierarchical k-means of a split's L2-normalised trunk features
    (`cluster.hierarchy.hierarchical_kmeans`, the training procedure), for any checkpoint.
Every top-level cluster gets a section with its child prototypes; the page also has the run's
config and training curves (from ``metrics.jsonl``) when the checkpoint is in a run folder, the
per-level scores against the labels, a class x cluster matrix and a PCA map of the prototypes.
Thumbnails are read straight from the shards and embedded as data URIs, so the page is one file;
a PNG montage is written beside it for each of the largest top-level clusters.
"""

from __future__ import annotations

import functools
import io
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from cluster.features import gather_by_idx, split_features
from cluster.prototypes import Prototypes
from core import dist
from core.config import ClusterConfig
from core.files import atomic_write, write_text_atomic
from core.logs import read_jsonl
from core.runfolder import RunFolder
from evaluate.checkpoints import CheckpointError, load_backbone, resolve
from evaluate.clustering import check_levels, cluster_split, score_levels, split_labels
from evaluate.data import data_config
from evaluate.metrics import clustering_scores, purity
from evaluate.stored import StoredRun, momentum_embedder, scan_split
from pipeline.plan import load_shards
from shards.format import ShardFormatError, split_info

log = logging.getLogger(__name__)

THUMB = 96  # px, longest side of an embedded thumbnail
MONTAGE_GLOB = "cluster_L*_*.png"  # the montages `write_report` writes
# AMI's expected-mutual-information term costs about N x clusters; above this many samples the
# scores of the stored assignments are computed on a random subset of this size.
SCORE_SAMPLES = 100_000
PAGE_IMAGES_WARN = 20_000  # thumbnails (about 4 kB each as data URIs) above which the log warns


@dataclass
class Node:
    """One prototype shown on the page."""

    level: int  # 1-based, fine to coarse
    cid: int
    size: int  # members in the assignment (all samples of the split)
    classes: list[tuple[str, int]] = field(default_factory=list)  # (class name, members), descending
    images: list[tuple[int, float]] = field(default_factory=list)  # (dataset idx, cosine to centroid)
    children: list[Node] = field(default_factory=list)
    finer: list[tuple[int, int]] = field(default_factory=list)  # (cid, size) of its children one level down
    candidates: int = 0  # members whose embedding was ranked for `images`
    num_children: int = 0  # children it has (those shown are in `children`)


@dataclass
class ReportData:
    checkpoint: str
    split: str
    num_samples: int
    class_names: list[str]
    labels: np.ndarray | None  # class id per dataset index, None when the split is unlabelled
    sizes: list[np.ndarray]  # members per cluster, per level
    scores: list[dict] | None
    top: list[Node]  # every top-level cluster, largest first
    thumbs: dict[int, Image.Image] = field(default_factory=dict)
    source: str = "recluster"  # "stored": the checkpoint's prototypes; "recluster": a fresh clustering
    prototypes: Prototypes | None = None
    prototypes_epoch: int | None = None  # stored: the epoch at whose start they were computed
    tag: str | None = None  # our checkpoint folder's name
    config_yaml: str | None = None  # the run's resolved config, when known
    records: list[dict] = field(default_factory=list)  # the run's metrics.jsonl
    epochs: int | None = None  # optim.epochs of the run
    embedded: int = 0  # images embedded to rank members (stored: all, or a subset)
    score_samples: int | None = None  # samples the scores were computed on, when a subset
    map2d: list[np.ndarray] | None = None  # PCA coordinates of every level's centroids
    map_variance: tuple[float, float] | None = None  # explained variance ratio of the two components
    matrix: np.ndarray | None = None  # classes x top-level clusters member counts


def default_levels(num_samples: int) -> list[int]:
    """About 25 images per fine cluster and 8 fine clusters per coarse one."""
    fine = int(min(max(num_samples // 25, 4), 1000))
    return [fine, max(2, fine // 8)]


class Groups:
    """The members of every cluster of one assignment, from one stable argsort (a scan of the whole
    assignment per cluster would cost clusters x N)."""

    def __init__(self, assign: np.ndarray, num_clusters: int) -> None:
        self.order = np.argsort(assign, kind="stable")
        self.sizes = np.bincount(assign, minlength=num_clusters)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])

    def __getitem__(self, cid: int) -> np.ndarray:
        """Positions in the assignment, ascending."""
        return self.order[self.starts[cid]:self.starts[cid + 1]]


def _groups(result: Prototypes) -> list[Groups]:
    return [Groups(a.cpu().numpy(), c.shape[0])
            for a, c in zip(result.im2cluster, result.centroids, strict=True)]


def plan_nodes(result: Prototypes, *, top_clusters: int | None, children: int) -> list[tuple[int, list[int]]]:
    """(top-level cluster, its shown children one level finer), largest first; sizes alone decide,
    so the rows to embed are known before any embedding. None `top_clusters`: every one."""
    sizes = [torch.bincount(a, minlength=c.shape[0]) for a, c in zip(result.im2cluster, result.centroids,
                                                                     strict=True)]
    top = sizes[-1].argsort(descending=True, stable=True)[:top_clusters].tolist()
    plan = []
    for cid in top:
        kids: list[int] = []
        if result.num_levels > 1:
            mine = (result.cluster2cluster[-1] == cid).nonzero().squeeze(1)
            ranked = mine[sizes[-2][mine].argsort(descending=True, stable=True)]
            kids = [k for k in ranked.tolist() if sizes[-2][k] > 0][:children]
        plan.append((cid, kids))
    return plan


def _classes(labels: np.ndarray | None, names: list[str], members: np.ndarray) -> list[tuple[str, int]]:
    if labels is None:
        return []
    counts = Counter(labels[members].tolist())
    return [(names[c] if c < len(names) else str(c), n) for c, n in counts.most_common()]


def pick_nodes(result: Prototypes, feats: torch.Tensor, labels: np.ndarray | None, names: list[str], *,
               top_clusters: int | None = None, children: int, images: int,
               rows: np.ndarray | None = None) -> list[Node]:
    """The `top_clusters` largest coarsest-level clusters (None: all), each with its `children`
    largest child prototypes (one level finer); every node with its `images` members nearest to
    its centroid.

    Args:
        feats: unit-norm embeddings in the centroids' space, one per entry of `rows`.
        rows: the dataset index of each row of `feats` (None: row i is sample i); only these
            members can be shown, while sizes and class mixes count every member.
    """
    num_samples = int(result.im2cluster[0].numel())
    rows = np.arange(num_samples) if rows is None else np.asarray(rows)
    full = _groups(result)
    ranked = [Groups(a.cpu().numpy()[rows], c.shape[0]) for a, c in zip(result.im2cluster, result.centroids,
                                                                          strict=True)]
    feats = feats.float().cpu()
    kids_of = [Groups(p.cpu().numpy(), result.centroids[lvl + 1].shape[0])
               for lvl, p in enumerate(result.cluster2cluster)]

    def node(level: int, cid: int) -> Node:
        pos = ranked[level - 1][cid]
        sims = feats[torch.from_numpy(pos)] @ result.centroids[level - 1][cid].float().cpu()
        order = sims.argsort(descending=True, stable=True)[:images].tolist()
        shown = [(int(rows[pos[i]]), float(sims[i])) for i in order]
        finer = []
        if level > 1:
            sub = kids_of[level - 2][cid]
            finer = sorted(((int(k), int(full[level - 2].sizes[k])) for k in sub),
                           key=lambda x: (-x[1], x[0]))
        members = full[level - 1][cid]
        return Node(level, cid, int(members.size), _classes(labels, names, members), shown, finer=finer,
                    candidates=int(pos.size), num_children=len(finer))

    top_level = result.num_levels
    picked = []
    for cid, kids in plan_nodes(result, top_clusters=top_clusters, children=children):
        top = node(top_level, cid)
        top.children = [node(top_level - 1, k) for k in kids]
        picked.append(top)
    return picked


def choose_rows(result: Prototypes, plan: list[tuple[int, list[int]]], *, max_images: int, images: int,
                seed: int = 0) -> np.ndarray:
    """Dataset indices to embed: every sample when there are at most `max_images`, else a uniform
    random subset of `max_images`, topped up so that each shown prototype has min(size, `images`)
    members in it (a small prototype could otherwise show nothing). Sorted, as the tars are."""
    num_samples = int(result.im2cluster[0].numel())
    if num_samples <= max_images:
        return np.arange(num_samples)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(num_samples, dtype=bool)
    chosen[rng.choice(num_samples, max_images, replace=False)] = True
    groups = _groups(result)
    top = result.num_levels
    shown = [(top, cid) for cid, _ in plan] + [(top - 1, k) for _, kids in plan for k in kids]
    for level, cid in shown:
        members = groups[level - 1][cid]
        need = min(members.size, images) - int(chosen[members].sum())
        if need > 0:
            chosen[rng.choice(members[~chosen[members]], need, replace=False)] = True
    return np.flatnonzero(chosen)


def score_assignments(result: Prototypes, labels: np.ndarray, *, limit: int = SCORE_SAMPLES,
                      seed: int = 0) -> tuple[list[dict], int | None]:
    """Per level: clusters, nmi, ami, ari, acc, purity of the assignment against `labels`; on a
    random `limit` samples when there are more (returned as the second value, else None)."""
    n = labels.shape[0]
    subset = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)) if n > limit else None
    rows = []
    for level, assign in enumerate(result.im2cluster, start=1):
        clusters = assign.cpu().numpy()
        y, c = (labels, clusters) if subset is None else (labels[subset], clusters[subset])
        rows.append({"level": level, "clusters": int(result.centroids[level - 1].shape[0]),
                     **clustering_scores(y, c), "purity": purity(y, c)})
    return rows, (limit if subset is not None else None)


def prototype_map(result: Prototypes) -> tuple[list[np.ndarray], tuple[float, float]] | None:
    """2-D PCA coordinates of every level's centroids, fitted on all levels together so that a
    child and its parent share one plane; None when there is no plane to fit."""
    from sklearn.decomposition import PCA

    stacked = np.concatenate([c.float().cpu().numpy() for c in result.centroids]).astype(np.float64)
    if stacked.shape[0] < 3 or stacked.shape[1] < 2:
        return None
    pca = PCA(n_components=2, random_state=0)
    coords = pca.fit_transform(stacked)
    bounds = np.cumsum([0] + [c.shape[0] for c in result.centroids])
    ratio = pca.explained_variance_ratio_
    return [coords[a:b] for a, b in zip(bounds, bounds[1:], strict=False)], (float(ratio[0]), float(ratio[1]))


def class_matrix(labels: np.ndarray, assign: np.ndarray, num_classes: int, num_clusters: int) -> np.ndarray:
    """Member counts, classes x clusters."""
    flat = labels.astype(np.int64) * num_clusters + assign.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_clusters).reshape(num_classes, num_clusters)


def read_thumbnails(shards: str, split: str, wanted: set[int], size: int = THUMB) -> dict[int, Image.Image]:
    """Decode the images of dataset indices `wanted` from the split's tars, shrunk to `size` px.

    The sample key is the 12-digit idx (shard format contract), so members are selected by name
    without decoding anything else.
    """
    found: dict[int, Image.Image] = {}
    if not wanted:
        return found
    tars, _ = load_shards(shards, split)
    for shard in tars:
        with tarfile.open(shard.tar) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if ext not in ("jpg", "png") or not key.isdigit() or int(key) not in wanted:
                    continue
                file = tar.extractfile(member)
                assert file is not None  # shard members are regular files (format contract)
                with Image.open(io.BytesIO(file.read())) as img:
                    thumb = img.convert("RGB")
                thumb.thumbnail((size, size))
                found[int(key)] = thumb
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise ShardFormatError(f"{shards}: {len(missing)} images of split {split!r} not found in its tars "
                               f"(e.g. idx {sorted(missing)[:3]}); check with `hcsc-shards verify`")
    return found


def _log_page_size(result: Prototypes, plan: list[tuple[int, list[int]]], images: int) -> None:
    """Say early how many thumbnails the page will embed: with a thousand top-level clusters the
    defaults make a page of tens of megabytes, which --children and --images shrink."""
    sizes = _sizes(result)
    top = result.num_levels
    count = sum(min(int(sizes[top - 1][cid]), images) + sum(min(int(sizes[top - 2][k]), images) for k in kids)
                for cid, kids in plan)
    if count > PAGE_IMAGES_WARN:
        log.warning("the page will embed %d thumbnails (%d top-level clusters, about %d MB); pass smaller "
                    "--children / --images for a lighter page", count, len(plan), count * 4 // 1000)
    else:
        log.info("the page will embed %d thumbnails for %d top-level clusters", count, len(plan))


def _shown_images(top: list[Node]) -> set[int]:
    return {i for node in top for n in [node, *node.children] for i, _ in n.images}


def _sizes(result: Prototypes) -> list[np.ndarray]:
    return [s.numpy() for s in result.cluster_sizes()]


def _finish(data: ReportData, result: Prototypes) -> ReportData:
    """The parts every source shares: the prototype map and the class x cluster matrix."""
    found = prototype_map(result)
    if found is not None:
        data.map2d, data.map_variance = found
    if data.labels is not None:
        classes = max(len(data.class_names), int(data.labels.max()) + 1)  # ids beyond the names show as ids
        data.matrix = class_matrix(data.labels, result.im2cluster[-1].cpu().numpy(), classes,
                                   result.centroids[-1].shape[0])
    return data


def run_context(checkpoint: str) -> tuple[str | None, list[dict], int | None, str | None]:
    """(config YAML, metrics records, optim.epochs, tag) of the run holding `checkpoint`, where
    it is one of our checkpoints inside a run folder; empty values otherwise."""
    try:
        file = resolve(checkpoint)
    except CheckpointError:
        return None, [], None, None
    run = RunFolder.of_checkpoint(file.parent)
    if run is None:
        return None, [], None, None
    text = run.config.read_text() if run.config.is_file() else None
    epochs = None
    if text:
        from omegaconf import DictConfig, OmegaConf

        try:
            epochs = int(cast(DictConfig, OmegaConf.create(text)).get("optim", {}).get("epochs"))
        except Exception:  # a config the page shows as text can still be unreadable as YAML
            epochs = None
    return text, read_jsonl(run.metrics), epochs, file.parent.name


def build_stored_report(stored: StoredRun, *, shards: str, children: int = 6, images: int = 8,
                        max_images: int = 20000, image_size: int, resize: int, interpolation: str,
                        batch_size: int = 128, workers: int = 4, seed: int = 0) -> ReportData:
    """The report of the prototypes stored with a checkpoint (`evaluate.stored.StoredRun`); one
    process (ranks other than 0 have nothing to do)."""
    from pipeline.reference import eval_transform

    split = stored.config.data.train_split
    info = split_info(shards, split)
    result = stored.prototypes
    names = list(info.class_names)
    labelled = len(names) > 1
    plan = plan_nodes(result, top_clusters=None, children=children)
    _log_page_size(result, plan, images)
    rows = choose_rows(result, plan, max_images=max_images, images=images, seed=seed)
    log.info("embedding %d of %d %s images with the momentum encoder (prototypes of epoch %d)", rows.size,
             info.num_samples, split, stored.prototypes_epoch)
    embed = momentum_embedder(stored, dist.device())
    labels, feats = scan_split(shards, split, info.num_samples, rows, embed=embed,
                               transform=eval_transform(image_size, resize, interpolation), labels=labelled,
                               batch_size=batch_size, workers=workers, device=dist.device())
    top = pick_nodes(result, feats, labels, names, children=children, images=images, rows=rows)
    scores, score_samples = None, None
    if labels is not None:
        scores, score_samples = score_assignments(result, labels, seed=seed)
    records = read_jsonl(stored.run.metrics) if stored.run is not None else []
    data = ReportData(str(stored.file.parent), split, info.num_samples, names, labels, _sizes(result), scores,
                      top, read_thumbnails(shards, split, _shown_images(top)), source="stored",
                      prototypes=result, prototypes_epoch=stored.prototypes_epoch, tag=stored.tag,
                      config_yaml=stored.config_yaml, records=records, epochs=stored.config.optim.epochs,
                      embedded=int(rows.size), score_samples=score_samples)
    return _finish(data, result)


def build_report_data(*, checkpoint: str, shards: str, split: str, num_clusters: list[int] | None,
                      encoder: str | None = None, top_clusters: int | None = None, children: int = 6,
                      images: int = 8, niter: int = 20, nredo: int = 3, seed: int = 0,
                      **loader: Any) -> ReportData | None:
    """``--recluster``: extract, cluster and select on every rank (collective); rank 0 gets the
    data, others None."""
    num_samples = split_info(shards, split).num_samples
    levels = num_clusters or default_levels(num_samples)
    check_levels(levels, num_samples)  # before any feature work
    data, cfg = data_config(shards, **loader), ClusterConfig(niter=niter, nredo=nredo)
    trunk, _ = load_backbone(checkpoint, encoder)
    trunk = trunk.to(dist.device())
    split_feats = split_features(trunk, data, split, seed=seed, normalize=True)
    result = cluster_split(split_feats, levels, cfg)
    feats = gather_by_idx(split_feats.idx, split_feats.feats, split_feats.num_samples)
    labels_t = split_labels(split_feats)
    if not dist.is_main():
        return None
    result = result.to("cpu")
    names = split_feats.class_names
    labels = labels_t.cpu().numpy() if len(names) > 1 else None
    top = pick_nodes(result, feats, labels, names, top_clusters=top_clusters, children=children,
                     images=images)
    config_yaml, records, epochs, tag = run_context(checkpoint)
    out = ReportData(str(checkpoint), split, split_feats.num_samples, names, labels, _sizes(result),
                     score_levels(result, labels) if labels is not None else None, top,
                     read_thumbnails(shards, split, _shown_images(top)), source="recluster",
                     prototypes=result, tag=tag, config_yaml=config_yaml, records=records, epochs=epochs,
                     embedded=split_feats.num_samples)
    return _finish(out, result)


def montage(node: Node, thumbs: dict[int, Image.Image], cell: int = THUMB, pad: int = 4) -> Image.Image:
    """One row per child prototype (or the node itself), its nearest images left to right."""
    rows = [r for r in (node.children or [node]) if r.images] or [node]
    cols = max(1, max(len(r.images) for r in rows))
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, (idx, _) in enumerate(row.images):
            small = thumbs[idx].width < cell  # keep tiny images (28 px) crisp when enlarged
            resample = Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC
            img = thumbs[idx].resize((cell, cell), resample)
            sheet.paste(img, (pad + c * (cell + pad), pad + r * (cell + pad)))
    return sheet


def write_report(data: ReportData, out: str | Path, *, montages: int = 6) -> Path:
    """Write ``index.html`` (self-contained) and a PNG montage for each of the `montages` largest
    top-level clusters into `out`.

    Every file is written atomically, the page last; montages of an earlier report in `out` that
    this one does not have are removed after it, so the folder holds one report's files.
    """
    from evaluate.report_html import render

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for node in [n for n in data.top if n.size][:montages]:
        sheet = montage(node, data.thumbs)
        written.add(atomic_write(out / f"cluster_L{node.level}_{node.cid}.png",
                                 functools.partial(sheet.save, format="PNG")))
    page = write_text_atomic(out / "index.html", render(data))
    for stale in set(out.glob(MONTAGE_GLOB)) - written:
        stale.unlink(missing_ok=True)
    return page
