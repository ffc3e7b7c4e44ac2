# Two commands on a fresh machine:  `make train` (the main job)  and  `make test` (the whole suite).
# Both create .venv on first use: torch 2.13.0 (CPU wheel) first, so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# Three pytest workers: the Ray integration tests in two lanes, one on each of two, the other test
# files on the third (tests/conftest.py says why). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3

.PHONY: train test eval clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

train: $(VENV)/.installed
	$(PY) -m trainers.train $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(ARGS)

clean:
	rm -rf runs mlruns.db mlartifacts .cache/itmatch
