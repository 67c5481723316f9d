# Servo: `make demo` runs the whole loop (servo demo: train, serve, drift, retrain, canary,
# recovery; a table and DEMO_DIR/demo.png); `make test` installs what the tests
# need (scripts/test-deps.sh), then runs lint, types and tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= .servo-demo

.PHONY: venv deps system-deps demo test lint typecheck imports pytest bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests use (prometheus, wrk, curl, PostgreSQL server binaries), checked
# before the venv is made; then the Python extras the suite exercises and .tools/helm (the
# chart's tests). All are fast no-ops when everything is there; where they cannot install,
# they stop naming the command to run.
system-deps:
	@bash scripts/test-deps.sh system $(PYTHON)

deps: system-deps $(STAMP)
	@bash scripts/test-deps.sh python $(PY)
	@bash scripts/test-deps.sh helm

demo: $(STAMP)
	$(VENV)/bin/servo demo --dir $(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check serving monitors registry retrain servo tests benchmarks
	$(VENV)/bin/ruff format --check serving monitors registry retrain servo tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

imports: $(STAMP)
	$(VENV)/bin/lint-imports

pytest: deps
	$(VENV)/bin/pytest -q -n auto

test: deps lint typecheck imports pytest

bench: $(STAMP)
	$(PY) benchmarks/serving.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .mypy_cache .pytest_cache .ruff_cache
