# Shorthands for the two commands in README.md; .ci/run spells out the test command.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test lint readme

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What the main job needs (no test dependency).
install: $(BIN)/python
	$(BIN)/pip install -q -e ".[examples]"

# The test stack; torch==2.13.0 is the CPU build on the CI machine (README.md says why).
install-test: $(BIN)/python
	$(BIN)/pip install -q -e ".[test,examples,notebooks]" "torch==2.13.0"

# The main job: prove every hand-derived VJP against autodiff, then train on digits.
demo: install
	$(BIN)/jax-batchinhib verify
	$(BIN)/jax-batchinhib train

# The whole test suite, notebooks included. pytest's exit code 5 (no tests) fails.
test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

# Rerun verify and train and rewrite the README's measured blocks.
readme: install
	$(BIN)/python tools/readme.py --write

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check jax_batchinhib
