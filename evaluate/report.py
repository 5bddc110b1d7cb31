"""`hcsc-eval report`: a self-contained HTML page of the learned cluster hierarchy.

The split's L2-normalised trunk features are clustered hierarchically
(`cluster.hierarchy.hierarchical_kmeans`, the training procedure); for the largest top-level
clusters the page shows their child prototypes, each with the member images nearest to its
centroid, plus per-level cluster-size histograms and, where the split has labels, purity and
NMI/AMI/ARI/accuracy. Thumbnails are read straight from the shards and embedded as base64, so the
page is one file; a PNG montage per shown top-level cluster is written beside it.
"""

from __future__ import annotations

import functools
import io
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cluster.features import gather_by_idx, split_features
from cluster.prototypes import Prototypes
from core import dist
from core.config import ClusterConfig
from core.files import atomic_write, write_text_atomic
from evaluate.checkpoints import load_backbone
from evaluate.clustering import check_levels, cluster_split, score_levels, split_labels
from evaluate.data import data_config
from pipeline.plan import load_shards
from shards.format import ShardFormatError, split_info

log = logging.getLogger(__name__)

THUMB = 96  # px, longest side of an embedded thumbnail
MONTAGE_GLOB = "cluster_L*_*.png"  # the montages `write_report` writes


@dataclass
class Node:
    """One cluster shown on the page."""

    level: int  # 1-based, fine to coarse
    cid: int
    size: int
    classes: list[tuple[str, int]] = field(default_factory=list)  # (class name, members), descending
    images: list[tuple[int, float]] = field(default_factory=list)  # (dataset idx, cosine to centroid)
    children: list[Node] = field(default_factory=list)


@dataclass
class ReportData:
    checkpoint: str
    split: str
    num_samples: int
    class_names: list[str]
    labels: np.ndarray | None  # class id per dataset index, None when the split is unlabelled
    sizes: list[np.ndarray]  # members per cluster, per level
    scores: list[dict] | None
    top: list[Node]
    thumbs: dict[int, Image.Image] = field(default_factory=dict)


def default_levels(num_samples: int) -> list[int]:
    """About 25 images per fine cluster and 8 fine clusters per coarse one."""
    fine = int(min(max(num_samples // 25, 4), 1000))
    return [fine, max(2, fine // 8)]


def _classes(labels: np.ndarray | None, names: list[str], members: np.ndarray) -> list[tuple[str, int]]:
    if labels is None:
        return []
    counts = Counter(labels[members].tolist())
    return [(names[c] if c < len(names) else str(c), n) for c, n in counts.most_common()]


def _node(result: Prototypes, feats: torch.Tensor, labels, names, level: int, cid: int,
          per_node: int) -> Node:
    members = (result.im2cluster[level - 1] == cid).nonzero().squeeze(1)
    sims = feats[members] @ result.centroids[level - 1][cid].to(feats)
    order = sims.argsort(descending=True)[:per_node]
    images = [(int(members[i]), float(sims[i])) for i in order]
    return Node(level, cid, int(members.numel()), _classes(labels, names, members.cpu().numpy()), images)


def pick_nodes(result: Prototypes, feats: torch.Tensor, labels: np.ndarray | None, names: list[str], *,
               top_clusters: int, children: int, images: int) -> list[Node]:
    """The `top_clusters` largest coarsest-level clusters, each with its `children` largest child
    prototypes (one level finer) and their `images` members nearest to the child centroid."""
    top_level = len(result.im2cluster)
    sizes = torch.bincount(result.im2cluster[-1], minlength=result.centroids[-1].shape[0])
    picked = []
    for cid in sizes.argsort(descending=True)[:top_clusters].tolist():
        node = _node(result, feats, labels, names, top_level, cid, images)
        if top_level > 1:
            kids = (result.cluster2cluster[-1] == cid).nonzero().squeeze(1)
            kid_sizes = torch.bincount(result.im2cluster[-2], minlength=result.centroids[-2].shape[0])[kids]
            for k in kids[kid_sizes.argsort(descending=True)][:children].tolist():
                child = _node(result, feats, labels, names, top_level - 1, k, images)
                if child.size:
                    node.children.append(child)
        picked.append(node)
    return picked


def read_thumbnails(shards: str, split: str, wanted: set[int], size: int = THUMB) -> dict[int, Image.Image]:
    """Decode the images of dataset indices `wanted` from the split's tars, shrunk to `size` px.

    The sample key is the 12-digit idx (shard format contract), so members are selected by name
    without decoding anything else.
    """
    found: dict[int, Image.Image] = {}
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


def build_report_data(*, checkpoint: str, shards: str, split: str, num_clusters: list[int] | None,
                      encoder: str | None = None, top_clusters: int = 6, children: int = 6, images: int = 8,
                      niter: int = 20, nredo: int = 3, seed: int = 0, **loader: Any) -> ReportData | None:
    """Extract, cluster and select on every rank (collective); rank 0 gets the data, others None."""
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
    names = split_feats.class_names
    labels = labels_t.cpu().numpy() if len(names) > 1 else None
    top = pick_nodes(result, feats, labels, names, top_clusters=top_clusters, children=children,
                     images=images)
    wanted = {i for node in top for n in [node, *node.children] for i, _ in n.images}
    sizes = [torch.bincount(a, minlength=c.shape[0]).cpu().numpy()
             for a, c in zip(result.im2cluster, result.centroids, strict=True)]
    return ReportData(str(checkpoint), split, split_feats.num_samples, names, labels, sizes,
                      score_levels(result, labels) if labels is not None else None, top,
                      read_thumbnails(shards, split, wanted))


def montage(node: Node, thumbs: dict[int, Image.Image], cell: int = THUMB, pad: int = 4) -> Image.Image:
    """One row per child prototype (or the node itself), its nearest images left to right."""
    rows = node.children or [node]
    cols = max(len(r.images) for r in rows)
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, (idx, _) in enumerate(row.images):
            small = thumbs[idx].width < cell  # keep tiny images (28 px) crisp when enlarged
            resample = Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC
            img = thumbs[idx].resize((cell, cell), resample)
            sheet.paste(img, (pad + c * (cell + pad), pad + r * (cell + pad)))
    return sheet


def write_report(data: ReportData, out: str | Path) -> Path:
    """Write ``index.html`` (self-contained) and one PNG montage per top cluster into `out`.

    Every file is written atomically, the page last; montages of an earlier report in `out` that
    this one does not have are removed after it, so the folder holds one report's files.
    """
    from evaluate.report_html import render

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for node in data.top:
        sheet = montage(node, data.thumbs)
        written.add(atomic_write(out / f"cluster_L{node.level}_{node.cid}.png",
                                 functools.partial(sheet.save, format="PNG")))
    page = write_text_atomic(out / "index.html", render(data))
    for stale in set(out.glob(MONTAGE_GLOB)) - written:
        stale.unlink(missing_ok=True)
    return page
