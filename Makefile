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

test: build
	$(VENV)/bin/pytest -q

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
BENCH_PINS := fastsafetensors==0.5.0 runai-model-streamer==0.17.1

bench-deps: env
	$(PY) -m pip install -q $(TORCH_PIN) $(BENCH_PINS)

# --- Hardening (docs/HARDENING.md) -------------------------------------------
# test-asan: the core and the native drivers built with gcc + ASan/UBSan; the
# native tests, then the scan driver over a generated hostile/truncated/valid
# corpus. Any sanitizer report aborts with a non-zero status.
ASAN_BUILD := build/asan
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1 \
           UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: test-asan fuzz

test-asan: env
	$(VENV)/bin/cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=g++ -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DFASTCKPT_PYTHON=OFF -DFASTCKPT_SANITIZE=ON -DFASTCKPT_NATIVE_TESTS=ON -DFASTCKPT_WERROR=ON >/dev/null
	$(VENV)/bin/ninja -C $(ASAN_BUILD) fastckpt_scan fastckpt_native_tests
	$(SAN_ENV) $(ASAN_BUILD)/csrc/tests/fastckpt_native_tests
	rm -rf $(ASAN_BUILD)/corpus && $(PY) -m tests.hostile corpus $(ASAN_BUILD)/corpus
	$(SAN_ENV) $(ASAN_BUILD)/csrc/tests/fastckpt_scan $(ASAN_BUILD)/corpus > $(ASAN_BUILD)/scan.log; \
	  rc=$$?; tail -n 1 $(ASAN_BUILD)/scan.log; test $$rc -eq 0 || { grep -v '^error \|^ok ' $(ASAN_BUILD)/scan.log | tail -n 20; exit 1; }
	@test -z "$$(ls -A $(ASAN_BUILD)/corpus/sentinels 2>/dev/null)" || { echo "a payload ran"; exit 1; }

# fuzz: libFuzzer targets (csrc/tests/fuzz/fuzz_*.cpp) built with clang +
# ASan/UBSan, each run for FUZZ_SECONDS on a seed corpus made from valid
# fixtures. Installs clang with apt-get when it is missing (Debian images).
FUZZ_BUILD := build/fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = $(patsubst csrc/tests/fuzz/%.cpp,%,$(wildcard csrc/tests/fuzz/fuzz_*.cpp))

fuzz: env
	@command -v clang++ >/dev/null || { echo "installing clang (libFuzzer)"; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q clang libclang-rt-dev >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q clang libclang-rt-dev >/dev/null; }; }
	$(VENV)/bin/cmake -S . -B $(FUZZ_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DFASTCKPT_PYTHON=OFF -DFASTCKPT_SANITIZE=ON -DFASTCKPT_NATIVE_TESTS=ON -DFASTCKPT_FUZZ=ON >/dev/null
	$(VENV)/bin/ninja -C $(FUZZ_BUILD) $(FUZZ_TARGETS)
	rm -rf $(FUZZ_BUILD)/seeds && $(PY) -m tests.hostile seeds $(FUZZ_BUILD)/seeds
	@for t in $(FUZZ_TARGETS); do \
	  reader=$${t#fuzz_}; mkdir -p $(FUZZ_BUILD)/corpus/$$reader $(FUZZ_BUILD)/crashes; \
	  echo "== $$t: $(FUZZ_SECONDS) s"; \
	  $(SAN_ENV) $(FUZZ_BUILD)/csrc/tests/$$t $(FUZZ_BUILD)/corpus/$$reader $(FUZZ_BUILD)/seeds/$$reader \
	    -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_BUILD)/crashes/$$t- > $(FUZZ_BUILD)/$$t.log 2>&1; rc=$$?; \
	  grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|peak_rss)|ERROR|SUMMARY|Test unit written' $(FUZZ_BUILD)/$$t.log; \
	  test $$rc -eq 0 || { echo "$$t found a crash: see $(FUZZ_BUILD)/$$t.log"; exit 1; }; \
	done
