# Two commands for a newcomer: `make demo` and `make test`. Both create the
# virtual environment, build the extension and then do their job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned here (a CPU build that installs from local disk); the package
# itself only asks for torch>=2.4.
TORCH_PIN := torch==2.13.0
BUILD_DEPS := "scikit-build-core>=0.11" "pybind11>=3" nlohmann-json==3.12.0 ninja cmake

.PHONY: env build test demo lint clean bench-deps

# The public API that `mypy --strict` holds to (the rest of the package: plain mypy).
STRICT_API := fastckpt/__init__.py fastckpt/planning/load_plan.py fastckpt/load/execute.py fastckpt/planning/destinations.py \
              fastckpt/errors.py fastckpt/report.py fastckpt/source/checkpoint.py

$(VENV)/.deps-stamp: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q $(BUILD_DEPS)
	$(PY) -m pip install -q $(TORCH_PIN) -e '.[test]' --no-build-isolation
	touch $@

env: $(VENV)/.deps-stamp

# Incremental: reuses build/<wheel tag>; only changed C++ files recompile.
build: env
	FASTCKPT_WERROR=$${FASTCKPT_WERROR:-ON} $(PY) -m pip install -q --no-deps --no-build-isolation -e .

# PYTEST_ARGS: extra pytest options (CI passes --durations=25).
test: build
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/fastckpt demo

# The linters, pinned: a new release's new rules must not turn CI red on its own.
LINT_PINS := ruff==0.17.6 mypy==2.4.1 import-linter==2.17

lint: env
	$(PY) -m pip install -q $(LINT_PINS)
	$(VENV)/bin/ruff check fastckpt tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict $(STRICT_API)
	$(VENV)/bin/lint-imports

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis

# The peers `fastckpt bench` compares against (the `bench` extra), pinned. Optional:
# `make test` and CI do not install them; their tests skip when they are missing.
BENCH_PINS := fastsafetensors==0.5.0 runai-model-streamer==0.17.1 runai-model-streamer-s3==0.17.1

bench-deps: env
	$(PY) -m pip install -q $(TORCH_PIN) $(BENCH_PINS)

# --- Hardening (docs/HARDENING.md) -------------------------------------------
# One clang build with ASan/UBSan (build/sanitize) serves both: the core is
# compiled with libFuzzer's coverage hooks (-fsanitize=fuzzer-no-link, inert
# outside a fuzzer: the sanitizer runtime provides them), so the native tests,
# the scan driver and the fuzz targets link the same objects. CI compiles the
# core twice (the extension, this build), not three times.
#
# test-asan: the components' native tests (csrc/**/x_test.cpp), then the scan
# driver over a generated hostile/truncated/valid corpus. Any sanitizer report
# aborts with a non-zero status.
SAN_BUILD := build/sanitize
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1 \
           UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
FUZZ_TARGETS = $(patsubst csrc/tests/fuzz/%.cpp,%,$(wildcard csrc/tests/fuzz/fuzz_*.cpp))

.PHONY: clang sanitize-build test-asan fuzz fuzz-long

# Installs clang and its runtimes (libFuzzer, ASan) with apt-get when missing (Debian images).
clang:
	@command -v clang++ >/dev/null || { echo "installing clang (ASan, UBSan, libFuzzer)"; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q clang libclang-rt-dev >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q clang libclang-rt-dev >/dev/null; }; }

# Everything test-asan and fuzz run, in one ninja call (incremental).
sanitize-build: env clang
	$(VENV)/bin/cmake -S . -B $(SAN_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DFASTCKPT_PYTHON=OFF -DFASTCKPT_SANITIZE=ON -DFASTCKPT_NATIVE_TESTS=ON -DFASTCKPT_FUZZ=ON -DFASTCKPT_WERROR=ON >/dev/null
	$(VENV)/bin/ninja -C $(SAN_BUILD) fastckpt_scan fastckpt_native_tests $(FUZZ_TARGETS)

test-asan: sanitize-build
	$(SAN_ENV) $(SAN_BUILD)/csrc/tests/fastckpt_native_tests > $(SAN_BUILD)/native_tests.log 2>&1; \
	  rc=$$?; grep -E '^(FAIL|-- |SKIP)' $(SAN_BUILD)/native_tests.log; tail -n 1 $(SAN_BUILD)/native_tests.log; \
	  test $$rc -eq 0 || { tail -n 30 $(SAN_BUILD)/native_tests.log; exit 1; }
	rm -rf $(SAN_BUILD)/corpus && $(PY) -m tests.hostile corpus $(SAN_BUILD)/corpus
	$(SAN_ENV) $(SAN_BUILD)/csrc/tests/fastckpt_scan $(SAN_BUILD)/corpus > $(SAN_BUILD)/scan.log; \
	  rc=$$?; tail -n 1 $(SAN_BUILD)/scan.log; test $$rc -eq 0 || { grep -v '^error \|^ok ' $(SAN_BUILD)/scan.log | tail -n 20; exit 1; }
	@test -z "$$(ls -A $(SAN_BUILD)/corpus/sentinels 2>/dev/null)" || { echo "a payload ran"; exit 1; }

# fuzz: each libFuzzer target (csrc/tests/fuzz/fuzz_<reader>.cpp) for
# FUZZ_SECONDS on a seed corpus made from valid fixtures, FUZZ_JOBS targets at
# a time (one per core); the corpus under build/sanitize/corpus/<reader> grows
# from run to run. The short run is CI's, per push; fuzz-long is the one to
# leave running (10 minutes a target by default).
FUZZ_SECONDS ?= 60
FUZZ_LONG_SECONDS ?= 600
FUZZ_JOBS ?= 2

fuzz: sanitize-build
	rm -rf $(SAN_BUILD)/seeds && $(PY) -m tests.hostile seeds $(SAN_BUILD)/seeds
	$(MAKE) --no-print-directory -j$(FUZZ_JOBS) --output-sync=target $(addprefix fuzz-run-,$(FUZZ_TARGETS))

fuzz-long:
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(FUZZ_LONG_SECONDS)

# One target's run (started by `fuzz`, which builds and makes the seeds first).
fuzz-run-%:
	@reader=$*; reader=$${reader#fuzz_}; mkdir -p $(SAN_BUILD)/corpus/$$reader $(SAN_BUILD)/crashes; \
	  echo "== $*: $(FUZZ_SECONDS) s"; \
	  $(SAN_ENV) $(SAN_BUILD)/csrc/tests/$* $(SAN_BUILD)/corpus/$$reader $(SAN_BUILD)/seeds/$$reader \
	    -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=$(SAN_BUILD)/crashes/$*- > $(SAN_BUILD)/$*.log 2>&1; rc=$$?; \
	  grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|peak_rss)|ERROR|SUMMARY|Test unit written' $(SAN_BUILD)/$*.log; \
	  test $$rc -eq 0 || { echo "$* found a crash: see $(SAN_BUILD)/$*.log"; exit 1; }
