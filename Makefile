# The two commands of a fresh machine: `make demo` and `make test`.
VENV := .venv/bin
DEMO_DIR ?= demo-out

.PHONY: setup demo test test-all completions
setup: $(VENV)/mk
$(VENV)/mk: pyproject.toml scripts/setup.sh
	scripts/setup.sh
	@touch $@

demo: setup
	$(VENV)/mk demo -o $(DEMO_DIR) --force

test: setup
	$(VENV)/python -m pytest -q -m "not gpu"

test-all: setup
	$(VENV)/python -m pytest -q

completions: setup
	$(VENV)/python scripts/make_completions.py
