# The commands of a fresh machine: `make demo`, and `make check` (the whole suite, as
# CI runs it) or `make test` (the same without the slow end-to-end runs, for the edit loop).
VENV := .venv/bin
DEMO_DIR ?= demo-out

.PHONY: setup demo demo-generate test check test-all completions
setup: $(VENV)/mk
$(VENV)/mk: pyproject.toml scripts/setup.sh
	scripts/setup.sh
	@touch $@

demo: setup
	$(VENV)/mk demo -o $(DEMO_DIR) --force

demo-generate: setup
	$(VENV)/mk demo --task generate -o $(DEMO_DIR)-generate --force

# Tests run in parallel processes (pytest-xdist): many wait on servers and child processes,
# so two workers finish sooner even on two cores; more than four only multiplies loaded models.
PYTEST := $(VENV)/python -m pytest -q -n auto --maxprocesses 4

test: setup
	$(PYTEST) -m "not gpu and not slow"

check: setup
	$(PYTEST) -m "not gpu"

test-all: setup
	$(PYTEST)

completions: setup
	$(VENV)/python scripts/make_completions.py
