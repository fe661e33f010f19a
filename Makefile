# Two commands from a fresh clone: `make demo` (the main job) and `make test` (what CI runs, through .ci/run).
# Both use one virtual environment, .venv:
#   make demo  installs requirements.txt (torch 2.13.0 and what the demo needs), builds the package, runs the demo;
#   make test  adds requirements-dev.txt (pytest, Triton, diffusers, the framework integrations, ruff) and runs
#              the tests.
# torch comes as `torch==2.13.0` (a CPU build wherever pip finds one, as on the machine the README's times are
# from) unless the CUDA kernels are wanted: SFRON_OPS_BUILD_CUDA=1 (CI) or a visible GPU add requirements-cuda.txt,
# the CUDA build (about 5 GB). The build compiles the CPU kernels, and the CUDA kernels in those two cases.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
PYTEST_ARGS ?=

ifeq ($(SFRON_OPS_BUILD_CUDA),1)
TORCH_BUILD := cuda
else ifeq ($(SFRON_OPS_BUILD_CUDA),0)
TORCH_BUILD := default
else
TORCH_BUILD := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo default)
endif
TORCH_REQUIREMENTS := $(if $(filter cuda,$(TORCH_BUILD)),requirements-cuda.txt)
REQUIREMENTS := -r requirements.txt $(addprefix -r ,$(TORCH_REQUIREMENTS))
DEMO_STAMP := $(VENV)/.installed-demo-$(TORCH_BUILD)
TEST_STAMP := $(VENV)/.installed-test-$(TORCH_BUILD)
BUILD_STAMP := .build-stamp
# what the last build was made with; a change rebuilds
BUILD_CONFIG := build/config.txt
BUILD_LOG := build/build.log

CMAKE_DIR := build/cmake

.PHONY: venv build test test-cpp test-gpu demo demo-gen demo-lm bench lint report clean FORCE

$(DEMO_STAMP): requirements.txt $(TORCH_REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(REQUIREMENTS)
	rm -f $(VENV)/.installed-*
	touch $@

$(TEST_STAMP): $(DEMO_STAMP) requirements-dev.txt
	$(PY) -m pip install $(REQUIREMENTS) -r requirements-dev.txt
	touch $@

venv: $(DEMO_STAMP)

$(BUILD_CONFIG): FORCE
	@mkdir -p $(@D)
	@echo "torch=$(TORCH_BUILD) SFRON_OPS_BUILD_CUDA=$(SFRON_OPS_BUILD_CUDA)" | cmp -s - $@ 2>/dev/null \
		|| echo "torch=$(TORCH_BUILD) SFRON_OPS_BUILD_CUDA=$(SFRON_OPS_BUILD_CUDA)" > $@

# pip shows only its spinner while the extension compiles: the full output goes to build/build.log, and the
# screen gets what is built and a line per compiled file
BUILD_PROGRESS := awk '/^ *sfron_ops: / && !seen[$$0]++ { sub(/^ +/, ""); print; fflush() } \
	/^ *\[[0-9]+\/[0-9]+\] / { src = ""; for (i = 2; i < NF; i++) if ($$i == "-c") src = $$(i + 1); \
	sub(/.*\/csrc\//, "csrc/", src); if (src != "") { print "  " $$1 " " src; fflush() } }'

$(BUILD_STAMP): $(DEMO_STAMP) $(SOURCES) $(BUILD_CONFIG)
	@echo "sfron_ops: building the package into $(VENV) (log: $(BUILD_LOG))"
	@start=$$(date +%s); set -o pipefail; \
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 \
		| tee $(BUILD_LOG) | $(BUILD_PROGRESS) \
		|| { tail -n 40 $(BUILD_LOG); echo "sfron_ops: the build failed; the whole log is $(BUILD_LOG)"; exit 1; }; \
	echo "sfron_ops: built in $$(( $$(date +%s) - start )) s"
	touch $@

build: $(BUILD_STAMP)

report: build
	$(PY) -m sfron_ops.report

test: build $(TEST_STAMP) test-cpp
	$(PY) -m sfron_ops.report
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the kernels as a libtorch library for C++ programs, with its ctest
test-cpp: $(DEMO_STAMP)
	cmake -S . -B $(CMAKE_DIR) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build $(CMAKE_DIR) -j $${MAX_JOBS:-2}
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

test-gpu: build $(TEST_STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

demo: build
	$(PY) -m sfron_ops.demo

# class forgetting in a class-conditional diffusion model: ten classes x three seeds (tens of minutes on
# two CPU cores). It needs diffusers, which requirements-dev.txt holds. Rerunning resumes from runs/demo-gen/ckpt
# (--overwrite: the command line otherwise refuses to replace the results of the previous run)
demo-gen: build $(TEST_STAMP)
	$(PY) -m sfron_ops.unlearn run --scenario digits-ddpm-class --seeds 0 1 2 --threads 1 \
		--out runs/demo-gen --checkpoint-dir runs/demo-gen/ckpt --overwrite

# facts forgotten by a tiny causal LM, TOFU-style, in the Hugging Face Trainer: three seeds, the 1, 5 and 10 %
# splits, every method in float32 and bfloat16 (1 h 45 min on two shared CPU cores: every seed trains an original and
# three RTs). Rerunning resumes from runs/demo-lm/ckpt
demo-lm: build $(TEST_STAMP)
	$(PY) -m sfron_ops.unlearn run --scenario facts-lm --seeds 0 1 2 --threads 1 \
		--out runs/demo-lm --checkpoint-dir runs/demo-lm/ckpt --overwrite

# `make bench BENCH_ARGS=--quick`: every op, backend and baseline; results in benchmarks/results/
BENCH_ARGS ?=
bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

lint: $(TEST_STAMP)
	$(PY) -m ruff check sfron_ops tests benchmarks examples

clean:
	rm -rf build *.egg-info $(BUILD_STAMP) sfron_ops/_C*.so
