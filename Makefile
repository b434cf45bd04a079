# tidlq: `make run` and `make test` are all a fresh machine needs (README, Quick start).
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint bench clean

# torch 2.13.0 first: the CPU build from this machine's disk. A bare `torch` or a wide range would pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/tidlq run -p params.yaml

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check flows tasks tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/cached_rerun.py

clean:
	rm -rf outputs .pytest_cache
