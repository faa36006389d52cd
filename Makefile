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
# `$(TIMED) stage command...` prints the command, runs it, then prints how long the stage took and keeps its exit
# status (CI's log shows where the time goes).
TIMED := sh -c 'echo "== $$0: $$*"; t0=$$(date +%s); "$$@"; rc=$$?; echo "== $$0: $$(($$(date +%s) - t0)) s"; exit $$rc'

.PHONY: setup build demo test test-fast test-triton test-slow bench clean

setup: $(VENV)/.installed

# The package is installed editable without its extension: `make build` compiles that, in place.
$(VENV)/.installed: pyproject.toml
	@$(TIMED) setup sh -c '$(PYTHON) -m venv $(VENV) && \
		$(PY) -m pip install -q --upgrade pip && \
		$(PY) -m pip install -q $(TORCH_SPEC) setuptools wheel ninja && \
		AUXFUSE_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e ".[test]"'
	touch $@

# Compiles the extension into auxfuse/ with a persistent build/ folder: nothing to do when nothing changed (the
# library is newer than every source, header and build switch), else ninja recompiles only the objects whose
# sources or included headers changed. torch runs the `ninja` on PATH: the venv's.
build: setup
	@PATH="$(abspath $(VENV))/bin:$$PATH" $(TIMED) build $(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m auxfuse demo

# Everything CI runs: the unit tests, the Triton kernels in Triton's interpreter (a process of their own,
# since TRITON_INTERPRET must be set before triton is imported), and the slow tests.
test: build test-fast test-triton test-slow

test-fast:
	@$(TIMED) test-fast $(PYTEST) tests --ignore=tests/triton -m "not slow"

test-triton:
	@TRITON_INTERPRET=1 $(TIMED) test-triton $(PYTEST) tests/triton

# pytest exits with 5 when no test is selected.
test-slow:
	@$(TIMED) test-slow sh -c '$(PYTEST) tests --ignore=tests/triton -m slow; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "no slow tests selected"; rc=0; fi; exit $$rc'

bench: build
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info auxfuse/_C*.so
