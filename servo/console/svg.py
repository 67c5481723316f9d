"""Charts for the console, drawn server-side as SVG text.

Pure functions: data in, one `<svg>` element out. Every label goes through
`xml.sax.saxutils` escaping, nothing carries a script or an inline style (the
console's Content-Security-Policy forbids both; colours are presentation
attributes), and every picture is sized by its viewBox so CSS scales it.
Empty data draws a frame saying "no data" instead of raising.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

WIDTH = 640
HEIGHT = 260
MARGIN_LEFT = 56
MARGIN_RIGHT = 16
MARGIN_TOP = 46
MARGIN_BOTTOM = 36
#: a line chart marks its points with dots up to this many points a series
MAX_DOTS = 60
#: a line chart draws about this many points of a series at most (`decimate`)
MAX_POINTS = 400
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
STATUS_COLOURS = {
    "succeeded": "#2ca02c",
    "cached": "#7fbf7f",
    "running": "#1f77b4",
    "pending": "#bbbbbb",
    "failed": "#d62728",
    "skipped": "#dddddd",
}


@dataclass(frozen=True)
class Series:
    """One line of a line chart: points (x, y) and an optional band (low, high) per point."""

    label: str
    points: Sequence[tuple[float, float]]
    band: Sequence[tuple[float, float]] | None = None
    step: bool = False


@dataclass(frozen=True)
class Marker:
    """A vertical event line at x, labelled (a retrain, a promotion, a rollback)."""

    x: float
    label: str
    kind: str = "event"


@dataclass(frozen=True)
class Bar:
    """One bar with an optional interval (low, high) drawn as an error bar."""

    label: str
    value: float
    low: float | None = None
    high: float | None = None
    group: str = ""


@dataclass(frozen=True)
class Step:
    """One node of a pipeline DAG: its name, status and the steps it takes input from."""

    name: str
    status: str
    inputs: Sequence[str] = field(default_factory=tuple)
    note: str = ""


@dataclass(frozen=True)
class Scale:
    """A linear or log-10 map from data values to pixels."""

    low: float
    high: float
    pixel_low: float
    pixel_high: float
    log: bool = False

    def __call__(self, value: float) -> float:
        low, high, v = self.low, self.high, value
        if self.log:
            low, high = math.log10(low), math.log10(high)
            v = math.log10(max(value, self.low))
        span = high - low
        fraction = (v - low) / span if span else 0.5
        return round(self.pixel_low + fraction * (self.pixel_high - self.pixel_low), 2)

    def ticks(self, count: int = 5) -> list[float]:
        if self.log:
            first = math.floor(math.log10(self.low))
            last = math.ceil(math.log10(self.high))
            return [10.0**e for e in range(first, last + 1) if self.low <= 10.0**e <= self.high]
        if self.high == self.low:
            return [self.low]
        step = nice((self.high - self.low) / (count - 1))
        first = math.ceil(self.low / step - 1e-9)
        last = math.floor(self.high / step + 1e-9)
        return [round(i * step, 12) for i in range(first, last + 1)]


def nice(step: float) -> float:
    """The round step (1, 2 or 5 times a power of ten) at or above `step`."""
    power = 10.0 ** math.floor(math.log10(step))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= step * (1 - 1e-9))


def tag(name: str, content: str | None = None, /, **attrs: float | str) -> str:
    """One element: attribute names with "_" written "-" (a trailing "_" dropped: `class_`),
    every value quoted and escaped, numbers as short decimals; `content` is markup (escape
    text before passing it)."""
    parts = [name]
    for key, value in attrs.items():
        shown = f"{value:g}" if isinstance(value, float | int) else value
        parts.append(f"{key.rstrip('_').replace('_', '-')}={quoteattr(shown)}")
    head = " ".join(parts)
    return f"<{head}/>" if content is None else f"<{head}>{content}</{name}>"


def text(
    x: float, y: float, label: str, *, anchor: str = "start", size: int = 11, **attrs: str
) -> str:
    """One `<text>` element; the label is escaped."""
    return tag("text", escape(label), x=x, y=y, font_size=size, text_anchor=anchor,
               font_family="sans-serif", **attrs)  # fmt: skip


def titled(name: str, title: str, /, **attrs: float | str) -> str:
    """An element holding a `<title>` (the browser's tooltip), escaped."""
    return tag(name, f"<title>{escape(title)}</title>", **attrs)


def frame(title: str, body: Sequence[str], *, width: int = WIDTH, height: int = HEIGHT) -> str:
    """Wrap elements in an `<svg>` with a viewBox, a `<title>` and a heading; its width and
    height are the viewBox's (its natural size: CSS may scale it down)."""
    heading = text(MARGIN_LEFT, 15, title, size=12, font_weight="bold")
    content = f"<title>{escape(title)}</title>{heading}{''.join(body)}"
    return tag("svg", content, xmlns="http://www.w3.org/2000/svg", width=width, height=height,
               viewBox=f"0 0 {width} {height}", role="img", class_="chart")  # fmt: skip


def empty(title: str, message: str = "no data") -> str:
    """A chart frame that says there is nothing to draw."""
    return frame(
        title, [text(WIDTH / 2, HEIGHT / 2, message, anchor="middle", size=13, fill="#666")]
    )


def fmt(value: float) -> str:
    """A short tick label: 3 significant digits."""
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.2g}"
    return f"{value:.3g}"


def bounds(values: Sequence[float], *, log: bool = False) -> tuple[float, float]:
    """Low and high of finite values, padded so a flat series still has a span."""
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return (1.0, 10.0) if log else (0.0, 1.0)
    low, high = min(finite), max(finite)
    if log:
        return (low / 2, high * 2) if low == high else (low, high)
    if low == high:
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def box(x: Scale, y: Scale) -> str:
    """The plot area's frame."""
    return tag("rect", x=x.pixel_low, y=y.pixel_high, width=x.pixel_high - x.pixel_low,
               height=y.pixel_low - y.pixel_high, fill="none", stroke="#999")  # fmt: skip


def axes(
    x: Scale,
    y: Scale,
    *,
    x_label: str = "",
    y_label: str = "",
    x_format: Callable[[float], str] = fmt,
) -> list[str]:
    """The plot's frame, y ticks with grid lines, x ticks and axis labels."""
    left, right = x.pixel_low, x.pixel_high
    bottom, top = y.pixel_low, y.pixel_high
    out = [box(x, y)]
    for tick in y.ticks():
        py = y(tick)
        out.append(tag("line", x1=left, y1=py, x2=right, y2=py, stroke="#eee"))
        out.append(text(left - 4, py + 4, fmt(tick), anchor="end", size=10))
    out.extend(text(x(t), bottom + 14, x_format(t), anchor="middle", size=10) for t in x.ticks())
    if x_label:
        out.append(text((left + right) / 2, bottom + 30, x_label, anchor="middle", size=10))
    if y_label:
        out.append(
            text(
                12,
                (top + bottom) / 2,
                y_label,
                anchor="middle",
                size=10,
                transform=f"rotate(-90 12 {(top + bottom) / 2:g})",
            )
        )
    return out


def path(points: Sequence[tuple[float, float]], *, step: bool = False) -> str:
    """An SVG path `d` through pixel points; a step path holds each y until the next x."""
    if not points:
        return ""
    parts = [f"M{points[0][0]:g},{points[0][1]:g}"]
    for (_, y0), (x1, y1) in itertools.pairwise(points):
        if step:
            parts.append(f"L{x1:g},{y0:g}")
        parts.append(f"L{x1:g},{y1:g}")
    return " ".join(parts)


def decimate(ys: Sequence[float], limit: int = MAX_POINTS) -> list[int]:
    """Indices of at most about `limit` of the points: in each run of consecutive points,
    its first, lowest and highest (peaks and troughs stay: a path still reaches its
    threshold where it did), and the very last point."""
    if len(ys) <= limit:
        return list(range(len(ys)))
    size = math.ceil(3 * len(ys) / limit)
    keep: set[int] = {len(ys) - 1}
    for start in range(0, len(ys), size):
        run = range(start, min(start + size, len(ys)))
        keep |= {start, min(run, key=ys.__getitem__), max(run, key=ys.__getitem__)}
    return sorted(keep)


def finite(s: Series, log: bool) -> Series:
    """The series without points (and band entries) that cannot be drawn: NaN, infinite,
    or (on a log axis) not positive; decimated to about MAX_POINTS points."""
    drawable = [
        i
        for i, (px, py) in enumerate(s.points)
        if math.isfinite(px) and math.isfinite(py) and (py > 0 or not log)
    ]
    keep = [drawable[i] for i in decimate([s.points[i][1] for i in drawable])]
    band = None
    if s.band is not None and len(s.band) == len(s.points):
        band = [s.band[i] for i in keep]
        if not all(math.isfinite(v) and (v > 0 or not log) for b in band for v in b):
            band = None
    return Series(s.label, [s.points[i] for i in keep], band, s.step)


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    thresholds: Sequence[tuple[float, str]] = (),
    log_y: bool = False,
    markers: Sequence[Marker] = (),
    x_label: str = "",
    y_label: str = "",
    x_format: Callable[[float], str] = fmt,
) -> str:
    """Lines (or steps) with optional interval bands, horizontal (value, label) threshold
    lines and event markers.

    Points that cannot be drawn (NaN, infinite, not positive on the log-10 axis of
    `log_y`) are left out.
    """
    series = [finite(s, log_y) for s in series]
    if not any(s.points for s in series):
        return empty(title)
    xs = [p[0] for s in series for p in s.points] + [m.x for m in markers]
    ys = [p[1] for s in series for p in s.points]
    ys += [v for s in series for b in (s.band or ()) for v in b]
    ys += [value for value, _ in thresholds]
    x = Scale(*bounds(xs), MARGIN_LEFT, WIDTH - MARGIN_RIGHT)
    y = Scale(*bounds(ys, log=log_y), HEIGHT - MARGIN_BOTTOM, MARGIN_TOP, log=log_y)
    body = axes(x, y, x_label=x_label, y_label=y_label, x_format=x_format)
    for index, s in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        if s.band:
            upper = [(x(px), y(hi)) for (px, _), (_, hi) in zip(s.points, s.band, strict=True)]
            lower = [(x(px), y(lo)) for (px, _), (lo, _) in zip(s.points, s.band, strict=True)]
            body.append(tag("path", d=path(upper + lower[::-1]) + " Z", fill=colour,
                            fill_opacity="0.15", stroke="none", class_="band"))  # fmt: skip
        pixels = [(x(px), y(py)) for px, py in s.points]
        body.append(titled("path", s.label, d=path(pixels, step=s.step), fill="none",
                           stroke=colour, stroke_width=2, class_="series"))  # fmt: skip
        if len(pixels) <= MAX_DOTS:
            body.extend(tag("circle", cx=px, cy=py, r=2.5, fill=colour) for px, py in pixels)
    for value, label in thresholds:
        ty = y(value)
        body.append(tag("line", x1=x.pixel_low, y1=ty, x2=x.pixel_high, y2=ty, stroke="#d62728",
                        stroke_dasharray="6 3", class_="threshold"))  # fmt: skip
        if label:
            body.append(text(x.pixel_low + 4, ty - 4, label, size=10, fill="#d62728"))
    for index, m in enumerate(markers):
        mx = x(m.x)
        body.append(tag("line", x1=mx, y1=y.pixel_high, x2=mx, y2=y.pixel_low, stroke="#555",
                        stroke_dasharray="2 2", class_=f"marker {m.kind}"))  # fmt: skip
        right = mx > (x.pixel_low + x.pixel_high) / 2  # label on the side with room
        body.append(text(mx - 3 if right else mx + 3, y.pixel_low - 6 - 11 * (index % 3),
                         m.label, anchor="end" if right else "start", size=9,
                         fill="#555"))  # fmt: skip
    body += legend([(s.label, PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)])
    return frame(title, body)


def legend(entries: Sequence[tuple[str, str]]) -> list[str]:
    """(label, colour) entries in rows between the heading and the plot (two rows fit)."""
    out: list[str] = []
    lx, ly = float(MARGIN_LEFT), 30.0
    for label, colour in entries:
        width = 18 + 5.6 * len(label) + 14
        if lx + width > WIDTH - MARGIN_RIGHT and lx > MARGIN_LEFT:
            lx, ly = float(MARGIN_LEFT), ly + 12
        out.append(tag("rect", x=lx, y=ly - 8, width=10, height=10, fill=colour))
        out.append(text(lx + 14, ly + 1, label, size=10))
        lx += width
    return out


def histograms(
    title: str,
    edges: Sequence[float],
    reference: Sequence[float],
    live: Sequence[float],
    *,
    labels: tuple[str, str] = ("reference", "live"),
) -> str:
    """Two histograms on the same bins, drawn as side-by-side bars of their fractions.

    `edges` has one more entry than each count list; counts are normalised to
    fractions so a reference of 10,000 rows and a live window of 500 compare.
    """
    bins = len(edges) - 1
    if bins < 1:
        return empty(title)
    if len(reference) != bins or len(live) != bins:
        raise ValueError(
            f"histograms: {bins} bins but {len(reference)} reference and {len(live)} live counts"
        )
    totals = sum(reference), sum(live)
    if not totals[0] and not totals[1]:
        return empty(title)
    fractions = [
        [c / t if t else 0.0 for c in counts]
        for counts, t in zip((reference, live), totals, strict=True)
    ]
    top = max(max(f) for f in fractions) or 1.0
    x = Scale(0, bins, MARGIN_LEFT, WIDTH - MARGIN_RIGHT)
    y = Scale(0, top, HEIGHT - MARGIN_BOTTOM, MARGIN_TOP)

    def edge(tick: float) -> str:  # ticks fall on bin boundaries: the edge's value
        index = round(tick)
        return fmt(edges[index]) if abs(tick - index) < 1e-9 and 0 <= index <= bins else ""

    body = axes(x, y, y_label="fraction", x_format=edge)
    width = (x(1) - x(0)) / 2
    for series_index, values in enumerate(fractions):
        colour = PALETTE[series_index]
        for b, value in enumerate(values):
            bx = x(b) + series_index * width
            by = y(value)
            tip = f"{labels[series_index]} [{fmt(edges[b])}, {fmt(edges[b + 1])}): {value:.1%}"
            body.append(titled("rect", tip, x=bx, y=by, width=max(width - 1, 0.5),
                               height=y.pixel_low - by, fill=colour, fill_opacity="0.8",
                               class_="bin"))  # fmt: skip
    body += legend([(label, PALETTE[i]) for i, label in enumerate(labels)])
    return frame(title, body)


def bars(
    title: str, items: Sequence[Bar], *, low: float | None = None, high: float | None = None
) -> str:
    """Vertical bars with error bars for their intervals, grouped by `Bar.group` colour."""
    if not items:
        return empty(title)
    values = [v for b in items for v in (b.value, b.low, b.high) if v is not None]
    lo, hi = bounds(values)
    lo = min(lo, 0.0) if low is None else low
    hi = hi if high is None else high
    x = Scale(0, len(items), MARGIN_LEFT, WIDTH - MARGIN_RIGHT)
    y = Scale(lo, hi, HEIGHT - MARGIN_BOTTOM, MARGIN_TOP)
    body = [box(x, y)]
    body.extend(text(x.pixel_low - 4, y(t) + 4, fmt(t), anchor="end", size=10) for t in y.ticks())
    groups = list(dict.fromkeys(b.group for b in items))
    slot = x(1) - x(0)
    for index, item in enumerate(items):
        colour = PALETTE[groups.index(item.group) % len(PALETTE)]
        bx = x(index) + slot * 0.2
        by = y(min(max(item.value, lo), hi))
        base = y(max(lo, 0.0)) if lo <= 0.0 else y.pixel_low
        body.append(titled("rect", f"{item.label}: {fmt(item.value)}", x=bx, y=min(by, base),
                           width=slot * 0.6, height=abs(base - by), fill=colour,
                           class_="bar"))  # fmt: skip
        centre = x(index + 0.5)
        if item.low is not None and item.high is not None:
            y_low, y_high = y(max(item.low, lo)), y(min(item.high, hi))
            d = (f"M{centre - 6:g},{y_high:g} H{centre + 6:g} M{centre:g},{y_high:g} "
                 f"V{y_low:g} M{centre - 6:g},{y_low:g} H{centre + 6:g}")  # fmt: skip
            body.append(tag("path", d=d, stroke="#222", fill="none", class_="errorbar"))
        body.append(text(centre, y.pixel_low + 14, item.label, anchor="middle", size=10))
        body.append(text(centre, by - 4, fmt(item.value), anchor="middle", size=9))
    body += legend([(g, PALETTE[i % len(PALETTE)]) for i, g in enumerate(groups) if g])
    return frame(title, body)


def layers(steps: Sequence[Step]) -> dict[str, int]:
    """Each step's layer: 0 without known inputs, else one more than its deepest input.

    Raises ValueError on a cycle; inputs naming no step are ignored.
    """
    names = {s.name for s in steps}
    inputs = {s.name: [i for i in s.inputs if i in names] for s in steps}
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def visit(name: str) -> int:
        if name in depth:
            return depth[name]
        if name in visiting:
            raise ValueError(f"pipeline steps form a cycle through {name!r}")
        visiting.add(name)
        depth[name] = 1 + max((visit(i) for i in inputs[name]), default=-1)
        visiting.discard(name)
        return depth[name]

    for s in steps:
        visit(s.name)
    return depth


BOX_WIDTH = 140
BOX_HEIGHT = 40
GAP_X = 50
GAP_Y = 20


def dag(title: str, steps: Sequence[Step]) -> str:
    """Boxes coloured by status in layers left to right, with an edge from each input.

    The picture grows with the number of layers and the widest layer; the
    viewBox says its size.
    """
    if not steps:
        return empty(title, "no steps")
    depth = layers(steps)
    columns: dict[int, list[Step]] = {}
    for s in steps:
        columns.setdefault(depth[s.name], []).append(s)
    tallest = max(len(c) for c in columns.values())
    width = 20 + len(columns) * (BOX_WIDTH + GAP_X)
    height = 30 + tallest * (BOX_HEIGHT + GAP_Y) + 10
    where: dict[str, tuple[float, float]] = {}
    for column, members in columns.items():
        offset = (tallest - len(members)) * (BOX_HEIGHT + GAP_Y) / 2
        for row, s in enumerate(members):
            where[s.name] = (
                20 + column * (BOX_WIDTH + GAP_X),
                30 + offset + row * (BOX_HEIGHT + GAP_Y),
            )
    head = tag("path", d="M0,0 L10,5 L0,10 Z", fill="#666")
    arrow = tag("marker", head, id="arrow", viewBox="0 0 10 10", refX=10, refY=5,
                markerWidth=6, markerHeight=6, orient="auto")  # fmt: skip
    body = [f"<defs>{arrow}</defs>"]
    for s in steps:
        tx, ty = where[s.name]
        for source in s.inputs:
            if source not in where:
                continue
            sx, sy = where[source]
            body.append(tag("line", x1=sx + BOX_WIDTH, y1=sy + BOX_HEIGHT / 2, x2=tx,
                            y2=ty + BOX_HEIGHT / 2, stroke="#666", marker_end="url(#arrow)",
                            class_="edge"))  # fmt: skip
    for s in steps:
        bx, by = where[s.name]
        colour = STATUS_COLOURS.get(s.status, "#eeeeee")
        body.append(titled("rect", f"{s.name}: {s.status}", x=bx, y=by, width=BOX_WIDTH,
                           height=BOX_HEIGHT, rx=4, fill=colour, stroke="#333",
                           class_=f"step {s.status}"))  # fmt: skip
        body.append(text(bx + BOX_WIDTH / 2, by + 16, short(s.name, 20), anchor="middle", size=11))
        body.append(
            text(
                bx + BOX_WIDTH / 2, by + 31, short(s.note or s.status, 24), anchor="middle", size=9
            )
        )
    return frame(title, body, width=max(width, 200), height=height)


def short(label: str, limit: int) -> str:
    """A label cut to `limit` characters with an ellipsis (the full one is in the box's title)."""
    return label if len(label) <= limit else label[: limit - 1] + "…"
