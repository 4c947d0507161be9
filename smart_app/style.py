"""SMART App Styling (SC "SMART App Styling", experimental): fetch the EHR's style JSON server-side and turn only
values that are plainly colours, lengths or font lists into CSS custom properties. Anything else is dropped, so
an EHR (or whoever controls the URL) cannot inject CSS (``}`` , ``url(...)``, ``expression``, ``;``)."""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import requests

_COLOR = re.compile(r"^(#[0-9a-fA-F]{3,4}|#[0-9a-fA-F]{6}|#[0-9a-fA-F]{8}|[a-zA-Z]{3,20}|"
                    r"rgba?\(\s*\d{1,3}%?\s*,\s*\d{1,3}%?\s*,\s*\d{1,3}%?\s*(,\s*(0|1|0?\.\d+|\d{1,3}%)\s*)?\)|"
                    r"hsla?\(\s*\d{1,3}(deg)?\s*,\s*\d{1,3}%\s*,\s*\d{1,3}%\s*(,\s*(0|1|0?\.\d+|\d{1,3}%)\s*)?\))$")
_LENGTH = re.compile(r"^(0|\d{1,3}(\.\d{1,3})?(px|em|rem|%|pt))$")
_FONT = re.compile(r"^[A-Za-z0-9 ,\-]{1,120}$|^([A-Za-z0-9 \-]+|\"[A-Za-z0-9 \-]+\"|'[A-Za-z0-9 \-]+')"
                   r"(\s*,\s*([A-Za-z0-9 \-]+|\"[A-Za-z0-9 \-]+\"|'[A-Za-z0-9 \-]+'))*$")
_BAD_WORDS = re.compile(r"(expression|url|javascript|import)", re.I)

# SMART style keys → our CSS custom properties (static/app.css uses them with defaults).
KEYS: dict[str, tuple[str, re.Pattern[str]]] = {
    "color_background": ("--fm-bg", _COLOR),
    "color_error": ("--fm-error", _COLOR),
    "color_highlight": ("--fm-highlight", _COLOR),
    "color_modal_backdrop": ("--fm-backdrop", _COLOR),
    "color_success": ("--fm-success", _COLOR),
    "color_text": ("--fm-text", _COLOR),
    "dim_border_radius": ("--fm-radius", _LENGTH),
    "dim_font_size": ("--fm-font-size", _LENGTH),
    "dim_spacing_size": ("--fm-space", _LENGTH),
    "font_family_body": ("--fm-font-body", _FONT),
    "font_family_heading": ("--fm-font-heading", _FONT),
}


def clean_style(doc: Any) -> dict[str, str]:
    """Pure: the accepted values only."""
    out: dict[str, str] = {}
    if not isinstance(doc, Mapping):
        return out
    for key, (_prop, pattern) in KEYS.items():
        value = doc.get(key)
        if isinstance(value, str) and len(value) <= 120 and pattern.match(value.strip()) \
                and not _BAD_WORDS.search(value):
            out[key] = value.strip()
    return out


def style_css(values: Mapping[str, str]) -> str:
    lines = [f"  {KEYS[k][0]}: {v};" for k, v in values.items() if k in KEYS]
    return ":root {\n" + "\n".join(lines) + "\n}\n" if lines else "/* no EHR style */\n"


def fetch_style(url: str, allowed_origins: Iterable[str], http: requests.Session, timeout: Any) -> dict[str, str]:
    """GET the style JSON without any token, only from the EHR's own origins (no SSRF through the token response).
    Any failure means "no style": styling is optional (SC)."""
    p = urlsplit(url)
    origin = f"{p.scheme.lower()}://{p.netloc.lower()}" if p.scheme and p.netloc else None
    if origin not in set(allowed_origins):
        return {}
    try:
        response = http.get(url, headers={"Accept": "application/json"}, timeout=timeout, allow_redirects=False)
        if response.status_code != 200 or len(response.content) > 64_000:
            return {}
        return clean_style(response.json())
    except (requests.RequestException, ValueError):
        return {}
