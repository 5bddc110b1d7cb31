"""Inline SVG plots for `hcsc-eval report`: line charts, a histogram, a scatter map.

Why by hand: matplotlib is not a dependency, and each plot is a few paths and rectangles; inline
SVG keeps the report one file that any browser renders without scripts or network access.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

from evaluate.curves import Chart

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]
INK, MUTED, GRID = "#1f2933", "#66788a", "#e4e7eb"
TEXT = f'font-size="11" fill="{MUTED}"'


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _svg(width: float, height: float, label: str, body: str, extra: str = "") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(label)}"{extra}>'
            f'{body}</svg>')


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10000:
        return f"{value / 1000:.0f}k"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.3g}"


def line_chart(chart: Chart, width: int = 520, height: int = 230) -> str:
    """One chart with axes, ticks, a legend and a <title> per series (hover shows its name)."""
    left, right, top, bottom = 50, 12, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in chart.series for x in s.x]
    ys = [y for s in chart.series for y in s.y]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = (0.0 if chart.percent else min(ys)), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - (abs(y_lo) or 1) * 0.1, y_hi + (abs(y_hi) or 1) * 0.1
    y_ticks = [t for t in nice_ticks(y_lo, y_hi) if y_lo - 1e-9 <= t <= y_hi + 1e-9] or [y_lo]
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo - 1e-9 <= t <= x_hi + 1e-9]

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return top + plot_h * (1 - (y - y_lo) / (y_hi - y_lo))

    parts = []
    for t in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                     f'stroke="{GRID}"/><text x="{left - 6}" y="{py(t) + 4:.1f}" {TEXT} '
                     f'text-anchor="end">{_fmt(t)}</text>')
    for t in x_ticks:
        parts.append(f'<text x="{px(t):.1f}" y="{top + plot_h + 15}" {TEXT} text-anchor="middle">'
                     f'{_fmt(t)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
                 f'stroke="#9aa5b1"/><text x="{left + plot_w / 2}" y="{height - 4}" {TEXT} '
                 f'text-anchor="middle">{esc(chart.xlabel)}</text>')
    for s in chart.series:
        stroke = color(s.color)
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f} {py(y):.1f}" for i, (x, y) in
                        enumerate(zip(s.x, s.y, strict=True)))
        dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{stroke}"/>'
                       for x, y in zip(s.x, s.y, strict=True)) if len(s.x) <= 40 else ""
        last = f"{s.y[-1]:.4g}"
        parts.append(f'<g><title>{esc(s.label)} (last {last})</title><path d="{path}" fill="none" '
                     f'stroke="{stroke}" stroke-width="1.7"{dash}/>{dots}</g>')
    legend = "".join(f'<span><i style="background:{color(s.color)}{";opacity:.55" if s.dashed else ""}"></i>'
                     f'{esc(s.label)}{" (dashed)" if s.dashed else ""}</span>' for s in chart.series)
    return _svg(width, height, chart.title, "".join(parts)) + f'<div class="legend">{legend}</div>'


def histogram(values: np.ndarray, *, title: str, bins: int = 24, width: int = 340, height: int = 170) -> str:
    """Histogram of cluster sizes with the axis range and peak labelled."""
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
                    f'width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}" fill="{PALETTE[0]}" rx="1.5">'
                    f'<title>{esc(tip)}</title></rect>')
    axis = (f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
            f'stroke="#9aa5b1"/><text x="{left}" y="{height - 8}" {TEXT}>{edges[0]:.0f}</text>'
            f'<text x="{left + plot_w}" y="{height - 8}" {TEXT} text-anchor="end">{edges[-1]:.0f}</text>'
            f'<text x="{left + plot_w / 2}" y="{height - 8}" {TEXT} text-anchor="middle">images per cluster'
            f'</text><text x="{left - 6}" y="{top + 10}" {TEXT} text-anchor="end">{peak}</text>'
            f'<text x="{left - 6}" y="{top + plot_h}" {TEXT} text-anchor="end">0</text>')
    return _svg(width, height, title, "".join(bars) + axis)


def stacked_bar(parts: list[tuple[str, int, str]], width: int = 420, height: int = 14) -> str:
    """One horizontal bar split into (name, count, colour) parts, a <title> on each."""
    total = sum(n for _, n, _ in parts) or 1
    x, rects = 0.0, []
    for name, n, fill in parts:
        w = width * n / total
        rects.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{fill}">'
                     f'<title>{esc(name)}: {n} ({100 * n / total:.0f}%)</title></rect>')
        x += w
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="100%" height="{height}" viewBox="0 0 {width} '
            f'{height}" preserveAspectRatio="none" style="border-radius:4px">{"".join(rects)}</svg>')


@dataclass
class Point:
    x: float
    y: float
    radius: float
    fill: str
    title: str
    href: str | None = None
    outline: bool = False


def scatter(points: list[Point], edges: list[tuple[int, int]], *, title: str, width: int = 720,
            height: int = 480) -> str:
    """Points in data coordinates scaled to fit (equal scale on both axes, so distances read
    true), with a light line for every (child, parent) pair of `edges` (indices into `points`)."""
    pad = 18
    xs = np.array([p.x for p in points]) if points else np.zeros(1)
    ys = np.array([p.y for p in points]) if points else np.zeros(1)
    span = max(float(xs.max() - xs.min()), float(ys.max() - ys.min()), 1e-9)
    scale = min(width - 2 * pad, height - 2 * pad) / span
    cx, cy = (xs.max() + xs.min()) / 2, (ys.max() + ys.min()) / 2

    def pos(p: Point) -> tuple[float, float]:
        return width / 2 + (p.x - cx) * scale, height / 2 - (p.y - cy) * scale

    lines = []
    for a, b in edges:
        (x1, y1), (x2, y2) = pos(points[a]), pos(points[b])
        lines.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{GRID}"/>')
    dots = []
    for p in sorted(points, key=lambda q: q.radius):  # small (fine) points under large (coarse) ones
        x, y = pos(p)
        ring = f' stroke="{INK}" stroke-width="1.2"' if p.outline else ' stroke="#fff" stroke-width=".6"'
        dot = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{p.radius:.1f}" fill="{p.fill}"{ring} '
               f'fill-opacity=".85"><title>{esc(p.title)}</title></circle>')
        dots.append(f'<a href="{esc(p.href)}">{dot}</a>' if p.href else dot)
    frame = f'<rect x=".5" y=".5" width="{width - 1}" height="{height - 1}" fill="none" stroke="{GRID}"/>'
    return _svg(width, height, title, frame + "".join(lines) + "".join(dots), ' style="max-width:100%"')
