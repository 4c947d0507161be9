"""`fhir-massage screen` as scripts use it: a real process, exit codes, the JSON shape, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_screening_rules import ICD, allergy, bundle, condition, med_request, observation

pytestmark = pytest.mark.integration


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fhir_massage.cli", "screen", *args], capture_output=True,
                          input=stdin, timeout=60)


@pytest.fixture
def chart_file(tmp_path: Path) -> Path:
    path = tmp_path / "chart.json"
    path.write_text(json.dumps(bundle(condition("c", "I82.402", ICD, onset="2024-05-20"), med_request("m", "855332"),
                                      observation("o", "777-3", 35, "10*3/uL"))))
    return path


def test_json_shape_and_exit_zero(chart_file):
    r = cli("--bundle", str(chart_file), "--technique", "swedish", "--site", "30021000:left", "--today", "2024-06-01",
            "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verdict"] == "contraindicated"
    assert set(out) >= {"verdict", "findings", "needsReview", "warnings"}
    for f in out["findings"]:
        assert set(f) >= {"rule", "class", "techniques", "sites", "evidence", "message", "evidenceClass", "source"}
        assert f["class"] in ("absolute", "relative", "local")
        assert all("/" in e for e in f["evidence"])
    dvt = next(f for f in out["findings"] if f["rule"] == "dvt-acute")
    assert dvt["sites"] == ["61685007:left"] and dvt["evidence"] == ["Condition/c"]
    assert r.stderr == b""


def test_caution_and_clear_also_exit_zero(chart_file, tmp_path):
    r = cli("--bundle", str(chart_file), "--technique", "swedish", "--site", "53120007:right", "--today", "2024-06-01",
            "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "caution"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(bundle()))
    r = cli("--bundle", str(empty), "--today", "2024-06-01", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "clear"


def test_default_format_is_json_when_piped(chart_file):
    r = cli("--bundle", str(chart_file), "--today", "2024-06-01")
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "contraindicated"


def test_text_format_for_people(chart_file):
    r = cli("--bundle", str(chart_file), "--today", "2024-06-01", "--format", "text")
    assert r.returncode == 0
    text = r.stdout.decode()
    assert text.startswith("Verdict: CONTRAINDICATED") and "dvt-acute" in text and "Condition/c" in text


def test_bundle_from_stdin(chart_file):
    r = cli("--bundle", "-", "--today", "2024-06-01", "--format", "json", stdin=chart_file.read_bytes())
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "contraindicated"


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert r.stdout == b""


@pytest.mark.parametrize("content,words", [
    (b"{not json", ["not JSON"]),
    (b'{"resourceType": "Patient", "id": "x"}', ["not a FHIR Bundle"]),
    (b"[1, 2]", ["not a FHIR Bundle"]),
    (json.dumps(bundle(condition("c", "I82.402", ICD), with_patient=False)).encode(), ["no Patient"]),
    (json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}}, {"resource": {"resourceType": "Patient", "id": "b"}}]}).encode(),
     ["2 patients"]),
])
def test_unreadable_input_exits_2_with_one_line(tmp_path, content, words):
    path = tmp_path / "in.json"
    path.write_bytes(content)
    _one_line_error(cli("--bundle", str(path), "--today", "2024-06-01"), *words)


@pytest.mark.parametrize("args,words", [
    (["--technique", "shiatsu"], ["Unknown technique", "shiatsu"]),
    (["--site", "leg"], ["Malformed body site"]),
    (["--site", "30021000:up"], ["Malformed body site"]),
    (["--site", "77568009:left"], ["has no sides"]),
    (["--today", "yesterday"], ["--today"]),
])
def test_bad_options_exit_2_with_one_line(chart_file, args, words):
    _one_line_error(cli("--bundle", str(chart_file), *args), *words)


def test_missing_file_exits_2(tmp_path):
    _one_line_error(cli("--bundle", str(tmp_path / "nope.json")), "Cannot read")


def test_help_documents_the_default_format():
    r = subprocess.run([sys.executable, "-m", "fhir_massage.cli", "screen", "--help"], capture_output=True, timeout=60)
    assert r.returncode == 0
    assert "default: text on a terminal, json otherwise" in " ".join(r.stdout.decode().split())


def test_product_allergy_is_information_in_json_and_text(tmp_path):
    # issue 4: an allergy to a massage product is "an informational finding" -> the verdict stays clear, the item
    # is under "information" (not "findings", whose class values stay absolute/relative/local)
    path = tmp_path / "latex.json"
    path.write_text(json.dumps(bundle(allergy("a", "Latex allergy", "300916003"))))
    r = cli("--bundle", str(path), "--technique", "swedish", "--today", "2024-06-01", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verdict"] == "clear" and out["findings"] == []
    [item] = out["information"]
    assert item["rule"] == "allergy-massage-product" and item["evidence"] == ["AllergyIntolerance/a"]
    assert set(item) >= {"rule", "techniques", "sites", "evidence", "message", "evidenceClass", "source"}
    assert "class" not in item
    r = cli("--bundle", str(path), "--technique", "swedish", "--today", "2024-06-01", "--format", "text")
    text = r.stdout.decode()
    assert text.startswith("Verdict: CLEAR") and "For your information" in text
    assert "latex-free" in text and "Latex allergy" in text and "AllergyIntolerance/a" in text


def test_product_allergy_with_a_dvt_lists_the_information_beside_the_findings(tmp_path):
    path = tmp_path / "both.json"
    path.write_text(json.dumps(bundle(allergy("a", "Latex"), condition("c", "I82.402", ICD, onset="2024-05-20"))))
    r = cli("--bundle", str(path), "--technique", "swedish", "--site", "30021000:left", "--today", "2024-06-01",
            "--format", "json")
    out = json.loads(r.stdout)
    assert out["verdict"] == "contraindicated"
    assert "dvt-acute" in {f["rule"] for f in out["findings"]}
    assert {f["class"] for f in out["findings"]} <= {"absolute", "relative", "local"}
    assert [i["rule"] for i in out["information"]] == ["allergy-massage-product"]


def test_help_says_allergies_are_information():
    r = subprocess.run([sys.executable, "-m", "fhir_massage.cli", "screen", "--help"], capture_output=True, timeout=60)
    words = " ".join(r.stdout.decode().split())
    assert '"information"' in words and "never change the verdict" in words


def test_text_report_names_each_source_and_prints_units_for_people(tmp_path):
    # --help promises the source of each finding; the text is for a person: "35 ×10⁹/L" and "38.5 °C", never the
    # UCUM codes "10*9/L" / "Cel"; the JSON keeps its raw UCUM "unit" (a stable interface)
    path = tmp_path / "units.json"
    path.write_text(json.dumps(bundle(allergy("a", "Latex allergy", "300916003"),
                                      observation("p", "777-3", 35, "10*3/uL"),
                                      observation("t", "8310-5", 101.3, "[degF]"))))
    r = cli("--bundle", str(path), "--today", "2024-06-01", "--format", "text")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    # one block per finding / information item: a line "  [CLASS] rule — title" or "  rule — title", then its
    # indented lines
    items: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and " — " in line:
            items.append([line])
        elif line.startswith("      ") and items:
            items[-1].append(line)
    assert len(items) >= 3, text  # platelets, fever, the latex information item
    for block in items:
        sources = [ln.strip()[len("source: "):] for ln in block if ln.strip().startswith("source: ")]
        assert len(sources) == 1 and sources[0].strip() and sources[0] != "none recorded", block
    assert "35 ×10⁹/L" in text and "°C" in text and "the fever threshold (38.0 °C)" in text
    for raw in ("10*9/L", " Cel", "[degF]", "10*3/uL"):
        assert raw not in text, raw
    out = json.loads(cli("--bundle", str(path), "--today", "2024-06-01", "--format", "json").stdout)
    units = {d.get("unit") for f in out["findings"] for d in f["details"] if "unit" in d}
    assert units >= {"10*9/L", "Cel"}, units
