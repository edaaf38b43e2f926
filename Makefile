# step3vl — the two commands a user needs are `make run` and `make test`.
# Each creates .venv from nothing when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STEP3VL := $(VENV)/bin/step3vl
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast test-servers manifests-check clean help

help:
	@echo "make run        run the whole STEP3-VL recipe on the tiny config (embedded mode)"
	@echo "make test       every test, real-server integration tests included"
	@echo "make test-fast  unit tests only (no real servers, no slow tests)"
	@echo "make reliability  the reliability and security suite, then RELIABILITY.md regenerated from it"
	@echo "make manifests-check  kustomize, schema, policy and hadolint checks of manifests/ and images/"
	@echo "make setup      create .venv (done automatically by run/test)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel first: a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(STEP3VL) run --config conf/pipeline/tiny.yaml

# Real servers (Ceph radosgw as S3, PostgreSQL) come from Debian packages.
test-servers:
	bash scripts/install-test-servers.sh

# --durations: the slowest tests, so the ~20-minute budget is watched where CI prints it
test: $(STAMP) test-servers manifests-check
	$(PY) -m pytest --durations=20

# Offline: every overlay built (kubectl kustomize), each object validated strictly (kubernetes-validate;
# CRs against the CRDs vendored in manifests/crds), the security policy, hadolint on images/*/Dockerfile.
# kubernetes-validate and hadolint come with the dev extra; kubectl (or kustomize) from the machine.
manifests-check: $(STAMP)
	$(PY) scripts/manifests_check.py

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration"

clean:
	rm -rf $(VENV) .step3vl .pytest_cache

# Benchmarks (~8 min on 2 cores): bench/results.json and the BENCHMARKS.md generated from it.
.PHONY: bench
bench: $(STAMP)
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/run.py

# The reliability and security suite: tests/reliability/ plus the tests elsewhere it catalogues
# (tests/reliability/reliability_cases.py), then RELIABILITY.md rendered from what they measured,
# failures included. `make test` runs the same tests (and checks RELIABILITY.md lists every case).
.PHONY: reliability
reliability: $(STAMP) test-servers
	$(PY) -m pytest tests/reliability $$($(PY) scripts/reliability_report.py --node-ids | grep -v '^tests/reliability/'); \
	rc=$$?; $(PY) scripts/reliability_report.py; exit $$rc
