"""The scopes the registration guide tells integrators to register are exactly the ones the app asks for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fhir_massage.smart import default_scopes

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "registering.md"


@pytest.mark.parametrize(("index", "dialect"), [(0, "v2"), (1, "v1")])
def test_registering_guide_lists_the_default_scopes(index: int, dialect: str) -> None:
    blocks = re.findall(r"```\n(launch openid fhirUser.*?)\n```", GUIDE.read_text(), re.S)
    assert len(blocks) == 2, "the guide shows one v2 and one v1 scope block"
    assert blocks[index].split() == default_scopes(dialect, standalone=False).split()
