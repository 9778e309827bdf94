# One command per job. `make run` and `make test` work on a fresh clone: each creates
# the project's environment in .venv first if it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export METAFLOW_USER ?= $(or $(USER),plantml)
export USER ?= plantml

.PHONY: venv run test test-unit test-integration lint clean

# Operator jobs (local stack, serve, load test, edge binary) live in ops.mk.
-include ops.mk

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel setuptools
	$(PY) -m pip install -e '.[all]'
	touch $(STAMP)

venv: $(STAMP)  ## create/refresh the environment in .venv

run: $(STAMP)  ## train on the built-in demo data (or DATA_DIR=path), export the champion bundle
	$(PY) flows/train_flow.py run $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

test: $(STAMP)  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

test-integration: $(STAMP)
	$(PY) -m pytest -q -m integration

lint: $(STAMP)
	$(PY) -m flake8 plantml serving edge flows tests benchmarks k8s

clean:  ## remove generated artefacts (keeps .venv)
	rm -rf artifacts .metaflow mlruns mlartifacts mlflow.db data/demo reports
