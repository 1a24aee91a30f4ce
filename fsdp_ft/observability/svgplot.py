"""Line charts as inline SVG text: no plotting library, no scripts, no network — a page that opens anywhere.

Used by `fsdp-ft report` for one run and by the benchmark for its comparison page.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

# colour-blind-safe palette (Okabe-Ito)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


@dataclass
class Series:
    name: str
    xs: list[float]
    ys: list[float]
    color: str | None = None
    markers: bool = False  # dots on the points (sparse series such as eval rows)


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """About `count` round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 times a power of ten;
    whole numbers only when `integer`, as for steps)."""
    if hi == lo:
        hi, lo = hi + (abs(hi) or 1.0) * 0.5, lo - (abs(lo) or 1.0) * 0.5
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1, round(step)) if step >= 1 else 1
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels with just enough decimals to tell neighbouring ticks apart (6.925 stays 6.925, not 6.92)."""
    if len(ticks) < 2 or max(abs(t) for t in ticks) >= 1e4:
        return [fmt_number(t) for t in ticks]
    step = min(b - a for a, b in zip(ticks, ticks[1:]))
    decimals = 0
    while decimals < 10 and abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    return [f"{t:.{decimals}f}" for t in ticks]


def fmt_number(v: float) -> str:
    """Short tick labels: 1.2k, 3.4M, 0.0012, 45%."""
    a = abs(v)
    if a == 0:
        return "0"
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= size:
            return f"{v / size:.3g}{suffix}"
    return f"{v:.3g}"


def line_chart(series: list[Series], title: str, x_label: str = "step", y_label: str = "",
               width: int = 560, height: int = 300, y_format=None,
               x_range: tuple[float, float] | None = None) -> str:
    """One chart as an <svg> element: axes with round ticks, a line per series, a legend when there are several.
    `x_range` fixes the x axis (so that the charts of one run line up)."""
    series = [s for s in series if s.xs and len(s.xs) == len(s.ys)]
    ml, mr, mt, mb = 64, 16, 34, 44
    pw, ph = width - ml - mr, height - mt - mb
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" class="title">{html.escape(title)}</text>']
    points = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if _finite(x) and _finite(y)]
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no data</text></svg>')
        return "\n".join(out)
    xs = [p[0] for p in points] + list(x_range or ())
    xt = nice_ticks(min(xs), max(xs), integer=x_label == "step")
    yt = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    y_text = [y_format(y) for y in yt] if y_format else tick_labels(yt)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x):
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return mt + ph - (y - y0) / (y1 - y0) * ph

    for y, label in zip(yt, y_text):
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>')
        out.append(f'<text x="{ml - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" class="tick">'
                   f'{html.escape(label)}</text>')
    for x in xt:
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" class="axis"/>')
        out.append(f'<text x="{sx(x):.1f}" y="{mt + ph + 17}" text-anchor="middle" class="tick">'
                   f'{html.escape(fmt_number(x))}</text>')
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="frame"/>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" class="label">'
               f'{html.escape(x_label)}</text>')
    if y_label:
        out.append(f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" class="label" '
                   f'transform="rotate(-90 14 {mt + ph / 2})">{html.escape(y_label)}</text>')
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        pts = [(sx(x), sy(y)) for x, y in zip(s.xs, s.ys) if _finite(x) and _finite(y)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        name = html.escape(s.name)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" '
                   f'data-series="{name}"><title>{name}</title></polyline>')
        if s.markers or len(pts) == 1:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts]
    if len(series) > 1:
        out.append(f'<rect x="{ml + pw - 136}" y="{mt + 1}" width="134" height="{16 * len(series) + 2}" '
                   f'fill="#fff" fill-opacity="0.85"/>')
        for i, s in enumerate(series):
            color = s.color or PALETTE[i % len(PALETTE)]
            ly = mt + 8 + 16 * i
            out.append(f'<line x1="{ml + pw - 130}" x2="{ml + pw - 112}" y1="{ly}" y2="{ly}" stroke="{color}" '
                       f'stroke-width="3"/><text x="{ml + pw - 106}" y="{ly + 4}" class="legend">'
                       f'{html.escape(s.name[:22])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


STYLE = """
body { font-family: system-ui, -apple-system, 'DejaVu Sans', sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 17px; margin: 24px 0 8px 0; }
.sub { color: #666; margin-bottom: 16px; }
.charts { display: flex; flex-wrap: wrap; gap: 14px; }
svg.chart { border: 1px solid #ddd; border-radius: 4px; }
svg .title { font-size: 14px; font-weight: 600; fill: #222; } svg .tick { font-size: 11px; fill: #555; }
svg .label { font-size: 12px; fill: #444; } svg .legend { font-size: 11px; fill: #333; }
svg .empty { font-size: 13px; fill: #999; }
svg .grid { stroke: #eee; } svg .axis { stroke: #888; } svg .frame { fill: none; stroke: #bbb; }
table { border-collapse: collapse; font-size: 13px; background: #fff; }
td, th { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def table_html(header: list[str] | None, rows: list[list]) -> str:
    """An HTML table; numbers right-aligned."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(fmt_cell(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def fmt_cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def page(title: str, subtitle: str, body: list[str]) -> str:
    """A complete, self-contained HTML document."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1><div class=\"sub\">{html.escape(subtitle)}</div>\n"
            + "\n".join(body) + "\n</body></html>\n")


def save_page(text: str, folder: str | Path, out: str | Path | None = None) -> Path:
    """Write a page to `out`, by default FOLDER/report.html; returns its path."""
    out = Path(out) if out else Path(folder) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
