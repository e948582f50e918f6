# Both entry points bootstrap .venv on first use, so a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact dependency set make venv installs and CI tests (hashes checked); `make lock` refreshes it.
LOCK := requirements.lock
EXTRAS := test,splade,onnx,fleet,e5,docs
# Where the CPU build of torch lies (torch==2.13.0+cpu is not on PyPI): a local wheel dir or a find-links page.
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch)
# Keep Prefect's database and results out of the home directory for the demo and tests.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

# Three workers on two cores: while one waits on a lease, a server or a subprocess, two compute.
# Each test file stays on one worker (its module fixtures start once). TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 3
# The fast tier only computes (no server, no subprocess): one worker per core.
FAST_WORKERS ?= 2
comma := ,

.PHONY: demo test test-fast docs venv lock clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Exactly the lock, every file checked against its hash; then the project itself, resolving nothing.
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Refresh the lock deliberately (after a pyproject change, or to take upstream fixes), then run make test.
# Resolved for CPython 3.11 on x86-64 Linux, with the CPU build of torch.
lock:
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --extra $(subst $(comma), --extra ,$(EXTRAS)) \
		--find-links $(TORCH_FIND_LINKS) --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--generate-hashes --no-header -o $(LOCK)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/embed-collections run --input examples/sample_collection --queries examples/queries.jsonl \
		--qrels examples/qrels.tsv --output-dir output/demo

test: $(STAMP)
	$(BIN)/ruff check embedder tasks flows deployments tests bench docs
	$(BIN)/mypy embedder tasks flows deployments
	$(MAKE) docs
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The inner loop: the library's unit and model tests, no Prefect server, worker or CLI subprocess
# (those carry the `slow` or `live` mark).
test-fast: $(STAMP)
	$(BIN)/ruff check embedder tasks flows deployments tests bench docs
	$(BIN)/python -m pytest -q -n $(FAST_WORKERS) --dist loadfile -m "not slow and not live" tests/unit tests/models \
		--durations=10

# The documentation site: the reference pages generated from the code, then a strict build into site/.
docs: $(STAMP)
	$(BIN)/python docs/gen_reference.py
	$(BIN)/python bench/plot.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet


clean:
	rm -rf $(VENV) output .prefect site
