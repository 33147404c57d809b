# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	# AtomGit's own client, which tests check vitport against; it pins huggingface-hub==1.1.7,
	# which transformers cannot import, so it comes without its pins (its other needs are in dev)
	$(BIN)/python -m pip install -q --no-deps "atomgit==1.0.17"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vitport report --model demo:dinov2-small --device auto --dtype bf16 --out report/demo-dinov2-small --overwrite

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)

# two xdist workers (two cores); a file's tests run on one worker, so its module fixtures (a
# server, dumps, converted models) are made once
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile

test: lint
	$(PYTEST)

# the inner loop: everything but the tests marked slow (clusters, servers, CLI subprocesses)
test-fast: lint
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
