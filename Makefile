# The README's commands. Everything runs from a local virtualenv made here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Tests use their own database number; the demo uses its own (see example_project).
TEST_REDIS_URL ?= $(or $(REDIS_URL),redis://127.0.0.1:6379/15)
PYTEST_ARGS ?= --durations=15

.PHONY: help install lock demo test lint unit integration bench soak compat newest clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

#: The development environment is locked: .venv holds exactly what requirements/dev.txt names.
LOCK := requirements/dev.txt

$(BIN)/.installed: setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$$(grep -m1 '^pip==' $(LOCK))"
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed  ## make .venv from the lock: the package (editable), its extras, test and lint tools

lock: $(BIN)/.installed  ## re-resolve requirements/dev.txt from setup.cfg and requirements/dev.in (newest allowed)
	$(BIN)/uv pip compile setup.cfg requirements/dev.in --all-extras --universal \
		--python-version 3.11 --no-header --upgrade -o $(LOCK)
	@echo "lock: $(LOCK) rewritten; run 'make install' to apply it, then 'make test'"

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

#: The oldest Celery and kombu setup.cfg allows, in a virtualenv of their own.
OLDEST_VENV ?= .venv-oldest
COMPAT_TESTS ?= tests/test_layering.py tests/test_routing.py tests/test_binding.py tests/test_retry.py \
	tests/test_worker_guards.py tests/test_worker_parts.py tests/test_worker_ordering.py \
	tests/test_retry_integration.py tests/test_worker_stop.py tests/test_worker_toolbox.py \
	tests/test_inprocess_worker.py tests/test_publish_many.py

$(OLDEST_VENV)/bin/.installed: setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	grep -vE '^(celery|kombu)==' $(LOCK) > $(OLDEST_VENV)/constraints.txt
	$(OLDEST_VENV)/bin/python -m pip install -q -c $(OLDEST_VENV)/constraints.txt \
		-e ".[test,django,embedded]" "celery==5.4.0" "kombu==5.4.0"
	touch $@

compat: $(BIN)/.installed $(OLDEST_VENV)/bin/.installed  ## the worker guarantees on the oldest supported Celery/kombu (5.4)
	$(OLDEST_VENV)/bin/python -c "import celery, kombu; print('compat: celery', celery.__version__, 'kombu', kombu.__version__)"
	$(BIN)/python -m celery_partitioning.embedded --url "$(TEST_REDIS_URL)" -- \
		$(OLDEST_VENV)/bin/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

#: The newest releases on the index of what breaks us most often, upgraded on every run.
NEWEST_VENV ?= .venv-newest
NEWEST_PACKAGES ?= celery kombu redis django mypy ruff pytest

newest: $(BIN)/.installed  ## lint and the worker guarantees on the newest celery, kombu, redis-py, Django, mypy, ruff
	test -x $(NEWEST_VENV)/bin/python || $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		-e ".[test,django,embedded]" $(NEWEST_PACKAGES)
	$(NEWEST_VENV)/bin/python -m pip list --format freeze 2>/dev/null \
		| grep -iE '^($(subst $() ,|,$(NEWEST_PACKAGES)))==' | sed 's/^/newest: /'
	$(NEWEST_VENV)/bin/ruff check celery_partitioning tests benchmarks example_project scripts
	$(NEWEST_VENV)/bin/mypy celery_partitioning
	$(BIN)/python -m celery_partitioning.embedded --url "$(TEST_REDIS_URL)" -- \
		$(NEWEST_VENV)/bin/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

bench: $(BIN)/.installed  ## benchmarks against plain Celery in the same run (see benchmarks/README.md)
	$(BIN)/python -m celery_partitioning.embedded --url "$(TEST_REDIS_URL)" -- \
		$(BIN)/python benchmarks/run_all.py

soak: $(BIN)/.installed  ## the reliability suite at full size (minutes)
	$(BIN)/python -m celery_partitioning.embedded --url "$(TEST_REDIS_URL)" -- \
		env CP_SOAK=1 $(BIN)/python -m pytest tests/reliability tests/test_worker_resize.py $(PYTEST_ARGS)

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) $(OLDEST_VENV) $(NEWEST_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
