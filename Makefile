# `make run` and `make test` need only Python 3.11+ and make.
SHELL := /bin/bash
VENV ?= .venv
# The first Python 3.11+ found; override with `make PYTHON=python3.12 run`.
PYTHON ?= $(shell for p in python3.12 python3.11 python3 python3.13 python3.14; do \
	  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	  && { echo $$p; break; }; done)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench docs install clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 or newer is needed (none found on PATH)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gateway up

# Other people's clients, as they are (tests/node): Trigger.dev's SDK and
# standardwebhooks, pinned by package-lock.json and installed with npm ci.
# Where npm is missing their tests skip (and fail under CI=true).
NODE_STAMP := tests/node/node_modules/.installed
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd tests/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "make: no npm here: the tests of Trigger.dev's SDK will skip"; fi

# First the unit tests (no Redis, no processes: seconds), then the suites over
# real processes in three pytest processes, a test file each at a time (the
# tests mostly wait on processes and sockets, so three fit two cores): each has
# its own Redis, databases, stacks and browser, so they never share state.
# TEST_WORKERS=0 runs those in one process.
TEST_WORKERS ?= 3
test: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest tests/unit -q
	$(BIN)/python -m pytest --ignore=tests/unit $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# The gateway beside raw arq, on SQLite, and on PostgreSQL too when
# BENCH_DATABASE_URL names a server; prints a table, writes docs/bench.png.
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[server,test,bench]'
	@touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The documentation site, from docs/ into site/. The API reference and the
# configuration page are made from the code as it builds (docs/hooks.py);
# --strict makes a broken link or a page left out of the nav an error.
$(VENV)/.docs-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[server,docs]'
	@touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: $(STAMP)
	$(BIN)/ruff check gateway jobs webhooks db tests bench docs
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
