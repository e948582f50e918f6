# Both entry points bootstrap .venv on first use, so a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Keep Prefect's database and results out of the home directory for the demo and tests.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

# Two workers: most of the slow tests wait on servers, leases and subprocesses rather than compute.
# Each test file stays on one worker (its module fixtures start once). TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on disk; anything unpinned would pull a CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,splade,onnx,fleet,e5]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/embed-collections run --input examples/sample_collection --queries examples/queries.jsonl \
		--qrels examples/qrels.tsv --output-dir output/demo

test: $(STAMP)
	$(BIN)/ruff check embedder tasks flows deployments tests bench
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15


clean:
	rm -rf $(VENV) output .prefect
