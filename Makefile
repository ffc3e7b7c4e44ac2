# Two commands on a fresh machine:  `make train` (the main job)  and  `make test` (the whole suite).
# Both create .venv on first use: torch 2.13.0 (CPU wheel) first, so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# Three pytest workers: the Ray integration tests in two lanes, one on each of two, the other test
# files on the third (tests/conftest.py says why). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3

.PHONY: train test eval clean gpu-wheels

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

# For bench/gpu_checks.py on a lent device machine (Python 3.12, torch, no network): the wheels of
# what the core library needs and its Python lacks, at this venv's versions, into .whl/ (carried).
GPU_WHEELS := pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions
gpu-wheels: $(VENV)/.installed
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    $$($(PY) -m pip freeze | grep -i -E '^($(GPU_WHEELS))==')
