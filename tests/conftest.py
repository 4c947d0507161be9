"""Shared fixtures are plugins under tests/fixtures/ (one module per area), loaded here by name."""

import pkgutil
from pathlib import Path

_fixtures = Path(__file__).parent / "fixtures"
pytest_plugins = [f"tests.fixtures.{m.name}" for m in pkgutil.iter_modules([str(_fixtures)])]
