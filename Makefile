# The README's commands. Each target sets up what it needs on a fresh machine: a virtual environment
# .venv with torch from this machine's local wheels, and the one CMake build, driven by setup.py, in
# build/cmake: the library and _C in torch_ext/retrieval_attention, the C++ tests and example beside
# (incremental: a second run compiles nothing unchanged).
#
#   make test            build, then the whole test suite on the same binaries: pytest and ctest
#   make demo            the main job: a small LM trained with and without the block (DEMO_ARGS=...)
#   make demo-gate       the gate alone on "Harry Potter dropped his wand"
#   make bench           CPU (and GPU where present) benchmarks
#   make build           only the build
#   make test-cpp        only ctest (the C++ tests and example)
#   make test-asan       the same build with RA_SANITIZE (AddressSanitizer + UBSan), CPU only, in build/asan:
#                        the CPU tests and ctest; any sanitizer report fails it
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

CMAKE_BUILD := build/cmake
# The C++ tests and example too; a pip install builds neither.
CMAKE_DEV_ARGS := -DRA_BUILD_TESTS=ON -DRA_BUILD_EXAMPLES=ON $(CMAKE_ARGS)
RUN := PYTHONPATH=$(CURDIR)/torch_ext $(PY)
# The ctest of the CMake that configured a build directory (the venv's cmake package or the system's).
CTEST := "$$(sed -n 's/^CMAKE_CTEST_COMMAND:INTERNAL=//p' CMakeCache.txt)" \
	--output-on-failure --parallel $(MAX_JOBS) --output-junit ctest.xml
GTEST := dpkg -s googletest libgtest-dev >/dev/null 2>&1 || \
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq googletest libgtest-dev)

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

# Always run: CMake and ninja decide what is out of date, in about a second when nothing is.
build: $(ENV_STAMP)
	@$(GTEST)
	CMAKE_ARGS="$(CMAKE_DEV_ARGS)" $(PY) setup.py -q build_ext --inplace --build-temp $(CMAKE_BUILD)

test: test-python test-cpp

test-python: build
	$(RUN) -m pytest tests $(PYTEST_ARGS)

test-cpp: build
	cd $(CMAKE_BUILD) && $(CTEST)

# The sanitizer build (RA_SANITIZE: -fsanitize=address,undefined, -O1 -g1), CPU only, in build/asan: the
# library and _C in build/asan/lib beside a copy of the package's Python, the C++ tests in build/asan.
# Python is not instrumented, so the ASan runtime is preloaded, with libstdc++: else ASan finds no
# __cxa_throw to wrap and aborts at the first C++ exception.
ASAN_BUILD := build/asan
ASAN_LIB := $(ASAN_BUILD)/lib
ASAN_PY := $(patsubst torch_ext/%,$(ASAN_LIB)/%,$(wildcard torch_ext/retrieval_attention/*.py))
ASAN_LOGS := $(ASAN_BUILD)/logs
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

$(ASAN_LIB)/%.py: torch_ext/%.py
	@mkdir -p $(dir $@)
	cp $< $@

build-asan: $(ENV_STAMP) $(ASAN_PY)
	@$(GTEST)
	RA_SANITIZE=1 FORCE_CUDA=0 CMAKE_ARGS="$(CMAKE_DEV_ARGS)" \
		$(PY) setup.py -q build_ext --build-lib $(ASAN_LIB) --build-temp $(ASAN_BUILD)

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
	(cd $(ASAN_BUILD) && $(CTEST)) || status=1; \
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
	$(RUN) benchmarks/bench_layer.py
	$(RUN) benchmarks/bench_projection.py
	$(RUN) benchmarks/bench_sharded.py
	$(RUN) benchmarks/bench_decode.py
	$(RUN) benchmarks/fp8_error.py

lint: $(ENV_STAMP)
	@command -v clang-format >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-format)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	clang-format --dry-run --Werror $$(find csrc tests/cpp examples -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

clean:
	rm -rf build torch_ext/retrieval_attention/_C*.so torch_ext/retrieval_attention/libretrieval_attention*.so

# Property-based tests, long profile (the CI runs them in their bounded "ci" profile).
fuzz-long: build
	RA_FUZZ_PROFILE=long $(RUN) -m pytest tests/test_gate_properties.py tests/test_ngram_hash.py -k property -q \
		--hypothesis-show-statistics $(PYTEST_ARGS)
