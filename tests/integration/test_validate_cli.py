"""`fhir-massage validate` as a user runs it: a real process, real files, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "profiles" / "examples").glob("*.json"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fhir_massage.cli", "validate", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


def test_all_examples_are_valid() -> None:
    proc = run(*map(str, EXAMPLES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": OK") == len(EXAMPLES)


def test_an_invalid_resource_exits_1_and_names_the_path(tmp_path: Path) -> None:
    order = json.loads((ROOT / "profiles/examples/ServiceRequest-massage-order-mld.json").read_text())
    del order["subject"]
    order["code"]["coding"][1]["code"] = "reiki"
    bad = tmp_path / "order.json"
    bad.write_text(json.dumps(order))
    good = EXAMPLES[0]
    proc = run(str(good), str(bad))
    assert proc.returncode == 1
    assert f"{bad}: error: ServiceRequest.subject:" in proc.stdout
    assert f"{bad}: error: ServiceRequest.code.coding[1]:" in proc.stdout
    assert f"{good}: OK" in proc.stdout
    assert "1 of 2 file(s) invalid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quiet_prints_errors_only(tmp_path: Path) -> None:
    session = json.loads((ROOT / "profiles/examples/Procedure-massage-session-1.json").read_text())
    del session["meta"]  # a warning (no meta.profile) ...
    session["status"] = "done"  # ... and an error
    f = tmp_path / "s.json"
    f.write_text(json.dumps(session))
    proc = run("--quiet", str(f))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines and all(": error: " in line for line in lines)


def test_profile_option(tmp_path: Path) -> None:
    session = ROOT / "profiles/examples/Procedure-massage-session-1.json"
    ok = run("--profile", "https://fhir-massage.dev/fhir/StructureDefinition/massage-procedure", str(session))
    assert ok.returncode == 0
    wrong = run("--profile", "https://fhir-massage.dev/fhir/StructureDefinition/massage-plan", str(session))
    assert wrong.returncode == 1 and "is for CarePlan, not Procedure" in wrong.stdout
    foreign = run("--profile", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-procedure", str(session))
    assert foreign.returncode == 2 and "not a fhir-massage profile" in foreign.stderr


@pytest.mark.parametrize(
    "content,expected",
    [(None, "no such file"), ("{", "not JSON"), (b"\xff\xfe\x00", "cannot read it")],
    ids=["missing-file", "not-json", "not-utf8"],
)
def test_unreadable_input_exits_2_with_one_line(tmp_path: Path, content, expected: str) -> None:
    f = tmp_path / "in.json"
    if isinstance(content, str):
        f.write_text(content)
    elif isinstance(content, bytes):
        f.write_bytes(content)
    proc = run(str(f))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr
