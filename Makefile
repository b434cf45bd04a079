# tidlq: `make run` and `make test` are all a fresh machine needs (README, Quick start).
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint bench zoo-deps clean stack-up stack-down deploy worker repro dvc-remote results-storage

# Deployments (prefect.yaml) on a process work pool; the nightly schedule is a cron string in UTC.
WORK_POOL    ?= tidlq-local
NIGHTLY_CRON ?= 0 3 * * *
export TIDLQ_PROJECT_DIR = $(CURDIR)
export TIDLQ_WORK_POOL = $(WORK_POOL)
export TIDLQ_NIGHTLY_CRON = $(NIGHTLY_CRON)

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

# torchvision's model definitions for benchmarks/zoo.py and autopilot_memory.py (never a tidlq dependency): the
# wheel is a CUDA build whose C ops do not load against the CPU torch, so --no-deps keeps pip off torch.
zoo-deps: $(STAMP)
	$(BIN)/pip install -q --no-deps torchvision==0.28.0

lint: $(STAMP)
	$(BIN)/ruff check flows tidlq infra tests benchmarks

# Every benchmark, one after another (about 20 min on 2 idle cores); each prints its table and writes
# benchmarks/results/<name>.json. benchmarks/README.md has the latest numbers.
bench: $(STAMP)
	$(BIN)/python benchmarks/cached_rerun.py
	$(BIN)/python benchmarks/cold_run.py --keep outputs/bench/mobilenet_v2_tiny
	$(BIN)/python benchmarks/ort_latency.py --run-dir outputs/bench/mobilenet_v2_tiny
	$(BIN)/python benchmarks/observer_overhead.py
	$(BIN)/python benchmarks/peer_baseline.py
	$(BIN)/python benchmarks/tracking_overhead.py
	$(BIN)/python benchmarks/nightly_scaling.py

# The local stack: SeaweedFS (S3), MLflow and Prefect servers on 127.0.0.1; then `source .stack/env`.
stack-up: $(STAMP)
	$(BIN)/tidlq stack up

stack-down: $(STAMP)
	$(BIN)/tidlq stack down

# Needs PREFECT_API_URL (source .stack/env): creates the work pool if missing and deploys quantize/adhoc and /nightly.
deploy: $(STAMP)
	$(BIN)/prefect work-pool inspect $(WORK_POOL) >/dev/null 2>&1 || $(BIN)/prefect work-pool create $(WORK_POOL) --type process
	$(BIN)/prefect --no-prompt deploy --all

# Prefect result storage in the stack's S3 (prints the setting workers need): source .stack/env first.
results-storage: $(STAMP)
	$(BIN)/tidlq results-storage

worker: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/prefect worker start --pool $(WORK_POOL)

# Point DVC's remote (s3://tidlq/dvc in .dvc/config) at the local stack: endpoint and keys go to .dvc/config.local,
# which git ignores. Needs the stack's environment: source .stack/env
dvc-remote: $(STAMP)
	$(BIN)/dvc remote modify --local storage endpointurl "$$AWS_ENDPOINT_URL"
	$(BIN)/dvc remote modify --local storage access_key_id "$$AWS_ACCESS_KEY_ID"
	$(BIN)/dvc remote modify --local storage secret_access_key "$$AWS_SECRET_ACCESS_KEY"

# dvc repro with the venv's tidlq on PATH
repro: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

clean:
	rm -rf outputs .pytest_cache
