# The README's commands. Everything runs from a local virtualenv made here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Tests use their own database number; the demo uses its own (see example_project).
TEST_REDIS_URL ?= $(or $(REDIS_URL),redis://127.0.0.1:6379/15)
PYTEST_ARGS ?= --durations=15

.PHONY: help install demo test lint unit integration bench soak clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed  ## make .venv and install the package with its test extras

demo: $(BIN)/.installed  ## run the example shop end to end on affinity workers (starts a private Redis if none answers)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

lint: $(BIN)/.installed  ## ruff and mypy --strict
	$(BIN)/ruff check celery_partitioning tests benchmarks example_project scripts
	$(BIN)/mypy celery_partitioning

test: lint  ## lint, then the whole suite against a real Redis (a private one is started if none answers)
	$(BIN)/python -m celery_partitioning.embedded --url "$(TEST_REDIS_URL)" -- \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(BIN)/.installed  ## only the tests that need no broker
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

bench: $(BIN)/.installed  ## benchmarks against plain Celery in the same run (see benchmarks/README.md)
	$(BIN)/python -m celery_partitioning.embedded --url "$(TEST_REDIS_URL)" -- \
		$(BIN)/python benchmarks/run_all.py

soak: $(BIN)/.installed  ## the reliability suite at full size (minutes)
	$(BIN)/python -m celery_partitioning.embedded --url "$(TEST_REDIS_URL)" -- \
		env CP_SOAK=1 $(BIN)/python -m pytest tests/reliability $(PYTEST_ARGS)

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
