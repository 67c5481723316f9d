# Servo: `make demo` trains and serves the digits model; `make test` runs lint, types and tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= .servo-demo

.PHONY: venv demo test lint typecheck imports pytest bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/servo demo --dir $(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check serving monitors registry retrain servo tests benchmarks
	$(VENV)/bin/ruff format --check serving monitors registry retrain servo tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

imports: $(STAMP)
	$(VENV)/bin/lint-imports

pytest: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck imports pytest

bench: $(STAMP)
	$(PY) benchmarks/serving.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .mypy_cache .pytest_cache .ruff_cache
