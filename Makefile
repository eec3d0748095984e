# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EPOCHS ?= 6

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel this project is tested with: an unpinned torch pulls a multi-GB
# CUDA build. On a GPU machine, install your CUDA torch first and run `pip install -e .` instead.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'  # dev: pytest, s3fs + moto[server] (s3:// tests), lightning, torchdata, accelerate, ray
	@# the framework packages must run on the pinned CPU torch, never pull a CUDA build in its place
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch was replaced: ' + torch.__version__)"
	touch $@

# The main job end to end on generated HMDB-shaped data: make it, pack it, train on it.
demo: setup
	$(BIN)/make-sample-data data --classes 8 --clips-per-class 24
	$(BIN)/pack-shards data shards
	$(BIN)/train-stream --shards 'shards/<000..031>.tar' --model tiny --epochs $(EPOCHS)

test: setup
	$(BIN)/python -m pytest -q -n 2

# One formatter, one linter (configured in pyproject.toml).
lint: setup
	$(BIN)/ruff format --check pipeline tests benchmarks examples
	$(BIN)/ruff check pipeline tests benchmarks examples

bench: setup
	$(BIN)/python benchmarks/bench_pack.py
	$(BIN)/python benchmarks/bench_loaders.py
	$(BIN)/python benchmarks/bench_boundaries.py
	$(BIN)/python benchmarks/bench_s3.py

clean:
	rm -rf data runs bench-out
	find shards -mindepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +
