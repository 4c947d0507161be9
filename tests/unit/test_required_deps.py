"""A missing outside dependency (PostgreSQL, axe-core) skips a developer's partial run but FAILS under `make test`
(FHIR_MASSAGE_REQUIRE_ALL=1) and CI (CI=true), so a check that never ran cannot pass as green."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.required import REQUIRE_ALL_ENV, missing_dependency

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("env,fails", [
    ({}, False),
    ({REQUIRE_ALL_ENV: "1"}, True),
    ({"CI": "true"}, True),
    ({"CI": "TRUE"}, True),
    ({REQUIRE_ALL_ENV: "0"}, False),
    ({"CI": "false"}, False),
])
def test_missing_dependency_skips_or_fails(monkeypatch, env, fails):
    monkeypatch.delenv(REQUIRE_ALL_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    expected = pytest.fail.Exception if fails else pytest.skip.Exception
    with pytest.raises(expected) as err:
        missing_dependency("axe-core", "run `make node-deps`")
    assert "axe-core is not installed: run `make node-deps`" in str(err.value)


def test_postgres_fixture_fails_under_make_test_when_postgres_is_missing(tmp_path):
    """The real fixture, with the server binaries made unfindable: skip by default, fail saying what to install."""
    (tmp_path / "conftest.py").write_text(
        "import tests.fixtures.postgres as pg\n"
        "pytest_plugins = ['tests.fixtures.postgres']\n"
        "def _none():\n"
        "    raise pg.PostgresUnavailable('PostgreSQL server binaries (initdb, pg_ctl) are not installed.')\n"
        "pg._bin_dir = _none\n")
    (tmp_path / "test_db.py").write_text("def test_db(postgres_dsn):\n    assert postgres_dsn\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", REQUIRE_ALL_ENV)}
    env["PYTHONPATH"] = str(ROOT)

    def run(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-rsE", "-p", "no:cacheprovider", str(tmp_path)],
                              cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=120)

    relaxed = run()
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout[-2000:]
    strict = run(**{REQUIRE_ALL_ENV: "1"})
    assert strict.returncode == 1 and "1 error" in strict.stdout, strict.stdout[-2000:]
    assert "PostgreSQL server (initdb, pg_ctl) is not installed: run `make system-deps`" in strict.stdout
