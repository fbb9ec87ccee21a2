# One entry point for people and CI. `make demo` and `make test` set everything
# up themselves (a venv in .venv with a pinned torch), so they work on a fresh
# machine as pasted.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Extra pip options for torch alone. PyPI's Linux torch is the CUDA build (GBs of
# NVIDIA libraries); on a machine without an NVIDIA GPU the CPU build is enough:
#   make test TORCH_PIP_OPTIONS="--index-url https://download.pytorch.org/whl/cpu"
# (PyPI's macOS and Windows torch wheels are CPU builds already.)
TORCH_PIP_OPTIONS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINTED := src tests benchmarks examples fuzz

.PHONY: install demo test lint bench bench-suite clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_OPTIONS)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/build_tiny_model.py .demo
	$(BIN)/lora-merge .demo/base .demo/adapter .demo/merged --overwrite
	$(BIN)/python examples/compare_with_peft.py .demo

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py

bench-suite: $(STAMP)
	$(BIN)/python benchmarks/bench_suite.py

clean:
	rm -rf .demo .bench .pytest_cache .ruff_cache .mypy_cache
