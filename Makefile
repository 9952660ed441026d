# Fresh-machine entry points: `make test` (tests) and, with the secure runtime, `make demo`.
# Outside this machine, point pip at PyTorch's CPU wheels without editing this file:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make install
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast clean-venv

install: $(STAMP)

# Re-runs only when the dependency list changes; every step is idempotent.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps crypten==0.4.1
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not faults and not fuzz" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# `make demo`: secure inference end to end on the shipped plan and images (scripts/demo.py), checked
# against plaintext. Override the inputs, or add flags, e.g. DEMO_ARGS="--batch-size 1".
DEMO_PLAN   ?= demo/model.plan
DEMO_IMAGES ?= demo/images
DEMO_ARGS   ?=

.PHONY: demo
demo: install
	$(PY) scripts/demo.py --plan $(DEMO_PLAN) --images $(DEMO_IMAGES) $(DEMO_ARGS)
