# `make serve` and `make test` work on a fresh clone: each sets up ./.venv first, from the lock.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --disable-pip-version-check -q
# `make lock` resolves with this uv, installed into its own folder (build/ is ignored by git)
UV_VERSION := 0.13.9
LOCK_TOOL := build/lock-tool
UV := $(LOCK_TOOL)/bin/uv

.PHONY: setup serve test bench lint lock image-test clean

setup: $(STAMP)

# Exactly the lock (the pinned pip, then every pin hash-checked with nothing resolved: requirements/install.py),
# then the project itself without resolving anything more.
$(STAMP): pyproject.toml requirements/dev.txt requirements/pip.txt requirements/install.py
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) requirements/install.py requirements/dev.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

serve: setup
	CROSSVIT_ALLOW_RANDOM_WEIGHTS=$${CROSSVIT_ALLOW_RANDOM_WEIGHTS:-true} $(VENV)/bin/crossvit-serve

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/model_speed.py

lint: setup
	$(VENV)/bin/ruff check model service weights client tests bench requirements deploy
	$(VENV)/bin/mypy model service weights client deploy/image_test.py requirements/lock.py requirements/install.py

# Regenerate requirements/*.txt from pyproject.toml (after editing dependencies, or after a merge).
lock: $(UV)
	$(PYTHON) requirements/lock.py --uv $(UV)

$(UV):
	$(PYTHON) -m venv $(LOCK_TOOL)
	$(LOCK_TOOL)/bin/pip install --disable-pip-version-check -q uv==$(UV_VERSION)

# Build the CPU image and run it under docker and docker compose (deploy/image_test.py); as root.
image-test: setup
	$(PY) deploy/image_test.py

clean:
	rm -rf $(VENV) $(LOCK_TOOL) .pytest_cache .mypy_cache .ruff_cache
