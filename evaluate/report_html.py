"""HTML for `evaluate.report`: one self-contained page, plots as inline SVG written here.

Why by hand: matplotlib is not a dependency, and the plots needed (a histogram, a stacked bar)
are a few rectangles each; inline SVG keeps the page one file that any browser renders.
Every ``<img>`` records ``data-loaded`` / ``data-failed`` from its load events, which the browser
test reads back from the DOM.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from evaluate.report import Node, ReportData

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]
OTHER = "#d9d9d9"

CSS = """
:root { --ink:#1f2933; --muted:#66788a; --line:#e4e7eb; --card:#fff; --bg:#f5f7fa; --accent:#4e79a7; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#1f2933; color:#fff; padding:28px 40px 22px; }
header h1 { margin:0 0 6px; font-size:24px; font-weight:600; letter-spacing:.2px; }
header .meta { color:#cbd2d9; font-size:13px; word-break:break-all; }
main { max-width:1280px; margin:0 auto; padding:24px 40px 60px; }
h2 { font-size:18px; margin:32px 0 12px; }
.lead { color:var(--muted); margin:0 0 14px; max-width:900px; }
.panel { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 20px; }
table.scores { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
table.scores th, table.scores td { padding:7px 12px; text-align:right; border-bottom:1px solid var(--line); }
table.scores th:first-child, table.scores td:first-child { text-align:left; }
table.scores th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; }
.hists { display:flex; flex-wrap:wrap; gap:16px; }
.hists figure { margin:0; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
.cluster { background:var(--card); border:1px solid var(--line); border-radius:12px; margin:20px 0;
           box-shadow:0 1px 2px rgba(0,0,0,.04); overflow:hidden; }
.cluster > .head { padding:14px 20px; border-bottom:1px solid var(--line); display:flex; gap:18px;
                   align-items:center; flex-wrap:wrap; }
.cluster .title { font-size:16px; font-weight:600; }
.badge { display:inline-block; padding:2px 9px; border-radius:999px; background:#eef2f7; color:#334e68;
         font-size:12px; margin-right:6px; }
.mix { flex:1 1 360px; min-width:260px; }
.legend { font-size:12px; color:var(--muted); margin-top:3px; }
.legend span { margin-right:12px; white-space:nowrap; }
.legend i { display:inline-block; width:9px; height:9px; border-radius:2px; margin-right:4px; }
.child { display:flex; gap:16px; padding:12px 20px; border-bottom:1px solid var(--line);
         align-items:flex-start; }
.child:last-child { border-bottom:none; }
.child .info { width:170px; flex:none; font-size:12px; color:var(--muted); }
.child .info b { display:block; color:var(--ink); font-size:13px; margin-bottom:2px; }
.grid { display:flex; flex-wrap:wrap; gap:8px; }
.grid figure { margin:0; width:84px; text-align:center; }
.grid img { width:84px; height:84px; object-fit:cover; border-radius:6px; display:block;
            image-rendering:pixelated; border:2px solid transparent; background:#eee; }
.grid img.off { border:2px dashed #c0392b; }
.grid figcaption { font-size:10.5px; white-space:nowrap; overflow:hidden; text-overflow:ellipsis;
                   margin:2px 0 0; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:20px; }
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def svg_histogram(values: np.ndarray, *, title: str, bins: int = 24, width: int = 360,
                  height: int = 170) -> str:
    """Histogram of cluster sizes as an inline SVG with axes labels."""
    values = np.asarray(values)
    counts, edges = np.histogram(values, bins=min(bins, max(1, int(values.max() - values.min()) + 1)))
    left, bottom, top = 40, 28, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max(int(counts.max()), 1)
    bar_w = plot_w / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = plot_h * c / peak
        tip = f"{int(c)} clusters with {edges[i]:.0f}-{edges[i + 1]:.0f} images"
        bars.append(f'<rect x="{left + i * bar_w + 1:.1f}" y="{top + plot_h - h:.1f}" '
                    f'width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}" fill="#4e79a7" rx="1.5">'
                    f'<title>{esc(tip)}</title></rect>')
    text = 'font-size="11" fill="#66788a"'
    axis = (f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
            f'stroke="#9aa5b1"/><text x="{left}" y="{height - 8}" {text}>{edges[0]:.0f}</text>'
            f'<text x="{left + plot_w}" y="{height - 8}" {text} text-anchor="end">{edges[-1]:.0f}</text>'
            f'<text x="{left + plot_w / 2}" y="{height - 8}" {text} text-anchor="middle">images per cluster'
            f'</text><text x="{left - 6}" y="{top + 10}" {text} text-anchor="end">{peak}</text>'
            f'<text x="{left - 6}" y="{top + plot_h}" {text} text-anchor="end">0</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{esc(title)}">{"".join(bars)}{axis}</svg>')


def class_colors(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def svg_mix(classes: list[tuple[str, int]], colors: dict[str, str], width: int = 420, height: int = 14,
            shown: int = 5) -> str:
    """Stacked bar of a cluster's class composition, the `shown` largest classes plus "other"."""
    total = sum(n for _, n in classes) or 1
    rest = sum(n for _, n in classes[shown:])
    parts = classes[:shown] + ([("other", rest)] if rest else [])
    x, rects = 0.0, []
    for name, n in parts:
        w = width * n / total
        color = OTHER if name == "other" else colors.get(name, OTHER)
        rects.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{color}">'
                     f'<title>{esc(name)}: {n} ({100 * n / total:.0f}%)</title></rect>')
        x += w
    legend = "".join(f'<span><i style="background:{OTHER if n == "other" else colors.get(n, OTHER)}"></i>'
                     f'{esc(n)} {100 * c / total:.0f}%</span>' for n, c in parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="100%" height="{height}" viewBox="0 0 {width} '
            f'{height}" preserveAspectRatio="none" style="border-radius:4px">{"".join(rects)}</svg>'
            f'<div class="legend">{legend}</div>')


def _majority(node: Node) -> str:
    if not node.classes:
        return ""
    name, n = node.classes[0]
    return f"{esc(name)} {100 * n / max(node.size, 1):.0f}%"


def _grid(node: Node, data: ReportData) -> str:
    majority = node.classes[0][0] if node.classes else None
    cells = []
    for idx, sim in node.images:
        label = "" if data.labels is None else data.class_names[int(data.labels[idx])]
        off = ' class="off"' if majority is not None and label != majority else ""
        tip = f"image {idx}" + (f" · {label}" if label else "") + f" · cosine {sim:.3f}"
        cells.append(f'<figure><img{off} src="{data_uri(data.thumbs[idx])}" alt="{esc(tip)}" '
                     f'title="{esc(tip)}" loading="eager" onload="this.dataset.loaded=this.naturalWidth" '
                     'onerror="this.dataset.failed=1">'
                     f'<figcaption>{esc(label) if label else f"#{idx}"}</figcaption></figure>')
    return f'<div class="grid">{"".join(cells)}</div>'


def _cluster(node: Node, data: ReportData, colors: dict[str, str]) -> str:
    mix = f'<div class="mix">{svg_mix(node.classes, colors)}</div>' if node.classes else ""
    head = (f'<div class="head"><div><div class="title">Level {node.level} · cluster {node.cid}</div>'
            f'<span class="badge">{node.size} images</span>'
            f'<span class="badge">{len(node.children)} child prototypes shown</span></div>{mix}</div>')
    rows = []
    for child in node.children or [node]:
        info = (f'<b>Prototype {child.cid}</b>level {child.level} · {child.size} images'
                + (f"<br>majority: {_majority(child)}" if child.classes else ""))
        rows.append(f'<div class="child"><div class="info">{info}</div>{_grid(child, data)}</div>')
    return f'<section class="cluster">{head}{"".join(rows)}</section>'


def _scores(data: ReportData) -> str:
    if not data.scores:
        return '<p class="lead">The split has no labels: purity and agreement scores are not shown.</p>'
    names = ("Level", "Clusters", "Purity", "NMI", "AMI", "ARI", "Hungarian acc")
    head = "".join(f"<th>{h}</th>" for h in names)
    body = "".join(f'<tr><td>{r["level"]}</td><td>{r["clusters"]}</td><td>{r["purity"]:.3f}</td>'
                   f'<td>{r["nmi"]:.3f}</td><td>{r["ami"]:.3f}</td><td>{r["ari"]:.3f}</td>'
                   f'<td>{r["acc"]:.3f}</td></tr>' for r in data.scores)
    return f'<div class="panel"><table class="scores"><tr>{head}</tr>{body}</table></div>'


def render(data: ReportData) -> str:
    """The whole page."""
    colors = class_colors(data.class_names)
    levels = " → ".join(str(len(s)) for s in data.sizes)
    hists = "".join(f'<figure>{svg_histogram(s, title=f"level {i} cluster sizes")}<figcaption>Level {i}: '
                    f'{len(s)} clusters, median {int(np.median(s))} images, largest {int(s.max())}, '
                    f'{int((s == 0).sum())} empty</figcaption></figure>'
                    for i, s in enumerate(data.sizes, start=1))
    clusters = "".join(_cluster(n, data, colors) for n in data.top)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    script = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
              "document.body.dataset.images=im.length;"
              "document.body.dataset.loaded=im.filter(i=>i.complete&&i.naturalWidth>0).length;});</script>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>HCSC cluster hierarchy · {esc(data.split)}</title><style>{CSS}</style></head>
<body><header><h1>Learned cluster hierarchy</h1>
<div class="meta">{esc(data.checkpoint)} · split <b>{esc(data.split)}</b> · {data.num_samples} images ·
levels (fine → coarse) {levels}</div></header><main>
<h2>How well clusters match the labels</h2>
<p class="lead">Trunk features (L2-normalised) clustered with the training procedure's hierarchical
k-means; each level clusters the centroids of the level below. Purity: share of images in their
cluster's majority class.</p>
{_scores(data)}
<h2>Cluster sizes</h2><div class="panel hists">{hists}</div>
<h2>Top-level clusters and their child prototypes</h2>
<p class="lead">The {len(data.top)} largest top-level clusters. Each row is one child prototype with
the member images closest to its centroid (cosine similarity); a dashed red outline marks an image whose
class differs from the prototype's majority class. Hover an image for its index, class and similarity.</p>
{clusters}
</main><footer>hcsc-eval report · generated {stamp}</footer>{script}</body></html>
"""
