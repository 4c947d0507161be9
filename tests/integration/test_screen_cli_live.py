"""The live path: one batch request to the real sandbox EHR on loopback, then the same screening engine."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import pytest

from fhir_massage.chart import from_resources
from fhir_massage.chart_fetch import fetch_chart_resources
from fhir_massage.errors import FhirNotFound
from fhir_massage.fhir import FhirClient
from fhir_massage.screening import screen

pytestmark = pytest.mark.integration
TODAY = date(2026, 11, 28)


@pytest.fixture
def seeded(make_sandbox):
    return make_sandbox(open=True, seed=True, today=TODAY)


def test_fetch_in_one_batch_and_screen_the_demo_dvt(seeded):
    events = []
    with FhirClient(seeded.fhir_base, on_request=events.append) as client:
        resources = fetch_chart_resources(client, "demo-dana-whitfield")
    assert len(events) == 1, [(e.method, e.path) for e in events]  # everything in ONE batch request
    result = screen(from_resources(resources), techniques=["swedish"], sites=["30021000:left"], today=TODAY)
    assert result.verdict == "contraindicated"
    assert {"dvt-acute", "anticoagulant"} <= {f.rule for f in result.findings}
    assert not any("Incomplete chart" in w for w in result.warnings), result.warnings


def test_unknown_patient_is_not_found(seeded):
    with FhirClient(seeded.fhir_base) as client, pytest.raises(FhirNotFound):
        fetch_chart_resources(client, "no-such-patient")


def test_cli_live_json(seeded):
    r = subprocess.run([sys.executable, "-m", "fhir_massage.cli", "screen", "--fhir-base", seeded.fhir_base,
                        "--patient", "demo-frank-delgado", "--today", TODAY.isoformat(), "--format", "json"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verdict"] == "contraindicated"
    assert "temperature-high" in {f["rule"] for f in out["findings"]}


def test_cli_live_without_patient_is_a_usage_error(seeded):
    r = subprocess.run([sys.executable, "-m", "fhir_massage.cli", "screen", "--fhir-base", seeded.fhir_base],
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and b"--patient" in r.stderr and b"Traceback" not in r.stderr
