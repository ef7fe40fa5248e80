# `make demo` and `make test` do all the set-up on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint layers typecheck unit services bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vpp demo

services:
	./scripts/ensure_services.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check vpp store devices sim dispatch api cli tests bench
	$(VENV)/bin/ruff format --check vpp store devices sim dispatch api cli tests bench

layers: $(STAMP)
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider

test: $(STAMP) services lint layers typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: $(STAMP) services
	$(PY) bench/ingest.py --small
	$(PY) bench/forecast_eval.py --small
	$(PY) bench/dispatch.py --small
	$(PY) bench/fanout.py --small
	$(PY) bench/history.py --small
	$(PY) bench/broker_credentials.py --small
	$(PY) bench/fleet_snapshot.py --small
	$(PY) bench/soak.py --small
	$(PY) bench/national.py --small
	$(PY) bench/registry_catchup.py --small

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache vpp.db*
