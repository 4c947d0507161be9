"""Production start-up refuses what is missing or unsafe, in one plain sentence (issue: integrator kit §3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_massage.errors import InvalidInput
from smart_app import create_app
from smart_app.wsgi import build_config

REGS = """
[[ehr]]
iss = "https://ehr.example.org/fhir"
client_id = "fhir-massage"
"""


def _build_config(env: dict[str, str]) -> dict:
    return build_config(env)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    regs = tmp_path / "ehrs.toml"
    regs.write_text(REGS)
    return {"FHIR_MASSAGE_REGISTRATIONS": str(regs), "FHIR_MASSAGE_PUBLIC_URL": "https://massage.example.org",
            "FHIR_MASSAGE_SECRET_KEY": "x" * 40, "FHIR_MASSAGE_TRUST_PROXY_TLS": "1"}


def test_complete_environment_builds(env: dict[str, str]) -> None:
    config = _build_config(env)
    assert config["TRUST_PROXY_TLS"] is True
    assert config["REGISTRATIONS"][0]["iss"] == "https://ehr.example.org/fhir"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"FHIR_MASSAGE_REGISTRATIONS": ""}, "FHIR_MASSAGE_REGISTRATIONS"),
        ({"FHIR_MASSAGE_PUBLIC_URL": ""}, "FHIR_MASSAGE_PUBLIC_URL"),
        ({"FHIR_MASSAGE_SECRET_KEY": ""}, "FHIR_MASSAGE_SECRET_KEY"),
        ({"FHIR_MASSAGE_SECRET_KEY": "short-secret"}, "too short"),
    ],
    ids=["no-registrations", "no-public-url", "no-secret", "weak-secret"],
)
def test_missing_or_unsafe_settings_are_refused_plainly(env: dict[str, str], change: dict, words: str) -> None:
    env.update(change)
    with pytest.raises(InvalidInput, match=words):
        _build_config(env)


def test_plain_http_on_a_public_address_is_refused() -> None:
    with pytest.raises(InvalidInput, match="plain http"):
        create_app({"PUBLIC_URL": "http://massage.example.org", "AREAS": ()})


def test_readiness_reports_the_store() -> None:
    app = create_app({"PUBLIC_URL": "http://127.0.0.1:5000", "AREAS": ()})
    client = app.test_client()
    assert client.get("/readyz").status_code == 200

    class BrokenStore:
        def put(self, *a, **k):
            raise OSError("connection refused")

    app.extensions["store"] = BrokenStore()
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.get_json()["status"] == "unavailable"
    assert client.get("/healthz").status_code == 200


def test_lifetimes_and_switches_come_from_the_environment(env: dict[str, str]) -> None:
    env.update({"FHIR_MASSAGE_DRAFT_TTL": "3600", "FHIR_MASSAGE_SESSION_TTL": "28800",
                "FHIR_MASSAGE_TRUST_PROXY_TLS": "no"})
    config = _build_config(env)
    assert config["DRAFT_TTL"] == 3600 and config["SESSION_TTL"] == 28800
    assert config["TRUST_PROXY_TLS"] is False


@pytest.mark.parametrize(("name", "value"), [("FHIR_MASSAGE_DRAFT_TTL", "a week"), ("FHIR_MASSAGE_STATE_TTL", "0"),
                                             ("FHIR_MASSAGE_TRUST_PROXY_TLS", "maybe")])
def test_malformed_environment_values_are_named(env: dict[str, str], name: str, value: str) -> None:
    env[name] = value
    with pytest.raises(InvalidInput, match=name):
        _build_config(env)


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from smart_app import logs

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("json")
        logging.getLogger("smart_app").warning("store unreachable (%s)", "OperationalError")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        entry = json.loads(line)
        assert entry["level"] == "warning" and entry["logger"] == "smart_app"
        assert entry["message"] == "store unreachable (OperationalError)"
        with pytest.raises(InvalidInput, match="LOG_FORMAT"):
            logs.configure("xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
