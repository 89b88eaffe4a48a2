# kpistream: the two commands of the README, and what they need.
# `make demo` runs the main job, `make test` the tests; both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m app.demo $(DEMO_ARGS)

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) out .pytest_cache
