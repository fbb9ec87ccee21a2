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
# llama.cpp's GGUF converter for tests/test_gguf_pipeline.py, unpacked (not built) from the
# llama-cpp-python sdist on PyPI; the version is LLAMA_CPP_PYTHON_VERSION in that file.
LLAMA_CPP := .cache/llama.cpp
LLAMA_CPP_STAMP := $(LLAMA_CPP)/.unpacked
LINTED := src tests benchmarks examples fuzz

.PHONY: install demo test lint bench bench-suite clean

install: $(STAMP) $(LLAMA_CPP_STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_OPTIONS)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,dev]"
	touch $(STAMP)

$(LLAMA_CPP_STAMP): tests/support/llama_cpp.py | $(STAMP)
	$(BIN)/python tests/support/llama_cpp.py fetch $(LLAMA_CPP)
	touch $(LLAMA_CPP_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/build_tiny_model.py .demo
	$(BIN)/lora-merge .demo/base .demo/adapter .demo/merged --overwrite
	$(BIN)/python examples/compare_with_peft.py .demo

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

test: lint $(LLAMA_CPP_STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py

bench-suite: $(STAMP)
	$(BIN)/python benchmarks/bench_suite.py

clean:
	rm -rf .demo .bench .cache .pytest_cache .ruff_cache .mypy_cache
