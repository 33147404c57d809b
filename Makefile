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

# The demo's work is bounded so that it takes under 4 minutes even where bf16 runs emulated (an
# AVX2-only EPYC: bf16 7x slower than fp32; the demo took 8.4 minutes there). Its cost is bf16
# images: compare, its localisation and each of its six fix trials run every input (4 built-in
# photos, not the default 10), and bench runs 16 calls a batch size (1 and 4 with 1 s windows,
# not 1, 2, 4, 8 with 2 s: 80 images, not 240). The report still says what bf16 costs here.
DEMO_INPUTS := $(VENV)/demo-inputs
demo: $(STAMP)
	$(BIN)/python -c "import pathlib, vitport.inputs as i; d = pathlib.Path('$(DEMO_INPUTS)'); \
	d.mkdir(parents=True, exist_ok=True); \
	[im.image.save(d / (im.name.split(':')[-1] + '.png')) for im in i.sample_images(4)]"
	$(BIN)/vitport report $(DEMO_INPUTS) --model demo:dinov2-small --device auto --dtype bf16 \
	  --batch-sizes 1,4 --min-seconds 1 --out report/demo-dinov2-small --overwrite

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
