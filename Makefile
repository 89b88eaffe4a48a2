# kpistream: the two commands of the README, and what they need.
# `make demo` runs the main job, `make test` the tests; both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m app.demo $(DEMO_ARGS)

# the whole suite: the tests that need no Ray, MLflow, Prometheus or browser on two
# workers, then the integration tests one at a time (they share one Ray instance)
test: setup
	$(BIN)/pytest -q -n 2 -p no:cacheprovider -m "not integration"
	$(BIN)/pytest -q -p no:cacheprovider -m integration

# The Ray-free unit tests of kpistream/ (about a minute on 2 cores): the loop while changing code.
FAST_TESTS := tests/test_imports.py tests/engine tests/wire tests/windows tests/store \
              tests/alerts tests/decide tests/spec tests/replay
FAST := not (integration or ray or mlflow or prometheus or browser or slow)
test-fast: setup
	KPISTREAM_FAST=1 $(BIN)/pytest -q -n 2 -p no:cacheprovider -m "$(FAST)" $(FAST_TESTS)

bench: setup
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) out .pytest_cache
