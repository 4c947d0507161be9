"""Server-rendered SVG charts (no script: the CSP allows none inline, and a chart must read without one).

The pain chart: pain before (filled circles, solid line) and after (open squares, dashed line) each session on the
0-10 numeric rating scale, a thin bar from before to after per session (the drop a session gives), and the
between-session trend of the pre-session scores, which is what the physician judges (coordination.pain_trend).
Accessibility (WAI "Complex images", SVG-AAM): ``role="img"`` with ``aria-labelledby`` pointing at the SVG's own
<title> and <desc>; the numbers themselves go in an HTML table next to the chart (the template), since an image
description cannot carry 50 sessions. Colour is never the only cue: the two series differ by marker shape and line
style too (WCAG 1.4.1). Styling comes from classes in static/plan.css (the CSP allows no inline style).
"""

from __future__ import annotations

from datetime import date
from typing import Sequence

from markupsafe import Markup, escape

from fhir_massage.coordination import PainPoint, PainTrend

__all__ = ["pain_chart_svg", "pain_summary"]

W, H = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 44, 16, 16, 40
MAX_LABELS = 6


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def pain_summary(trend: PainTrend) -> str:
    pts = trend.points
    if not pts:
        return "No pain scores recorded yet."
    befores = [p.before for p in pts if p.before is not None]
    afters = [p.after for p in pts if p.after is not None]
    drops = [p.before - p.after for p in pts if p.before is not None and p.after is not None]
    parts = [f"{len(pts)} session{'s' if len(pts) != 1 else ''} with pain scores, {pts[0].date.isoformat()} to "
             f"{pts[-1].date.isoformat()}."]
    if befores:
        parts.append(f"Before sessions: first {befores[0]}, last {befores[-1]} out of 10.")
    if afters:
        parts.append(f"After sessions: first {afters[0]}, last {afters[-1]}.")
    if drops:
        parts.append(f"Average drop during a session: {_fmt(sum(drops) / len(drops))} points.")
    parts.append(trend.note)
    return " ".join(parts)


def _x_positions(points: Sequence[PainPoint]) -> list[float]:
    """Session i at its date when dates differ (gaps show as gaps), else evenly spaced."""
    inner = W - LEFT - RIGHT
    if len(points) == 1:
        return [LEFT + inner / 2]
    first, last = points[0].date, points[-1].date
    span = (last - first).days
    if span <= 0:
        return [LEFT + inner * i / (len(points) - 1) for i in range(len(points))]
    return [LEFT + inner * (p.date - first).days / span for p in points]


def _y(v: float) -> float:
    return TOP + (H - TOP - BOTTOM) * (10 - v) / 10


def _label_indexes(n: int) -> list[int]:
    if n <= MAX_LABELS:
        return list(range(n))
    step = (n - 1) / (MAX_LABELS - 1)
    return sorted({round(i * step) for i in range(MAX_LABELS)})


def _short(d: date) -> str:
    return d.strftime("%b %d").replace(" 0", " ")


def pain_chart_svg(trend: PainTrend, *, chart_id: str, title: str = "Pain before and after each session") -> Markup:
    """The chart as an inline <svg> (Markup). ``chart_id`` makes the title/desc ids unique on the page."""
    cid = escape(chart_id)
    desc = pain_summary(trend)
    head = (f'<svg class="pain-chart" viewBox="0 0 {W} {H}" role="img" aria-labelledby="{cid}-title {cid}-desc" '
            f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">'
            f'<title id="{cid}-title">{escape(title)}</title><desc id="{cid}-desc">{escape(desc)}</desc>')
    parts = [head]
    # grid and y axis: 0, 2, ..., 10 (NRS 0-10)
    for v in range(0, 11, 2):
        y = _y(v)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis-label" x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{v}</text>')
    parts.append(f'<text class="axis-title" x="12" y="{(TOP + H - BOTTOM) / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(TOP + H - BOTTOM) / 2:.1f})">Pain 0-10</text>')
    pts = list(trend.points)
    if not pts:
        parts.append(f'<text class="empty" x="{W / 2}" y="{H / 2}" text-anchor="middle">No pain scores yet</text>')
        parts.append("</svg>")
        return Markup("".join(parts))
    xs = _x_positions(pts)
    many = len(pts) > 25
    r = 3 if many else 5
    for x, p in zip(xs, pts):  # the within-session drop
        if p.before is not None and p.after is not None:
            parts.append(f'<line class="drop" x1="{x:.1f}" x2="{x:.1f}" y1="{_y(p.before):.1f}" '
                         f'y2="{_y(p.after):.1f}"/>')
    for cls, attr in (("before", "before"), ("after", "after")):
        coords = [(x, getattr(p, attr)) for x, p in zip(xs, pts) if getattr(p, attr) is not None]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{_y(v):.1f}" for x, v in coords)
            parts.append(f'<polyline class="series series--{cls}" points="{path}"/>')
        for x, v in coords:
            if cls == "before":
                parts.append(f'<circle class="mark mark--before" cx="{x:.1f}" cy="{_y(v):.1f}" r="{r}"/>')
            else:
                parts.append(f'<rect class="mark mark--after" x="{x - r:.1f}" y="{_y(v) - r:.1f}" '
                             f'width="{2 * r}" height="{2 * r}"/>')
    for i in _label_indexes(len(pts)):
        anchor = "start" if i == 0 and len(pts) > 1 else ("end" if i == len(pts) - 1 and len(pts) > 1 else "middle")
        parts.append(f'<text class="axis-label" x="{xs[i]:.1f}" y="{H - BOTTOM + 18}" text-anchor="{anchor}">'
                     f'{escape(_short(pts[i].date))}</text>')
    # legend (shape + line style, not colour alone)
    ly = H - 8
    parts.append(f'<circle class="mark mark--before" cx="{LEFT + 6}" cy="{ly - 4}" r="5"/>'
                 f'<text class="legend" x="{LEFT + 16}" y="{ly}">Before session</text>'
                 f'<rect class="mark mark--after" x="{LEFT + 131}" y="{ly - 9}" width="10" height="10"/>'
                 f'<text class="legend" x="{LEFT + 147}" y="{ly}">After session</text>'
                 f'<line class="drop" x1="{LEFT + 262}" x2="{LEFT + 262}" y1="{ly - 10}" y2="{ly + 1}"/>'
                 f'<text class="legend" x="{LEFT + 270}" y="{ly}">Change during the session</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
