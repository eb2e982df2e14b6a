# The README's commands. Each target sets up what it needs on a fresh machine:
# a virtual environment .venv with torch from this machine's local wheels, the
# extension built in place (incrementally: a second run rebuilds nothing unchanged).
#
#   make test            build, then the whole test suite: pytest and the C++ tests (ctest)
#   make demo            the main job: a small LM trained with and without the block (DEMO_ARGS=...)
#   make demo-gate       the gate alone on "Harry Potter dropped his wand"
#   make bench           CPU (and GPU where present) benchmarks
#   make build           only the extension
#   make test-asan       the C++ under AddressSanitizer + UBSan (a CPU-only copy in build/asan and
#                        build/cmake-asan): the CPU tests and ctest; any sanitizer report fails it
#   make fuzz-long       the property tests (hypothesis) in their long profile: >= 10,000 examples each
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

.PHONY: setup build test test-python test-cpp demo demo-gate bench lint clean build-asan test-asan fuzz-long

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

# The sanitizer build (RA_SANITIZE: -fsanitize=address,undefined, -O1 -g1), CPU only, apart from the
# normal one: the extension in build/asan/lib beside a copy of the package's Python, the C++ library
# and its tests in build/cmake-asan. Python is not instrumented, so the ASan runtime is preloaded,
# with libstdc++: else ASan finds no __cxa_throw to wrap and aborts at the first C++ exception.
ASAN_LIB := build/asan/lib
ASAN_PACKAGE := $(ASAN_LIB)/retrieval_attention
ASAN_EXTENSION = $(ASAN_PACKAGE)/_C$(EXT_SUFFIX)
ASAN_PY := $(patsubst torch_ext/%,$(ASAN_LIB)/%,$(wildcard torch_ext/retrieval_attention/*.py))
CMAKE_ASAN_BUILD := build/cmake-asan
ASAN_LOGS := build/asan/logs
# detect_leaks=0 for Python: the interpreter and torch keep objects and registries alive until exit by
# design, which LeakSanitizer reports. The C++ tests (ctest) keep the leak check.
# protect_shadow_gap=0: where a GPU is present the CUDA driver maps memory in ASan's shadow gap.
# An ASan report ends its process and goes to a file in build/asan/logs: the target fails if any is
# there, so a report in a subprocess whose exit a test tolerates still counts. A UBSan report
# (-fno-sanitize-recover) ends its process too, on stderr: GCC's UBSan beside ASan ignores log_path.
ASAN_OPTS := protect_shadow_gap=0:halt_on_error=1:log_path=$(CURDIR)/$(ASAN_LOGS)/asan
UBSAN_ENV := UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# Not run under ASan, each for its reason:
#   test_distributed.py: its worker processes put torch_ext/ first on PYTHONPATH, so they would
#     load the in-place, unsanitized library rather than this one
ASAN_PYTEST_EXCLUDE := --ignore=tests/test_distributed.py

$(ASAN_EXTENSION): $(ENV_STAMP) $(SOURCES)
	RA_SANITIZE=1 FORCE_CUDA=0 $(PY) setup.py build_ext --build-lib $(ASAN_LIB) --build-temp build/asan/tmp
	touch $@

$(ASAN_PACKAGE)/%.py: torch_ext/retrieval_attention/%.py
	@mkdir -p $(dir $@)
	cp $< $@

$(CMAKE_ASAN_BUILD)/CMakeCache.txt: $(ENV_STAMP) CMakeLists.txt
	@dpkg -s googletest libgtest-dev >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq googletest libgtest-dev)
	cmake -S . -B $(CMAKE_ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DRA_SANITIZE=ON -DRA_WITH_CUDA=OFF \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"

# The build runs test_gate once (GoogleTest discovery), hence the sanitizer options here too.
build-asan: $(ASAN_EXTENSION) $(ASAN_PY) $(CMAKE_ASAN_BUILD)/CMakeCache.txt
	ASAN_OPTIONS=detect_leaks=1:$(ASAN_OPTS) $(UBSAN_ENV) cmake --build $(CMAKE_ASAN_BUILD) --parallel $(MAX_JOBS)

# Runs pytest (CPU tests; the CUDA ones skip) and ctest, both to the end, then fails on any failure
# or any sanitizer report.
test-asan: build-asan
	@rm -rf $(ASAN_LOGS) && mkdir -p $(ASAN_LOGS)
	@export ASAN_OPTIONS=detect_leaks=0:$(ASAN_OPTS) $(UBSAN_ENV) RA_ASAN_LIB=$(CURDIR)/$(ASAN_LIB) \
		PYTHONPATH=$(CURDIR)/$(ASAN_LIB):$(CURDIR)/tests:$(CURDIR)/scripts \
		LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so):$$($(CXX) -print-file-name=libstdc++.so)"; \
	status=0; set -x; \
	$(PY) -c 'import retrieval_attention._C as c; print("sanitized build:", c.__file__)' || status=1; \
	$(PY) -m pytest tests -p asan_pytest_plugin -o pythonpath="$(CURDIR)/$(ASAN_LIB) $(CURDIR)/tests" \
		$(ASAN_PYTEST_EXCLUDE) $(ASAN_PYTEST_ARGS) || status=1; \
	unset LD_PRELOAD; export ASAN_OPTIONS=detect_leaks=1:$(ASAN_OPTS); \
	(cd $(CMAKE_ASAN_BUILD) && ctest --output-on-failure --output-junit ctest.xml) || status=1; \
	set +x; \
	for log in $(ASAN_LOGS)/*; do [ -f "$$log" ] || continue; status=1; echo "== sanitizer report $$log"; cat "$$log"; done; \
	[ $$status -eq 0 ] && echo "test-asan: no failure, no sanitizer report" || echo "test-asan: FAILED"; \
	exit $$status

demo: build
	$(RUN) examples/train_lm.py $(DEMO_ARGS)

demo-gate: build
	$(RUN) examples/harry_potter.py

bench: build
	$(RUN) benchmarks/bench_gate.py

lint: $(ENV_STAMP)
	@command -v clang-format >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-format)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	clang-format --dry-run --Werror $$(find csrc tests/cpp examples -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

clean:
	rm -rf build torch_ext/retrieval_attention/_C*.so

# Property-based tests, long profile (the CI runs tests/test_fuzz.py in its bounded "ci" profile).
fuzz-long: build
	RA_FUZZ_PROFILE=long $(RUN) -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics $(PYTEST_ARGS)
