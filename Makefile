# Two commands from a fresh clone:  `make demo` (the main job) and `make test`.
# Both create or reuse .venv with the CUDA build of torch 2.13.0 and build the package into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
BUILD_STAMP := .build-stamp
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
PYTEST_ARGS ?=

CMAKE_DIR := build/cmake

.PHONY: venv build test test-cpp test-gpu demo demo-gen bench lint report clean

$(VENV_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

venv: $(VENV_STAMP)

$(BUILD_STAMP): $(VENV_STAMP) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

report: build
	$(PY) -m sfron_ops.report

test: build test-cpp
	$(PY) -m sfron_ops.report
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the kernels as a libtorch library for C++ programs, with its ctest
test-cpp: venv
	cmake -S . -B $(CMAKE_DIR) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CMAKE_DIR) -j $${MAX_JOBS:-2}
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

test-gpu: build
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

demo: build
	$(PY) -m sfron_ops.demo

# class forgetting in a class-conditional diffusion model: ten classes x three seeds (tens of minutes on
# two CPU cores; rerunning resumes from runs/demo-gen/ckpt)
demo-gen: build
	$(PY) -m sfron_ops.unlearn run --scenario digits-ddpm-class --seeds 0 1 2 --threads 1 \
		--out runs/demo-gen --checkpoint-dir runs/demo-gen/ckpt

# `make bench BENCH_ARGS=--quick`: every op, backend and baseline; results in benchmarks/results/
BENCH_ARGS ?=
bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

lint: venv
	$(PY) -m ruff check sfron_ops tests benchmarks

clean:
	rm -rf build *.egg-info $(BUILD_STAMP) sfron_ops/_C*.so
