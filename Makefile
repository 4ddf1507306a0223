# EdgeFleet developer entry points. Every target builds its own environment from nothing, so a
# fresh clone needs only Python >= 3.11 and make.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Rebuilt when the dependency list changes.
STAMP  := $(VENV)/.stamp-dev
PYTEST_ARGS ?=

.PHONY: help venv demo test test-slow reliability fuzz lint format proto proto-check clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "EdgeFleet needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,train]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv with EdgeFleet (editable) and the dev tools

DEMO_ARGS ?=

demo: $(STAMP)  ## the whole chain on this machine: optimize, sign, roll out to 6 agents, serve, report
	$(BIN)/edgefleet demo $(DEMO_ARGS)

test: $(STAMP)  ## run the test suite (unit, integration, e2e; not the slow ones)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)  ## run every test, the slow ones too
	$(BIN)/python -m pytest $(PYTEST_ARGS)

RELIABILITY_OUT ?= bench/results/reliability.json
FUZZ_EXAMPLES   ?= 20000

reliability: $(STAMP)  ## the fault, authorization and fuzz campaign with full trial counts; figures to RELIABILITY_OUT
	EDGEFLEET_RELIABILITY=full EDGEFLEET_RELIABILITY_OUT=$(RELIABILITY_OUT) $(BIN)/python -m pytest -m reliability --timeout 1800 $(PYTEST_ARGS); \
	status=$$?; $(BIN)/python -m tests.support.reliability_report $(RELIABILITY_OUT) RELIABILITY.md; exit $$status

fuzz: $(STAMP)  ## only the fuzz targets, FUZZ_EXAMPLES inputs each (figures to RELIABILITY_OUT)
	EDGEFLEET_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) EDGEFLEET_RELIABILITY_OUT=$(RELIABILITY_OUT) $(BIN)/python -m pytest -m fuzz --timeout 7200 $(PYTEST_ARGS); \
	status=$$?; $(BIN)/python -m tests.support.reliability_report $(RELIABILITY_OUT) RELIABILITY.md; exit $$status

lint: $(STAMP)  ## ruff, mypy (strict) and the import-linter layering contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: $(STAMP)  ## regenerate the gRPC stubs from proto/edgefleet/v1/*.proto
	$(BIN)/python scripts/gen_proto.py

proto-check: $(STAMP)  ## fail if the committed stubs differ from freshly generated ones
	$(BIN)/python scripts/gen_proto.py --check

clean:  ## remove the environment and caches
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
