"""Self-contained HTML pieces (no network needed to open a page): a page shell with inline
CSS, tables, and inline SVG charts (histograms and line plots)."""

from __future__ import annotations

import html
import json
import math

from tunesmith.judge.files import finite_json

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:70em;
 padding:0 1em;color:#1d1d1f}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;
 text-align:left;vertical-align:top}th{background:#f4f4f6}td.num{text-align:right}
pre{background:#f6f8fa;padding:.6em;overflow:auto;max-height:30em}
.sev0{color:#b00020}.sev1{color:#c25e00}.sev2{color:#7a6400}.sev3{color:#555}
.ok{color:#0a7d32}.bad{color:#b00020}.muted{color:#777}
svg text{font:11px system-ui,sans-serif}
button{font-size:1em;padding:.5em 1em;margin:.2em;cursor:pointer}
.answer{white-space:pre-wrap;border:1px solid #ccc;padding:.6em;border-radius:4px;min-height:3em}
"""

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, script: str = "") -> str:
    """A whole HTML document: `body` is HTML, `script` JavaScript run at load."""
    js = f"<script>\n{script}\n</script>" if script else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>\n{body}\n{js}\n</body></html>\n"
    )


def table(header: list[str], rows: list[list], numeric_from: int = 1, attrs: str = "") -> str:
    """An HTML table; cells are escaped, columns from `numeric_from` on align right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{esc(c)}</td>' if j >= numeric_from else f"<td>{esc(c)}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def json_script(element_id: str, data) -> str:
    """Data for the page's script, as a JSON block the HTML parser reads as plain text: `<`,
    `>` and `&` as JSON escapes (`<!--<script>` in a sample would otherwise swallow the closing
    tag), and Infinity or NaN as null (JSON.parse refuses them)."""
    text = json.dumps(finite_json(data), ensure_ascii=False)
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escape)
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    start = math.ceil(low / step) * step
    ticks = []
    value = start
    while value <= high + 1e-12:
        ticks.append(round(value, 12))
        value += step
    return ticks


def svg_histogram(
    series: dict[str, list[int]],
    limit: int | None = None,
    bins: int = 30,
    width: int = 640,
    height: int = 220,
    label: str = "tokens",
) -> str:
    """Overlaid histograms of each series, with a dashed line at `limit` (max_seq_len)."""
    values = [v for vs in series.values() for v in vs]
    if not values:
        return '<p class="muted">no records</p>'
    top = max(max(values), limit or 0, 1)
    edges = [top * i / bins for i in range(bins + 1)]
    counts = {}
    for name, vs in series.items():
        c = [0] * bins
        for v in vs:
            c[min(bins - 1, int(v / top * bins))] += 1
        counts[name] = c
    peak = max(max(c) for c in counts.values()) or 1
    left, bottom, plot_w, plot_h = 48, 30, width - 60, height - 50
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of {esc(label)}">'
    ]
    bar_w = plot_w / bins
    for k, (name, c) in enumerate(counts.items()):
        color = COLORS[k % len(COLORS)]
        for i, n in enumerate(c):
            if n:
                h = n / peak * plot_h
                x, y = left + i * bar_w, height - bottom - h
                parts.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                    f'fill="{color}" fill-opacity="0.55"><title>{esc(name)}: {n} records, '
                    f"{edges[i]:.0f}-{edges[i + 1]:.0f} {esc(label)}</title></rect>"
                )
        parts.append(
            f'<rect x="{left + 10 + 130 * k}" y="4" width="10" height="10" '
            f'fill="{color}"/><text x="{left + 24 + 130 * k}" y="13">{esc(name)}</text>'
        )
    parts += _axes(left, bottom, plot_w, plot_h, width, height, 0, top, 0, peak, label, "records")
    if limit:
        x = left + limit / top * plot_w
        parts.append(
            f'<line x1="{x:.1f}" y1="{height - bottom}" x2="{x:.1f}" y2="20" '
            'stroke="#b00020" stroke-dasharray="4 3"/>'
            f'<text x="{x - 4:.1f}" y="30" text-anchor="end" fill="#b00020">'
            f"max_seq_len {limit}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _axes(left, bottom, plot_w, plot_h, width, height, x0, x1, y0, y1, xlabel, ylabel):
    base = height - bottom
    parts = [
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>',
        f'<line x1="{left}" y1="{base}" x2="{left}" y2="{base - plot_h}" stroke="#333"/>',
    ]
    for t in _nice_ticks(x0, x1):
        x = left + (t - x0) / ((x1 - x0) or 1) * plot_w
        parts.append(f'<text x="{x:.1f}" y="{base + 14}" text-anchor="middle">{t:g}</text>')
    for t in _nice_ticks(y0, y1, 4):
        y = base - (t - y0) / ((y1 - y0) or 1) * plot_h
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 2}" text-anchor="middle">'
        f"{esc(xlabel)}</text>"
    )
    parts.append(
        f'<text x="10" y="{base - plot_h / 2:.0f}" transform="rotate(-90 10 '
        f'{base - plot_h / 2:.0f})" text-anchor="middle">{esc(ylabel)}</text>'
    )
    return parts


def svg_lines(
    series: dict[str, list[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    width: int = 640,
    height: int = 240,
    log_y: bool = False,
) -> str:
    """Line plots of (x, y) points, one color per series."""
    points = [p for ps in series.values() for p in ps]
    if not points:
        return '<p class="muted">nothing logged</p>'

    def ty(y):
        return math.log10(y) if log_y and y > 0 else y

    xs, ys = [p[0] for p in points], [ty(p[1]) for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    left, bottom, plot_w, plot_h = 56, 30, width - 70, height - 50
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(ylabel)} by {esc(xlabel)}">'
    ]
    for k, (name, ps) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        coords = " ".join(
            f"{left + (x - x0) / ((x1 - x0) or 1) * plot_w:.1f},"
            f"{height - bottom - (ty(y) - y0) / (y1 - y0) * plot_h:.1f}"
            for x, y in ps
        )
        marker = "" if len(ps) > 1 else ' stroke-width="6" stroke-linecap="round"'
        parts.append(
            f'<polyline points="{coords}{" " + coords if len(ps) == 1 else ""}" '
            f'fill="none" stroke="{color}" stroke-width="1.6"{marker}/>'
            f'<rect x="{left + 10 + 150 * k}" y="4" width="10" height="10" '
            f'fill="{color}"/><text x="{left + 24 + 150 * k}" y="13">{esc(name)}</text>'
        )
    ylab = f"{ylabel} (log10)" if log_y else ylabel
    parts += _axes(left, bottom, plot_w, plot_h, width, height, x0, x1, y0, y1, xlabel, ylab)
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["esc", "json_script", "page", "svg_histogram", "svg_lines", "table"]
