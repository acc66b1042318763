# Two commands on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: here `torch==2.13.0` resolves to the local CPU wheel. On a GPU machine
# use e.g. `make install TORCH_SPEC=torch`; elsewhere, add your CPU index with TORCH_PIP_ARGS.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: install chromium demo test test-slow test-min bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install $(TORCH_SPEC) $(TORCH_PIP_ARGS) 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -W ignore -c "import torch"  # fails if the wheel did not install; quiet about numpy, which comes next
	$(PIP) install -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import instructrl, transformers, accelerate, pytest, hypothesis"
	touch $@

install: $(VENV)/.installed

demo: install  ## the whole pipeline on the built-in world: pretrain, SFT, collect, RM, PPO-ptx and PPO, eval, report
	$(BIN)/instructrl pipeline -c configs/default.yaml

bench: install  ## PPO's time split, episodes/s and peak memory, then the RM's K-way against pairwise throughput (runs/bench/)
	$(BIN)/instructrl bench
	$(BIN)/instructrl bench --stage rm

# Debian's chromium drives the feedback app's browser tests (Playwright never downloads a browser)
chromium:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)

test: install chromium  ## the whole default suite (slow end-to-end checks excluded)
	$(BIN)/python -m pytest -q

test-slow: install chromium  ## the slow end-to-end checks only
	$(BIN)/python -m pytest -q -m slow

# The lowest versions pyproject.toml allows (constraints/min.txt; torch is TORCH_SPEC's), in a venv of their own
MIN_VENV ?= .venv-min
test-min: chromium  ## the default suite against the lowest declared versions: do the lower bounds still hold?
	rm -rf $(MIN_VENV) && $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip -q --disable-pip-version-check install $(TORCH_SPEC) $(TORCH_PIP_ARGS) 2>&1 | grep -v "is ignored" || true
	$(MIN_VENV)/bin/python -m pip -q --disable-pip-version-check install -c constraints/min.txt -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(MIN_VENV)/bin/python -m pip check
	$(MIN_VENV)/bin/python -m pytest -q

clean:
	rm -rf runs/smoke runs/test
