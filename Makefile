# Two commands for a newcomer: `make demo` and `make test`. Both create the
# virtual environment, build the extension and then do their job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned here (a CPU build that installs from local disk); the package
# itself only asks for torch>=2.4.
TORCH_PIN := torch==2.13.0
BUILD_DEPS := "scikit-build-core>=0.11" "pybind11>=3" nlohmann-json==3.12.0 ninja cmake

.PHONY: env build test demo lint clean

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

lint: env
	$(PY) -m pip install -q ruff mypy
	$(VENV)/bin/ruff check fastckpt tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis
