# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all bench lint clean-state

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools

# Re-install only when a requirements file or pyproject.toml changes.
$(STAMP): $(BIN)/python requirements.txt requirements-nodeps.txt pyproject.toml
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## The monthly DAG for product_intent, end to end on the embedded defaults (PostgreSQL from pip, local state).
demo: $(STAMP)
	$(BIN)/retrain demo --use-case product_intent

## Default test run: everything except tests marked slow.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/parse_time.py
	$(BIN)/python bench/collect_throughput.py

clean-state:
	rm -rf .state
