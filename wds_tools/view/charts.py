"""Inline SVG charts for the viewer: histograms, bar charts and line plots, no plotting library.

Every function returns one ``<svg>`` element as a string; every label is HTML-escaped here, so a
caller may pass strings that came from the data. Bars carry a ``<title>`` (the browser shows it
as a tooltip) with the exact numbers.
"""

from __future__ import annotations

import math
from html import escape
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["histogram", "bars", "lines", "PALETTE", "nice_bins"]

PALETTE = ("#3b6fd8", "#e07b24", "#2e9e5b", "#c8413a", "#8a5cc2", "#8c6d4f", "#d65fb0", "#6b7a8f")
_W, _H = 520, 220
_L, _R, _T, _B = 56, 12, 28, 40  # margins: left axis labels, title on top, x labels below


def _e(x: object) -> str:
    return escape(str(x), quote=True)


def _fmt(v: float) -> str:
    """Short axis label: 1200 -> 1.2k, 0.25 -> 0.25."""
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a == int(a):
        return f"{int(v)}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    """About ``n`` round tick values covering ``[lo, hi]``."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def nice_bins(values: np.ndarray, max_bins: int = 40) -> np.ndarray:
    """Bin edges for a histogram: integer-aligned widths for integer data, at most ``max_bins``."""
    lo, hi = float(values.min()), float(values.max())
    if np.issubdtype(values.dtype, np.integer):
        width = max(1, math.ceil((hi - lo + 1) / max_bins))
        return np.arange(lo, hi + width + 1, width, dtype=np.float64)[: max_bins + 1]
    if hi == lo:
        return np.array([lo - 0.5, hi + 0.5])
    return np.linspace(lo, hi, max_bins + 1)


def _frame(
    title: str,
    body: List[str],
    x_label: str,
    y_label: str,
    w: int = _W,
    h: int = _H,
    plot_h: Optional[int] = None,
) -> str:
    plot_h = plot_h or h
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{_e(title)}">'
        f'<text x="{_L}" y="16" class="ct">{_e(title)}</text>'
        + "".join(body)
        + f'<text x="{(_L + w - _R) / 2:.0f}" y="{plot_h - 6}" text-anchor="middle" '
        f'class="cl">'
        f"{_e(x_label)}</text>" + f'<text transform="translate(12,{(_T + plot_h - _B) / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle" class="cl">{_e(y_label)}</text></svg>'
    )


def _y_axis(ymax: float, w: int, h: int, pct: bool = False) -> Tuple[List[str], float]:
    """Grid lines and labels of a y axis from 0 to about ``ymax``; returns (parts, scale top)."""
    ticks = _ticks(0, ymax, 4) if ymax > 0 else [0.0]
    top = max(ymax, ticks[-1]) or 1.0
    out = []
    for t in ticks:
        y = h - _B - (h - _T - _B) * t / top
        out.append(
            f'<line x1="{_L}" x2="{w - _R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{_L - 6}" y="{y + 4:.1f}" text-anchor="end" class="tk">'
            f"{_e(f'{t:.0%}' if pct else _fmt(t))}</text>"
        )
    return out, top


def histogram(
    values: Union[Sequence[float], np.ndarray],
    title: str,
    x_label: str,
    y_label: str = "samples",
    max_bins: int = 40,
    color: str = PALETTE[0],
) -> str:
    """Histogram of ``values`` as an SVG (an empty frame saying "no data" when empty)."""
    v = np.asarray(values)
    w, h = _W, _H
    if v.size == 0:
        return _frame(
            title,
            [f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" class="cl">no data</text>'],
            x_label,
            y_label,
        )
    edges = nice_bins(v, max_bins)
    counts, edges = np.histogram(v, bins=edges)
    parts, top = _y_axis(float(counts.max()), w, h)
    x0, x1 = float(edges[0]), float(edges[-1])
    sx = (w - _L - _R) / ((x1 - x0) or 1.0)
    integer = np.issubdtype(v.dtype, np.integer)
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if not c:
            continue
        bh = (h - _T - _B) * c / top
        hi_label = _fmt(b - 1) if integer else _fmt(b)
        rng = _fmt(a) if integer and b - a == 1 else f"{_fmt(a)}-{hi_label}"
        parts.append(
            f'<rect x="{_L + (a - x0) * sx + 0.5:.1f}" y="{h - _B - bh:.1f}" '
            f'width="{max((b - a) * sx - 1, 1):.1f}" height="{bh:.1f}" fill="{color}">'
            f"<title>{_e(rng)}: {int(c):,}</title></rect>"
        )
    for t in _ticks(x0, x1, 6):
        x = _L + (t - x0) * sx
        parts.append(
            f'<text x="{x:.1f}" y="{h - _B + 14}" text-anchor="middle" class="tk">{_e(_fmt(t))}</text>'
        )
    parts.append(f'<line x1="{_L}" x2="{w - _R}" y1="{h - _B}" y2="{h - _B}" class="axis"/>')
    return _frame(title, parts, x_label, y_label)


def bars(
    labels: Sequence[str],
    counts: Sequence[int],
    title: str,
    x_label: str,
    y_label: str = "count",
    color: str = PALETTE[1],
) -> str:
    """One bar per category, its count written above it."""
    w, h = _W, _H
    if not labels:
        return _frame(
            title,
            [f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" class="cl">no data</text>'],
            x_label,
            y_label,
        )
    parts, top = _y_axis(float(max(counts)), w, h)
    slot = (w - _L - _R) / len(labels)
    bw = max(min(slot * 0.7, 60), 2)
    step = max(1, math.ceil(len(labels) / 16))  # at most ~16 x labels
    for k, (lab, c) in enumerate(zip(labels, counts)):
        x = _L + slot * k + (slot - bw) / 2
        bh = (h - _T - _B) * c / top
        parts.append(
            f'<rect x="{x:.1f}" y="{h - _B - bh:.1f}" width="{bw:.1f}" '
            f'height="{bh:.1f}" fill="{color}"><title>{_e(lab)}: {int(c):,}</title>'
            "</rect>"
        )
        if len(labels) <= 16:
            parts.append(
                f'<text x="{x + bw / 2:.1f}" y="{h - _B - bh - 3:.1f}" '
                f'text-anchor="middle" class="tk">{_e(_fmt(c))}</text>'
            )
        if k % step == 0:
            parts.append(
                f'<text x="{x + bw / 2:.1f}" y="{h - _B + 14}" text-anchor="middle" '
                f'class="tk">{_e(lab)}</text>'
            )
    parts.append(f'<line x1="{_L}" x2="{w - _R}" y1="{h - _B}" y2="{h - _B}" class="axis"/>')
    return _frame(title, parts, x_label, y_label)


def lines(
    x: Sequence[float],
    series: Sequence[Tuple[str, Sequence[float], Optional[float]]],
    title: str,
    x_label: str,
    y_label: str,
    w: int = 640,
    h: int = 260,
) -> str:
    """Line plot of shares: ``series`` holds ``(name, ys, target)``; a dashed line in the same
    colour marks each target. y is a fraction shown in percent."""
    xs = np.asarray(x, dtype=np.float64)
    legend_h = 18 * ((len(series) + 2) // 3)
    ph = h + legend_h
    if xs.size == 0:
        return _frame(title, [], x_label, y_label, w, ph)
    ymax = max([max(list(ys) + [t or 0.0]) for _, ys, t in series] + [0.01])
    ymax = min(1.0, ymax * 1.1)
    plot_h = h
    parts, top = _y_axis(ymax, w, plot_h, pct=True)
    x0, x1 = float(xs.min()), float(xs.max())
    sx = (w - _L - _R) / ((x1 - x0) or 1.0)

    def py(v: float) -> float:
        return plot_h - _B - (plot_h - _T - _B) * v / top

    for k, (name, ys, target) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        pts = " ".join(f"{_L + (a - x0) * sx:.1f},{py(b):.1f}" for a, b in zip(xs, ys))
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{_e(name)}</title></polyline>"
        )
        if target is not None:
            parts.append(
                f'<line x1="{_L}" x2="{w - _R}" y1="{py(target):.1f}" '
                f'y2="{py(target):.1f}" stroke="{color}" stroke-dasharray="5,4" '
                f'stroke-width="1.2"><title>{_e(name)} target {target:.2%}</title>'
                "</line>"
            )
        lx, ly = _L + (k % 3) * 190, plot_h + 2 + 18 * (k // 3)
        parts.append(
            f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{color}"/>'
            f'<text x="{lx + 16}" y="{ly + 10}" class="tk">{_e(name[:28])}</text>'
        )
    for t in _ticks(x0, x1, 6):
        parts.append(
            f'<text x="{_L + (t - x0) * sx:.1f}" y="{plot_h - _B + 14}" '
            f'text-anchor="middle" class="tk">{_e(_fmt(t))}</text>'
        )
    parts.append(f'<line x1="{_L}" x2="{w - _R}" y1="{plot_h - _B}" y2="{plot_h - _B}" class="axis"/>')
    return _frame(title, parts, x_label, y_label, w, ph, plot_h)
