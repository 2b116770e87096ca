# Set-up and test entry points. Each target installs what it needs into a local venv first.
#
# torch is installed alone and first, pinned: a bare `torch` requirement would make pip pick the
# newest release, a multi-GB CUDA build, while 2.13.0 resolves to the CPU build on these machines.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
VENV_517 := .venv-517
# Tests run against transformers 5.17.0 as well: the surface (generate, pipeline, Hub folder) and
# greedy equivalence. $(wildcard) keeps the target working while a listed file does not exist yet.
TESTS_517 := $(wildcard tests/test_surface_*.py tests/test_greedy_equivalence.py)

export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: quickstart test test-517 clean

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH)
	$(VENV)/bin/pip install -e ".[test]"
	touch $@

$(VENV_517)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_517)
	$(VENV_517)/bin/pip install $(TORCH)
	$(VENV_517)/bin/pip install -e ".[test]" "transformers==5.17.0"
	touch $@

quickstart: $(VENV)/installed
	$(VENV)/bin/python examples/quickstart.py

test: $(VENV)/installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

test-517: $(VENV_517)/installed
	$(if $(TESTS_517),,$(error no test files match TESTS_517))
	HF_HUB_OFFLINE=1 $(VENV_517)/bin/python -m pytest $(TESTS_517)

clean:
	rm -rf $(VENV) $(VENV_517) *.egg-info
