# The two commands a newcomer needs: `make demo` (the main job on the embedded testbed) and
# `make test`. Both run `make setup` first, which is idempotent and quick the second time.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FOGMIG := $(VENV)/bin/fogmig
# Never let the repository's own `platform/` folder shadow the standard library's `platform`.
export PYTHONSAFEPATH := 1

.PHONY: setup demo test unit system lint typecheck format clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(FOGMIG) demo

test: setup lint
	$(VENV)/bin/pytest -q tests/unit
	$(VENV)/bin/pytest -q -x tests/system

unit:
	$(VENV)/bin/pytest -q tests/unit

system:
	$(VENV)/bin/pytest -q tests/system

lint: typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of symlinks that
# mirrors the import root.
typecheck:
	@rm -rf .build/typecheck && mkdir -p .build/typecheck/fogmig
	@cp fogmig/__init__.py fogmig/py.typed .build/typecheck/fogmig/
	@for d in platform services device_sim policies experiments; do ln -s ../../../$$d .build/typecheck/fogmig/$$d; done
	cd .build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p fogmig

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	-$(FOGMIG) testbed down
	rm -rf .build
