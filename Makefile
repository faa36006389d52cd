# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch this project is built and tested against; override for another CUDA build or version.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# nvcc compiles the CUDA kernels even on machines without a GPU; set AUXFUSE_SKIP_CUDA=1 to skip them.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
PYTEST := $(PY) -m pytest -q

.PHONY: setup build demo test test-fast test-triton test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

# Rebuild the extension after editing csrc/ (ninja recompiles only what changed).
build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m auxfuse demo

# Everything CI runs: the unit tests, the Triton kernels in Triton's interpreter (a process of their own,
# since TRITON_INTERPRET must be set before triton is imported), and the slow tests.
test: build test-fast test-triton test-slow

test-fast:
	$(PYTEST) tests --ignore=tests/triton -m "not slow"

test-triton:
	TRITON_INTERPRET=1 $(PYTEST) tests/triton

test-slow:
	$(PYTEST) tests --ignore=tests/triton -m slow; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests selected"; rc=0; fi; exit $$rc

bench: build
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info auxfuse/_C*.so
