"""SMART styling values are validated before they reach CSS (smart_app/style.py)."""

from __future__ import annotations

import pytest

from smart_app.style import clean_style, style_css


@pytest.mark.parametrize("key,value,ok", [
    ("color_background", "#edeae3", True),
    ("color_text", "rgb(20, 30, 40)", True),
    ("color_error", "rgba(255,0,0,0.5)", True),
    ("color_highlight", "navy", True),
    ("color_text", "red;} body{display:none", False),
    ("color_text", "url(https://x)", False),
    ("color_text", "expression(alert(1))", False),
    ("dim_border_radius", "6px", True),
    ("dim_font_size", "1.2rem", True),
    ("dim_spacing_size", "20px; }", False),
    ("font_family_body", "Georgia, Times, 'Times New Roman', serif", True),
    ("font_family_heading", "x}</style><script>", False),
    ("font_family_body", "a" * 200, False),
    ("unknown_key", "#fff", False),
])
def test_clean_style(key, value, ok):
    assert (key in clean_style({key: value})) is ok


def test_style_css_uses_custom_properties_only():
    css = style_css(clean_style({"color_background": "#000", "color_text": "white", "junk": "x"}))
    assert css == ":root {\n  --fm-bg: #000;\n  --fm-text: white;\n}\n"
    assert style_css({}) == "/* no EHR style */\n"
    assert clean_style("not a dict") == {}
