"""servo.console.svg: valid XML, escaped labels, known coordinates, empty data."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from servo.console import svg

NS = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert(1)</script>&\"'"


def parse(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == f"{NS}svg"
    assert root.get("viewBox", "").startswith("0 0 ")
    assert list(root.iter(f"{NS}script")) == []
    assert all("style" not in e.attrib for e in root.iter())
    assert all(not k.startswith("on") for e in root.iter() for k in e.attrib)
    return root


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{NS}text")]


def test_scale_linear_and_log() -> None:
    linear = svg.Scale(0, 10, 100, 200)
    assert (linear(0), linear(5), linear(10)) == (100, 150, 200)
    log = svg.Scale(1, 100, 0, 200, log=True)
    assert (log(1), log(10), log(100)) == (0, 100, 200)
    assert log(0) == 0  # clipped to the floor
    assert log.ticks() == [1.0, 10.0, 100.0]


def test_line_chart_coordinates_threshold_markers() -> None:
    chart = svg.line_chart(
        "e-values",
        [svg.Series("errors", [(0, 1), (10, 100)], step=True)],
        thresholds=[(10, "1/alpha")],
        log_y=True,
        markers=[svg.Marker(5, "step 2", kind="advance")],
    )
    root = parse(chart)
    x = svg.Scale(0, 10, svg.MARGIN_LEFT, svg.WIDTH - svg.MARGIN_RIGHT)
    y = svg.Scale(1, 100, svg.HEIGHT - svg.MARGIN_BOTTOM, svg.MARGIN_TOP, log=True)
    series = [p for p in root.iter(f"{NS}path") if p.get("class") == "series"]
    assert series[0].get("d") == f"M{x(0):g},{y(1):g} L{x(10):g},{y(1):g} L{x(10):g},{y(100):g}"
    (threshold,) = [e for e in root.iter(f"{NS}line") if e.get("class") == "threshold"]
    assert float(threshold.get("y1", "nan")) == y(10)
    (marker,) = [e for e in root.iter(f"{NS}line") if "marker" in e.get("class", "")]
    assert float(marker.get("x1", "nan")) == x(5) and marker.get("class") == "marker advance"
    assert {"1/alpha", "step 2", "errors"} <= set(texts(root))


def test_line_chart_band() -> None:
    chart = svg.line_chart(
        "accuracy", [svg.Series("v1", [(0, 0.9), (1, 0.8)], band=[(0.85, 0.95), (0.7, 0.9)])]
    )
    (band,) = [p for p in parse(chart).iter(f"{NS}path") if p.get("class") == "band"]
    assert band.get("d", "").endswith("Z") and band.get("d", "").count("L") == 3


def test_labels_are_escaped() -> None:
    charts = [
        svg.line_chart(
            HOSTILE,
            [svg.Series(HOSTILE, [(0, 1)])],
            markers=[svg.Marker(0, HOSTILE, HOSTILE)],
            thresholds=[(1, HOSTILE)],
        ),
        svg.histograms(HOSTILE, [0, 1, 2], [1, 2], [2, 1], labels=(HOSTILE, HOSTILE)),
        svg.bars(HOSTILE, [svg.Bar(HOSTILE, 0.5, 0.4, 0.6, group=HOSTILE)]),
        svg.dag(HOSTILE, [svg.Step(HOSTILE, HOSTILE, note=HOSTILE)]),
        svg.empty(HOSTILE, HOSTILE),
    ]
    for chart in charts:
        assert "<script" not in chart
        root = parse(chart)
        assert HOSTILE in texts(root) or any(HOSTILE in t for t in texts(root))


def test_histograms_fractions() -> None:
    chart = svg.histograms("age", [0, 10, 20], [10, 30], [5, 5])
    root = parse(chart)
    bins = [r for r in root.iter(f"{NS}rect") if r.get("class") == "bin"]
    assert len(bins) == 4
    y = svg.Scale(0, 0.75, svg.HEIGHT - svg.MARGIN_BOTTOM, svg.MARGIN_TOP)
    heights = [float(r.get("height", "nan")) for r in bins]
    base = svg.HEIGHT - svg.MARGIN_BOTTOM
    assert heights == [pytest.approx(base - y(v)) for v in (0.25, 0.75, 0.5, 0.5)]
    with pytest.raises(ValueError, match="2 bins"):
        svg.histograms("age", [0, 10, 20], [1], [1, 2])


def test_bars_with_error_bars() -> None:
    chart = svg.bars(
        "accuracy",
        [svg.Bar("champion", 0.9, 0.85, 0.95, group="offline"), svg.Bar("candidate", 0.8)],
        low=0,
        high=1,
    )
    root = parse(chart)
    y = svg.Scale(0, 1, svg.HEIGHT - svg.MARGIN_BOTTOM, svg.MARGIN_TOP)
    rects = [r for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    assert [float(r.get("y", "nan")) for r in rects] == [y(0.9), y(0.8)]
    (error,) = [p for p in root.iter(f"{NS}path") if p.get("class") == "errorbar"]
    assert f"V{y(0.85):g}" in error.get("d", "")


def test_dag_layers_and_edges() -> None:
    steps = [
        svg.Step("train", "succeeded", ["data"]),
        svg.Step("data", "cached"),
        svg.Step("evaluate", "failed", ["train", "data"]),
        svg.Step("export", "pending", ["train"]),
    ]
    assert svg.layers(steps) == {"data": 0, "train": 1, "evaluate": 2, "export": 2}
    root = parse(svg.dag("run 1", steps))
    boxes = {
        r.find(f"{NS}title").text: r
        for r in root.iter(f"{NS}rect")
        if r.find(f"{NS}title") is not None
    }  # type: ignore[union-attr]
    assert boxes["evaluate: failed"].get("fill") == svg.STATUS_COLOURS["failed"]
    assert float(boxes["data: cached"].get("x", "nan")) == 20
    assert float(boxes["train: succeeded"].get("x", "nan")) == 20 + svg.BOX_WIDTH + svg.GAP_X
    assert len([e for e in root.iter(f"{NS}line") if e.get("class") == "edge"]) == 4
    with pytest.raises(ValueError, match="cycle"):
        svg.layers([svg.Step("a", "pending", ["b"]), svg.Step("b", "pending", ["a"])])


def test_empty_data() -> None:
    for chart in (
        svg.line_chart("none", []),
        svg.line_chart("none", [svg.Series("a", [])]),
        svg.histograms("none", [], [], []),
        svg.histograms("none", [0, 1], [0], [0]),
        svg.bars("none", []),
        svg.dag("none", []),
    ):
        root = parse(chart)
        assert any(t.startswith("no ") for t in texts(root))


def test_flat_and_non_finite_values() -> None:
    root = parse(svg.line_chart("flat", [svg.Series("a", [(1, 5), (1, 5)])]))
    assert root.find(f"{NS}path") is not None
    root = parse(
        svg.line_chart("log", [svg.Series("a", [(0, 0.0), (1, float("inf"))])], log_y=True)
    )
    out = ET.tostring(root, encoding="unicode")
    assert "nan" not in out and "inf" not in out


def test_long_series_are_decimated_keeping_peaks() -> None:
    ys = [float(i % 100) for i in range(5000)]  # a saw: peaks of 99 every 100 points
    ys[2345] = 1000.0
    kept = svg.decimate(ys, limit=300)
    assert len(kept) <= 310 and kept[-1] == 4999 and 2345 in kept
    assert svg.decimate(ys[:10], limit=300) == list(range(10))
    chart = svg.line_chart("long", [svg.Series("a", list(enumerate(ys)))])
    (series,) = [p for p in parse(chart).iter(f"{NS}path") if p.get("class") == "series"]
    assert series.get("d", "").count("L") < svg.MAX_POINTS + 10
