# The README's commands. Each target sets up what it needs on a fresh machine:
# a virtual environment .venv with torch from this machine's local wheels, the
# extension built in place (incrementally: a second run rebuilds nothing unchanged).
#
#   make test            build, then the whole test suite: pytest and the C++ tests (ctest)
#   make demo            the main job
#   make bench           CPU (and GPU where present) benchmarks
#   make build           only the extension
#   make lint            ruff and clang-format checks
#
# PYTHON=/path/to/python  use that interpreter (which already has torch) instead of .venv
# TORCH_SPEC=...          the torch the venv gets (default torch==2.14.1, the CUDA 13 build)

SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

ifdef PYTHON
PY := $(PYTHON)
ENV_STAMP := build/.env-$(subst /,_,$(PYTHON))
else
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.installed
endif

EXT_SUFFIX = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
EXTENSION = torch_ext/retrieval_attention/_C$(EXT_SUFFIX)
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py \
	torch_ext/retrieval_attention/_version.py
CMAKE_BUILD := build/cmake
RUN := PYTHONPATH=$(CURDIR)/torch_ext $(PY)

.PHONY: setup build test test-python test-cpp demo bench lint clean

# The environment: a venv with torch and the dev requirements, or a check of the given Python.
$(ENV_STAMP): requirements-dev.txt
	@mkdir -p $(dir $@)
ifdef PYTHON
	$(PY) -c "import torch; print('using', torch.__version__)"
	$(PY) -m pip install -r requirements-dev.txt || echo "pip could not install requirements-dev.txt; using what is there"
else
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" -r requirements-dev.txt
endif
	touch $@

setup: $(ENV_STAMP)

$(EXTENSION): $(ENV_STAMP) $(SOURCES)
	$(PY) setup.py build_ext --inplace
	touch $@

build: $(EXTENSION)

test: test-python test-cpp

test-python: build
	$(RUN) -m pytest tests $(PYTEST_ARGS)

# GoogleTest from Debian; cmake finds LibTorch through torch's own CMake config.
$(CMAKE_BUILD)/CMakeCache.txt: $(ENV_STAMP) CMakeLists.txt
	@dpkg -s googletest libgtest-dev >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq googletest libgtest-dev)
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"

test-cpp: $(CMAKE_BUILD)/CMakeCache.txt
	cmake --build $(CMAKE_BUILD) --parallel $(MAX_JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure --output-junit ctest.xml

demo: build
	$(RUN) examples/harry_potter.py

bench: build
	$(RUN) benchmarks/bench_gate.py

lint: $(ENV_STAMP)
	@command -v clang-format >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-format)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	clang-format --dry-run --Werror $$(find csrc tests/cpp -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

clean:
	rm -rf build torch_ext/retrieval_attention/_C*.so
