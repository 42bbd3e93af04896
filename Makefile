# Two commands for a new user: `make demo` and `make test`. Both set everything up first.
# Set-up is idempotent (stamp files) and offline-safe (pinned packages from the local index).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.msclip-installed
# Immediate assignment: the moment make started, before any set-up, so the demo's time budget covers it.
STARTED := $(shell date +%s)

.PHONY: setup data test demo bench gpu-check clean-venv help

help:
	@echo "make demo   - set up, then run the end-to-end demo"
	@echo "make test   - set up, then run the test suite"
	@echo "make bench  - set up, then run the CPU/GPU benchmarks"
	@echo "make gpu-check - the GPU-only checks and benchmarks (on a CUDA machine)"

$(STAMP): requirements.txt pyproject.toml
	bash scripts/setup_env.sh "$(PY)" "$(VENV)"
	@touch $(STAMP)

setup: $(STAMP) data

# Cheap when the packages are present (dpkg check only), so it runs every time.
data:
	@bash scripts/setup_data.sh

# Two xdist workers, one per core (tests/conftest.py gives each worker its share of torch threads);
# worksteal keeps both busy when a long end-to-end test lands late.
test: setup
	$(VPY) -m pytest -q -n 2 --dist worksteal tests

demo: setup
	$(VPY) -m msclip.demo --budget-min 9.3 --started-at $(STARTED)

bench: setup
	$(VPY) benchmarks/run_all.py

# On a machine with a CUDA GPU (installs nothing; see benchmarks/README.md).
gpu-check:
	bash benchmarks/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
