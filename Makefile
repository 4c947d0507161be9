# Two commands for a newcomer: `make demo` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install system-deps node-deps bench profiles clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make demo: sandbox EHR with demo patients + the app on 127.0.0.1; prints the URL to open.
demo: install
	$(VENV)/bin/fhir-massage demo

system-deps:
	./scripts/install-system-deps.sh

node-deps: system-deps
	@# profiles/: SUSHI and the FHIR R4 core definitions (the package build); tests/browser/: axe-core.
	@for d in profiles tests/browser; do \
	  if [ -f $$d/package.json ]; then (cd $$d && npm ci --no-audit --no-fund --loglevel=error) || exit 1; fi; \
	done

## make test: installs everything the tests need, then runs all of them (unit, HTTP, integration, browser).
test: install node-deps
	FHIR_MASSAGE_REQUIRE_ALL=1 $(PY) -m pytest

## make bench: speed figures (never part of the tests).
bench: install node-deps
	$(PY) -m benchmarks

## make profiles: rebuild the FHIR package from FSH (SUSHI) after editing profiles/input/fsh.
profiles: node-deps
	$(PY) -m fhir_massage.profiles_build

clean:
	rm -rf $(VENV) profiles/node_modules .pytest_cache
