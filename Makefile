# Two commands for a new user: `make demo` and `make test`. Both set everything up first.
# Set-up is idempotent (stamp files) and offline-safe (pinned packages from the local index).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.msclip-installed
# Immediate assignment: the moment make started, before any set-up, so the demo's time budget covers it.
STARTED := $(shell date +%s)

.PHONY: setup data test demo bench clean-venv help

help:
	@echo "make demo   - set up, then run the end-to-end demo"
	@echo "make test   - set up, then run the test suite"
	@echo "make bench  - set up, then run the CPU/GPU benchmarks"

$(STAMP): requirements.txt pyproject.toml
	bash scripts/setup_env.sh "$(PY)" "$(VENV)"
	@touch $(STAMP)

setup: $(STAMP) data

# Cheap when the packages are present (dpkg check only), so it runs every time.
data:
	@bash scripts/setup_data.sh

test: setup
	$(VPY) -m pytest -q tests

demo: setup
	$(VPY) -m msclip.demo --budget-min 9.3 --started-at $(STARTED)

bench: setup
	$(VPY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
