"""The server-rendered pain chart: well-formed SVG, accessible name and description, one mark per score, points
placed by value and date, escaping, and the same size of output whatever the number of sessions (bounded labels)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date, timedelta

import pytest

from fhir_massage.coordination import PainPoint, pain_trend
from smart_app.charts import H, LEFT, MAX_LABELS, TOP, BOTTOM, W, pain_chart_svg, pain_summary

NS = {"s": "http://www.w3.org/2000/svg"}
D0 = date(2026, 11, 2)


def trend(scores, step=3):
    return pain_trend([PainPoint(D0 + timedelta(days=step * i), b, a, f"Procedure/p{i}")
                       for i, (b, a) in enumerate(scores)])


def parse(markup) -> ET.Element:
    return ET.fromstring(str(markup))


@pytest.mark.parametrize("scores, befores, afters, drops", [
    pytest.param([], 0, 0, 0, id="no scores: an empty chart that says so"),
    pytest.param([(7, 4)], 1, 1, 1, id="one session"),
    pytest.param([(7, 4), (6, None), (None, 2)], 2, 2, 1, id="missing halves are not drawn"),
    pytest.param([(8 - i % 5, 4 - i % 4) for i in range(50)], 50, 50, 50, id="fifty sessions"),
])
def test_one_mark_per_score(scores, befores, afters, drops):
    svg = parse(pain_chart_svg(trend(scores), chart_id="c"))
    legend = 1 if scores else 0  # the legend repeats each mark once
    assert len(svg.findall("s:circle[@class='mark mark--before']", NS)) == befores + legend
    assert len(svg.findall("s:rect[@class='mark mark--after']", NS)) == afters + legend
    assert len(svg.findall("s:line[@class='drop']", NS)) == drops + legend
    if not scores:
        assert svg.find("s:text[@class='empty']", NS).text == "No pain scores yet"


def test_accessible_name_and_description():
    svg = parse(pain_chart_svg(trend([(8, 5), (6, 3), (4, 2)]), chart_id="pain-3"))
    assert svg.get("role") == "img" and svg.get("aria-labelledby") == "pain-3-title pain-3-desc"
    assert svg.find("s:title", NS).get("id") == "pain-3-title"
    desc = svg.find("s:desc", NS).text
    assert "3 sessions with pain scores" in desc and "first 8, last 4" in desc and "clinically important" in desc


@pytest.mark.parametrize("value", [0, 5, 10])
def test_marks_are_placed_by_value(value):
    svg = parse(pain_chart_svg(trend([(value, None), (value, None)]), chart_id="c"))
    ys = {float(c.get("cy")) for c in svg.findall("s:circle[@class='mark mark--before']", NS)[:-1]}
    assert ys == {TOP + (H - TOP - BOTTOM) * (10 - value) / 10}


def test_gaps_in_time_show_as_gaps():
    points = [PainPoint(D0, 5, 3, "a"), PainPoint(D0 + timedelta(days=1), 5, 3, "b"),
              PainPoint(D0 + timedelta(days=10), 5, 3, "c")]
    svg = parse(pain_chart_svg(pain_trend(points), chart_id="c"))
    xs = [float(c.get("cx")) for c in svg.findall("s:circle[@class='mark mark--before']", NS)[:-1]]
    assert xs[0] == LEFT and xs[2] == W - 16 and (xs[1] - xs[0]) * 9 == pytest.approx(xs[2] - xs[1])


def test_date_labels_are_bounded_and_the_title_is_escaped():
    svg = pain_chart_svg(trend([(5, 3)] * 80, step=1), chart_id='x"><script>', title="<b>Pain</b>")
    tree = parse(svg)
    labels = [t for t in tree.findall("s:text[@class='axis-label']", NS) if not t.text.isdigit()]
    assert len(labels) <= MAX_LABELS
    assert "<script>" not in str(svg) and "<b>" not in str(svg)
    assert tree.find("s:title", NS).text == "<b>Pain</b>"


def test_summary_words():
    assert pain_summary(trend([])) == "No pain scores recorded yet."
    assert "Average drop during a session: 3 points." in pain_summary(trend([(8, 5), (6, 3)]))
