"""HTML for `evaluate.report`: one self-contained page (no external scripts, styles or images).

Plots are inline SVG (`evaluate.svg`); thumbnails are data URIs. The few lines of inline script
open a collapsed cluster section when a link targets it, and record for the browser test how
many images loaded and how many visible SVGs were drawn (``data-*`` attributes on ``<body>``).
Every ``<img>`` also records ``data-loaded`` / ``data-failed`` from its own load events, and
carries ``data-idx`` (its dataset index); each cluster block carries ``data-level`` /
``data-cid`` / ``data-size``, so a test can check the page against the stored assignment.
"""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from evaluate import svg
from evaluate.curves import charts
from evaluate.report import Node, ReportData
from evaluate.svg import PALETTE, esc

OTHER = "#d9d9d9"
OPEN_SECTIONS = 6  # the largest top-level clusters are expanded; the others open from the contents
MATRIX_COLS, MATRIX_ROWS = 80, 60  # beyond these the class x cluster table keeps the largest

CSS = """
:root { --ink:#1f2933; --muted:#66788a; --line:#e4e7eb; --card:#fff; --bg:#f5f7fa; --accent:#4e79a7; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
a { color:var(--accent); }
header { background:#1f2933; color:#fff; padding:28px 40px 22px; }
header h1 { margin:0 0 6px; font-size:24px; font-weight:600; letter-spacing:.2px; }
header .epoch { font-size:16px; color:#fff; margin:4px 0 8px; }
header .meta { color:#cbd2d9; font-size:13px; word-break:break-all; }
nav.sections { background:#fff; border-bottom:1px solid var(--line); padding:10px 40px; font-size:13px; }
nav.sections a { margin-right:16px; text-decoration:none; }
main { max-width:1280px; margin:0 auto; padding:24px 40px 60px; }
h2 { font-size:18px; margin:34px 0 12px; }
.lead { color:var(--muted); margin:0 0 14px; max-width:960px; }
.panel { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 20px; }
pre.config { max-height:480px; overflow:auto; font-size:12px; background:#f8fafc; padding:12px;
             border-radius:6px; }
table.scores { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
table.scores th, table.scores td { padding:7px 12px; text-align:right; border-bottom:1px solid var(--line); }
table.scores th:first-child, table.scores td:first-child { text-align:left; }
table.scores th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; }
dl.glossary { margin:14px 0 0; font-size:13px; }
dl.glossary dt { font-weight:600; margin-top:8px; }
dl.glossary dd { margin:2px 0 0 0; color:#3e4c59; }
.charts { display:grid; grid-template-columns:repeat(auto-fill, minmax(540px, 1fr)); gap:16px; }
.charts figure { margin:0; background:var(--card); border:1px solid var(--line); border-radius:10px;
                 padding:12px 14px; }
.charts figcaption { color:var(--ink); font-weight:600; margin-bottom:6px; font-size:13px; }
.charts p { color:var(--muted); font-size:12px; margin:6px 0 0; }
.hists { display:flex; flex-wrap:wrap; gap:16px; margin-top:14px; }
.hists figure { margin:0; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
.legend { font-size:12px; color:var(--muted); margin-top:3px; }
.legend span { margin-right:12px; white-space:nowrap; display:inline-block; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:4px; }
.matrix-wrap { overflow:auto; max-height:640px; }
table.matrix { border-collapse:collapse; font-size:11px; font-variant-numeric:tabular-nums; }
table.matrix th, table.matrix td { border:1px solid #eef1f4; padding:2px 5px; text-align:right;
                                   min-width:26px; }
table.matrix th { background:#f8fafc; color:var(--muted); font-weight:600; position:sticky; top:0; }
table.matrix th.row { position:sticky; left:0; text-align:left; white-space:nowrap; }
nav.toc { display:flex; flex-wrap:wrap; gap:6px; }
nav.toc a { display:inline-block; padding:3px 9px; border-radius:999px; background:#eef2f7;
            color:#243b53; font-size:12px; text-decoration:none; white-space:nowrap; }
nav.toc a.empty { opacity:.5; }
i.dot { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:6px; }
details.cluster { background:var(--card); border:1px solid var(--line); border-radius:12px; margin:16px 0;
                  box-shadow:0 1px 2px rgba(0,0,0,.04); overflow:hidden; }
details.cluster > summary { padding:14px 20px; display:flex; gap:18px; align-items:center; flex-wrap:wrap;
                            cursor:pointer; list-style:none; }
details.cluster[open] > summary { border-bottom:1px solid var(--line); }
details.cluster > summary::before { content:"\\25B8"; color:var(--muted); }
details.cluster[open] > summary::before { content:"\\25BE"; }
.title { font-size:16px; font-weight:600; }
.badge { display:inline-block; padding:2px 9px; border-radius:999px; background:#eef2f7; color:#334e68;
         font-size:12px; margin-right:6px; }
.mix { flex:1 1 360px; min-width:260px; }
.row { display:flex; gap:16px; padding:12px 20px; border-bottom:1px solid var(--line);
       align-items:flex-start; }
.row:last-child { border-bottom:none; }
.row.own { background:#fbfcfd; }
.row .info { width:190px; flex:none; font-size:12px; color:var(--muted); }
.row .info b { display:block; color:var(--ink); font-size:13px; margin-bottom:2px; }
.grid { display:flex; flex-wrap:wrap; gap:8px; }
.grid figure { margin:0; width:84px; text-align:center; }
.grid img { width:84px; height:84px; object-fit:cover; border-radius:6px; display:block;
            image-rendering:pixelated; border:2px solid transparent; background:#eee; }
.grid img.off { border:2px dashed #c0392b; }
.grid figcaption { font-size:10.5px; white-space:nowrap; overflow:hidden; text-overflow:ellipsis;
                   margin:2px 0 0; }
.none { color:var(--muted); font-size:12px; font-style:italic; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:20px; }
"""

SCRIPT = """<script>
function openTarget(){const id=decodeURIComponent(location.hash.slice(1));
const t=id&&document.getElementById(id);if(t&&t.tagName==='DETAILS'){t.open=true;}}
window.addEventListener('hashchange',openTarget);
window.addEventListener('load',()=>{openTarget();const b=document.body.dataset;const im=[...document.images];
b.images=im.length;b.loaded=im.filter(i=>i.complete&&i.naturalWidth>0).length;
const sv=[...document.querySelectorAll('svg')];b.svgs=sv.length;
const shut=s=>{const d=s.parentElement.closest('details:not([open])'),h=s.closest('summary');
return !!d&&!(h&&h.parentElement===d);};
const vis=sv.filter(s=>!shut(s));b.svgsVisible=vis.length;
b.svgsDrawn=vis.filter(s=>{const r=s.getBoundingClientRect();return r.width>0&&r.height>0;}).length;});
</script>"""

# One sentence per score, shown under the scores table.
GLOSSARY = [
    ("NMI", "normalised mutual information between cluster ids and classes: how much knowing an image's "
     "cluster tells about its class, from 0 (nothing) to 1 (the clusters are the classes, up to naming)."),
    ("AMI", "NMI corrected for chance: 0 for a random assignment with the same cluster sizes, so levels with "
     "many small clusters (which NMI slightly favours) are compared fairly."),
    ("ARI", "adjusted Rand index: agreement over all pairs of images (same cluster vs same class), corrected "
     "for chance; near 0 for a random assignment and 1 for identical partitions."),
    ("Hungarian accuracy", "the share of images whose cluster is matched to their class by the best "
     "one-to-one matching of clusters to classes; each class maps to at most one cluster, so with many more "
     "clusters than classes (M >> C) most images sit in unmatched clusters and the accuracy is low even when "
     "every cluster is pure: read it at levels with about as many clusters as classes."),
    ("Purity", "the share of images whose cluster's majority class is their own class; it grows towards 1 as "
     "clusters get smaller, so read it together with the number of clusters."),
]
CONCENTRATION = ("Concentration φ: each prototype's own temperature, from the mean distance of its members "
                 "to the centroid (docs/method.md §2.4); a small φ is a tight cluster whose logits are "
                 "sharpened. It is rescaled so that its mean is exactly the temperature T at every level; "
                 "only its spread carries information.")


def prose(text: str) -> str:
    """A paragraph written over several source lines, as one line of text."""
    return " ".join(text.split())


def data_uri(img: Image.Image) -> str:
    """PNG for tiny images (lossless and smaller there), JPEG for photographs."""
    buf = io.BytesIO()
    if max(img.size) <= 32:
        img.save(buf, "PNG", optimize=True)
        kind = "png"
    else:
        img.save(buf, "JPEG", quality=85)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def class_colors(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def svg_mix(classes: list[tuple[str, int]], colors: dict[str, str], shown: int = 5) -> str:
    """Stacked bar of a cluster's class composition, the `shown` largest classes plus "other"."""
    total = sum(n for _, n in classes) or 1
    rest = sum(n for _, n in classes[shown:])
    parts = classes[:shown] + ([("other", rest)] if rest else [])
    bar = svg.stacked_bar([(name, n, OTHER if name == "other" else colors.get(name, OTHER))
                           for name, n in parts])
    legend = "".join(f'<span><i style="background:{OTHER if n == "other" else colors.get(n, OTHER)}"></i>'
                     f'{esc(n)} {100 * c / total:.0f}%</span>' for n, c in parts)
    return f'{bar}<div class="legend">{legend}</div>'


def anchor(level: int, cid: int) -> str:
    return f"L{level}-c{cid}"


def _majority(node: Node) -> str:
    if not node.classes:
        return ""
    name, n = node.classes[0]
    return f"{esc(name)} {100 * n / max(node.size, 1):.0f}%"


def _grid(node: Node, data: ReportData) -> str:
    if not node.images:
        return '<div class="none">no member among the embedded images</div>' if node.size else \
            '<div class="none">empty: no member in the assignment</div>'
    majority = node.classes[0][0] if node.classes else None
    cells = []
    for idx, sim in node.images:
        label = "" if data.labels is None else data.class_names[int(data.labels[idx])]
        off = ' class="off"' if majority is not None and label != majority else ""
        tip = f"image {idx}" + (f" · {label}" if label else "") + f" · cosine {sim:.3f}"
        cells.append(f'<figure><img{off} src="{data_uri(data.thumbs[idx])}" data-idx="{idx}" '
                     f'alt="{esc(tip)}" title="{esc(tip)}" loading="eager" '
                     'onload="this.dataset.loaded=this.naturalWidth" onerror="this.dataset.failed=1">'
                     f'<figcaption>{esc(label) if label else f"#{idx}"}</figcaption></figure>')
    return f'<div class="grid">{"".join(cells)}</div>'


def _row(node: Node, data: ReportData, *, own: bool) -> str:
    what = "This cluster's own prototype" if own else f"Prototype {node.cid}"
    info = f"<b>{what}</b>level {node.level} · {node.size} images"
    if node.classes:
        info += f"<br>majority: {_majority(node)}"
    if node.candidates < node.size:
        info += f"<br>nearest among {node.candidates} embedded members"
    if not own and node.finer:
        finer = ", ".join(f"{cid} ({n})" for cid, n in node.finer[:12])
        more = f" and {len(node.finer) - 12} more" if len(node.finer) > 12 else ""
        info += f"<br>level-{node.level - 1} prototypes: {finer}{more}"
    return (f'<div class="row{" own" if own else ""}" data-level="{node.level}" data-cid="{node.cid}" '
            f'data-size="{node.size}"><div class="info">{info}</div>{_grid(node, data)}</div>')


def _dot(cid: int) -> str:
    """The colour a top-level cluster and its descendants have on the prototype map."""
    return f'<i class="dot" style="background:{svg.color(cid)}"></i>'


def _cluster(node: Node, data: ReportData, colors: dict[str, str], *, opened: bool) -> str:
    mix = f'<div class="mix">{svg_mix(node.classes, colors)}</div>' if node.classes else ""
    kids = ""
    if data.prototypes is not None and data.prototypes.num_levels > 1:
        shown = f"{len(node.children)} of {node.num_children} child prototypes shown"
        kids = f'<span class="badge">{shown}</span>'
    head = (f'<summary><div><div class="title">{_dot(node.cid)}Level {node.level} · cluster {node.cid}</div>'
            f'<span class="badge">{node.size} images</span>{kids}</div>{mix}</summary>')
    rows = [_row(node, data, own=True)] + [_row(child, data, own=False) for child in node.children]
    return (f'<details class="cluster" id="{anchor(node.level, node.cid)}" data-level="{node.level}" '
            f'data-cid="{node.cid}" data-size="{node.size}"{" open" if opened else ""}>{head}'
            f'{"".join(rows)}</details>')


def _toc(data: ReportData) -> str:
    links = []
    for node in data.top:
        majority = node.classes[0][0] if node.classes else None
        tip = f"{node.size} images" + (f", majority {majority}" if majority else "")
        cls = ' class="empty"' if not node.size else ""
        links.append(f'<a href="#{anchor(node.level, node.cid)}"{cls} title="{esc(tip)}">{_dot(node.cid)}'
                     f'#{node.cid} · {node.size}{" · " + esc(majority) if majority else ""}</a>')
    return f'<nav class="toc" aria-label="top-level clusters">{"".join(links)}</nav>'


def _scores(data: ReportData) -> str:
    if not data.scores:
        return '<p class="lead">The split has no labels: purity and agreement scores are not shown.</p>'
    names = ("Level", "Clusters", "Purity", "NMI", "AMI", "ARI", "Hungarian acc")
    head = "".join(f"<th>{h}</th>" for h in names)
    body = "".join(f'<tr><td>{r["level"]}</td><td>{r["clusters"]}</td><td>{r["purity"]:.3f}</td>'
                   f'<td>{r["nmi"]:.3f}</td><td>{r["ami"]:.3f}</td><td>{r["ari"]:.3f}</td>'
                   f'<td>{r["acc"]:.3f}</td></tr>' for r in data.scores)
    subset = ""
    if data.score_samples:
        subset = (f'<p class="lead">Computed on a random {data.score_samples} of the {data.num_samples} '
                  "images (the AMI's chance term grows with images x clusters).</p>")
    gloss = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in GLOSSARY)
    return (f'<div class="panel"><table class="scores"><tr>{head}</tr>{body}</table>{subset}'
            f'<dl class="glossary">{gloss}</dl></div>')


def _levels(data: ReportData) -> str:
    density = data.prototypes.density if data.source == "stored" and data.prototypes is not None else []
    cols = ["Level", "Clusters", "Empty", "Median size", "Largest", "Smallest non-empty"]
    if density:
        cols += ["φ mean", "φ min", "φ max"]
    rows = []
    for i, s in enumerate(data.sizes):
        nonzero = s[s > 0]
        cells = [i + 1, len(s), int((s == 0).sum()), int(np.median(s)), int(s.max()),
                 int(nonzero.min()) if nonzero.size else 0]
        text = [str(c) for c in cells]
        if density and i < len(density) and density[i].numel():
            d = density[i].float()
            text += [f"{float(d.mean()):.3f}", f"{float(d.min()):.3f}", f"{float(d.max()):.3f}"]
        rows.append("<tr>" + "".join(f"<td>{t}</td>" for t in text) + "</tr>")
    hists = "".join(f'<figure>{svg.histogram(s, title=f"level {i} cluster sizes")}<figcaption>Level {i}: '
                    f'{len(s)} clusters, median {int(np.median(s))} images, largest {int(s.max())}, '
                    f'{int((s == 0).sum())} empty</figcaption></figure>'
                    for i, s in enumerate(data.sizes, start=1))
    note = f'<p class="lead">{esc(CONCENTRATION)}</p>' if density else ""
    head = "".join(f"<th>{c}</th>" for c in cols)
    return (f'<div class="panel"><table class="scores"><tr>{head}</tr>{"".join(rows)}</table>{note}'
            f'<div class="hists">{hists}</div></div>')


def _matrix(data: ReportData) -> str:
    if data.matrix is None or data.prototypes is None:
        return '<p class="lead">The split has no labels: no class x cluster matrix.</p>'
    counts = data.matrix
    level = data.prototypes.num_levels
    sizes, class_sizes = counts.sum(axis=0), counts.sum(axis=1)
    cols = [int(c) for c in np.argsort(-sizes, kind="stable")[:MATRIX_COLS] if sizes[c] > 0]
    # clusters grouped by their majority class, so a good clustering reads as a block diagonal
    cols.sort(key=lambda c: (int(counts[:, c].argmax()), -int(sizes[c])))
    order = list(dict.fromkeys([int(counts[:, c].argmax()) for c in cols] +
                               [int(r) for r in np.argsort(-class_sizes, kind="stable")]))
    rows = [r for r in order if class_sizes[r] > 0][:MATRIX_ROWS]
    head = "".join(f'<th><a href="#{anchor(level, c)}">{c}</a></th>' for c in cols)
    body = []
    for r in rows:
        name = data.class_names[r] if r < len(data.class_names) else str(r)
        cells = []
        for c in cols:
            n = int(counts[r, c])
            share = n / max(int(sizes[c]), 1)
            tip = (f"{name} in cluster {c}: {n} images, {100 * share:.0f}% of the cluster, "
                   f"{100 * n / max(int(class_sizes[r]), 1):.0f}% of the class")
            ink = "#fff" if share > .55 else "inherit"
            cells.append(f'<td style="background:rgba(78,121,167,{share:.2f});color:{ink}" '
                         f'title="{esc(tip)}">{n or ""}</td>')
        body.append(f'<tr><th class="row">{esc(name)}</th>{"".join(cells)}</tr>')
    cut = ""
    clusters, classes = int((sizes > 0).sum()), int((class_sizes > 0).sum())
    if len(cols) < clusters or len(rows) < classes:
        cut = (f'<p class="lead">Shown: the {len(cols)} largest of {clusters} non-empty clusters and '
               f'{len(rows)} of {classes} classes.</p>')
    return (f'<div class="panel">{cut}<div class="matrix-wrap"><table class="matrix"><tr><th class="row">'
            f'class \\ cluster</th>{head}</tr>{"".join(body)}</table></div></div>')


def _map(data: ReportData) -> str:
    protos = data.prototypes
    if data.map2d is None or protos is None:
        return '<p class="lead">Too few prototypes for a 2-D map.</p>'
    top = protos.num_levels
    # the top-level ancestor of every prototype of every level, for its colour
    ancestor = [np.arange(protos.centroids[-1].shape[0])]
    for lvl in range(top - 2, -1, -1):
        ancestor.insert(0, ancestor[0][protos.cluster2cluster[lvl].cpu().numpy()])
    offsets = np.cumsum([0] + [c.shape[0] for c in protos.centroids])
    points, edges = [], []
    for lvl, coords in enumerate(data.map2d):
        for cid, (x, y) in enumerate(coords):
            size = int(data.sizes[lvl][cid])
            anc = int(ancestor[lvl][cid])
            title = f"level {lvl + 1} prototype {cid}: {size} images, top-level cluster {anc}"
            points.append(svg.Point(float(x), float(y), 2.5 + 2.2 * lvl, svg.color(anc), title,
                                    href=f"#{anchor(top, anc)}", outline=lvl == top - 1))
            if lvl < top - 1:
                parent = int(protos.cluster2cluster[lvl][cid])
                edges.append((int(offsets[lvl] + cid), int(offsets[lvl + 1] + parent)))
    var = data.map_variance or (0.0, 0.0)
    lead = prose(f"""The centroids of all {top} levels projected on their first two principal components
        (PCA fitted on all levels together; they explain {100 * var[0]:.0f}% and {100 * var[1]:.0f}% of the
        variance). Larger dots are coarser levels, the top level outlined; a dot's colour is its top-level
        ancestor (the dot beside each cluster's title) and a grey line joins each prototype to its parent.
        Click a dot to open its top-level cluster.""")
    plot = svg.scatter(points, edges, title="prototype map")
    return f'<p class="lead">{esc(lead)}</p><div class="panel">{plot}</div>'


def _curves(data: ReportData) -> str:
    found = charts(data.records, epochs=data.epochs)
    if not found:
        return ('<p class="lead">No training records: the checkpoint is not inside a run folder, or its '
                "metrics.jsonl is missing or holds no step records yet.</p>")
    figures = "".join(f"<figure><figcaption>{esc(c.title)}</figcaption>{svg.line_chart(c)}"
                      f"<p>{esc(c.note)}</p></figure>" for c in found)
    final = next((r for r in reversed(data.records) if r.get("kind") == "final"), None)
    table = ""
    keys = [k for k, v in (final or {}).items()
            if k not in ("kind", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if final and keys:
        table = ('<div class="panel" style="margin-top:16px"><b>Final evaluation</b> (validation split; '
                 "val_* scores a flat k-means into as many clusters as classes)<table class='scores'><tr>"
                 + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr><tr>"
                 + "".join(f"<td>{float(final[k]):.4g}</td>" for k in keys) + "</tr></table></div>")
    return f'<div class="charts">{figures}</div>{table}'


def _config(data: ReportData) -> str:
    if not data.config_yaml:
        return '<p class="lead">No run config: the checkpoint is not one of our run folders.</p>'
    return (f'<details class="panel"><summary>config.yaml (click to expand)</summary>'
            f'<pre class="config">{esc(data.config_yaml)}</pre></details>')


def _header(data: ReportData) -> tuple[str, str]:
    """(the line naming where the hierarchy comes from, the meta line)."""
    levels = " → ".join(str(len(s)) for s in data.sizes)
    if data.source == "stored":
        epoch = f"Prototypes of epoch {data.prototypes_epoch}, computed at its start"
        where = (f"stored with checkpoint {esc(data.tag)} · training split <b>{esc(data.split)}</b> · "
                 f"{data.num_samples} images")
    else:
        epoch = f"Re-clustering of the {esc(data.split)} split's trunk features"
        where = f"split <b>{esc(data.split)}</b> · {data.num_samples} images"
    return epoch, f"{esc(data.checkpoint)} · {where} · levels (fine → coarse) {levels}"


def _clusters_lead(data: ReportData) -> str:
    top = data.prototypes.num_levels if data.prototypes is not None else len(data.sizes)
    if data.source == "stored":
        subset = (f"all {data.embedded} training images" if data.embedded >= data.num_samples else
                  f"""a random {data.embedded} of the {data.num_samples} training images (--max-images),
                  topped up so that every shown prototype has candidates""")
        how = f"""Members are those of the stored assignment (im2cluster). The images shown for a prototype
            are the members whose embedding by the checkpoint's momentum encoder with its head (the space the
            centroids live in, docs/method.md §2.2) has the largest cosine to its centroid, ranked among
            {subset}. The encoder has trained on since the clustering, so a member may now sit a little
            closer to another prototype."""
    else:
        how = """Members and centroids come from the hierarchical k-means of the split's L2-normalised trunk
            features; the images shown for a prototype are its members with the largest cosine to its
            centroid."""
    return prose(f"""Every one of the {len(data.top)} top-level (level {top}) clusters, largest first: the
        contents below link to each. In a cluster, the first row is its own prototype, the others its largest
        child prototypes one level finer. {how} A dashed red outline marks an image whose class differs from
        the prototype's majority class; hover an image for its index, class and cosine.""")


def render(data: ReportData) -> str:
    """The whole page."""
    colors = class_colors(data.class_names)
    epoch, meta = _header(data)
    clusters = "".join(_cluster(n, data, colors, opened=i < OPEN_SECTIONS) for i, n in enumerate(data.top))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in (
        ("run", "Run config"), ("curves", "Training curves"), ("scores", "Scores"), ("levels", "Levels"),
        ("matrix", "Classes x clusters"), ("map", "Prototype map"), ("clusters", "Top-level clusters")))
    scores_lead = prose(f"""Each level's assignment of the {data.num_samples} {esc(data.split)} images scored
        against their classes.""")
    matrix_lead = prose("""Images of each class (row) in each top-level cluster (column); a cell's shade is
        the class's share of the cluster, and the columns are grouped by majority class. Click a cluster id to
        open it.""")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>HCSC cluster hierarchy · {esc(data.tag or data.split)}</title><style>{CSS}</style></head>
<body><header><h1>Learned cluster hierarchy</h1><div class="epoch">{epoch}</div>
<div class="meta">{meta}</div></header>
<nav class="sections">{nav}</nav><main>
<h2 id="run">Run config</h2>{_config(data)}
<h2 id="curves">Training curves</h2>{_curves(data)}
<h2 id="scores">How well the clusters match the labels</h2>
<p class="lead">{scores_lead}</p>
{_scores(data)}
<h2 id="levels">Levels</h2>{_levels(data)}
<h2 id="matrix">Classes x top-level clusters</h2>
<p class="lead">{matrix_lead}</p>
{_matrix(data)}
<h2 id="map">Prototype map</h2>{_map(data)}
<h2 id="clusters">Top-level clusters and their child prototypes</h2>
<p class="lead">{esc(_clusters_lead(data))}</p>
{_toc(data)}
{clusters}
</main><footer>hcsc-eval report · generated {stamp}</footer>{SCRIPT}</body></html>
"""
