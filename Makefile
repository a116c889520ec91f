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

test: setup
	$(VENV)/python -m pytest -q -m "not gpu and not slow"

check: setup
	$(VENV)/python -m pytest -q -m "not gpu"

test-all: setup
	$(VENV)/python -m pytest -q

completions: setup
	$(VENV)/python scripts/make_completions.py
