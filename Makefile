# `make serve` and `make test` work on a fresh clone: each sets up ./.venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

serve: setup
	CROSSVIT_ALLOW_RANDOM_WEIGHTS=$${CROSSVIT_ALLOW_RANDOM_WEIGHTS:-true} $(VENV)/bin/crossvit-serve

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/model_speed.py

lint: setup
	$(VENV)/bin/ruff check model service weights client tests bench
	$(VENV)/bin/mypy model service weights client

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
