#!/usr/bin/env bash
# Build, test and benchmark sfron_ops on a CUDA machine in one call, inside 10 minutes.
#
#   benchmarks/gpu_suite.sh
#
# Phases, each under its own time limit (seconds, overridable):
#   1. environment: the Python with torch, the GPU, versions, date and commit   (SUITE_ENV_S, 60)
#   2. build: the compiled extension in place, for this GPU's architecture     (SUITE_BUILD_S, 240)
#   3. tests: the GPU tests (pytest -m gpu)                                     (SUITE_TEST_S, 180)
#   4. benchmarks: python -m benchmarks.run --device cuda, with a deadline     (what is left of SUITE_TOTAL_S, 570)
# Results: benchmarks/results/cuda.{json,md,png}, cuda-summary.md and this run's log, cuda-suite.log.
# A failed build or failed tests do not stop the benchmarks, which then measure the backends
# that load; the exit status is non-zero if any phase failed.
# The benchmarks run with --resume: what the deadline cut off, a second call of this script measures
# (SUITE_PHASES=build,bench skips the tests on that call; the build is incremental).
#
# Environment: PY (default .venv/bin/python, else python3), MAX_JOBS (default: all cores),
# TORCH_CUDA_ARCH_LIST (default: this GPU's), SFRON_OPS_COMMIT (the commit, where there is no .git),
# SUITE_OUT (default benchmarks/results), BENCH_ARGS (extra arguments for benchmarks.run),
# SUITE_PHASES (default build,tests,bench), SUITE_FRESH=1 (start the results afresh instead of resuming),
# SUITE_DEVICE=cpu (checks this script's own flow on a machine without a GPU, e.g. with BENCH_ARGS=--smoke).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
TOTAL_S=${SUITE_TOTAL_S:-570}
ENV_S=${SUITE_ENV_S:-60}
BUILD_S=${SUITE_BUILD_S:-240}
TEST_S=${SUITE_TEST_S:-180}
OUT=${SUITE_OUT:-benchmarks/results}
DEVICE=${SUITE_DEVICE:-cuda}
PHASES=",${SUITE_PHASES:-build,tests,bench},"
RESUME=--resume
[[ "${SUITE_FRESH:-0}" == 1 ]] && RESUME=
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
LOG="$OUT/$DEVICE-suite.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
phase() { echo; echo "== [$(elapsed) s] $*"; }
failed=()

phase "environment ($PY)"
if [[ -z "${SFRON_OPS_COMMIT:-}" ]]; then
    SFRON_OPS_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export SFRON_OPS_COMMIT
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "commit: $SFRON_OPS_COMMIT$(git status --porcelain -- sfron_ops csrc benchmarks setup.py 2>/dev/null | grep -q . && echo ' (uncommitted changes)' || true)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
if ! ARCH=$(SUITE_DEVICE=$DEVICE timeout "$ENV_S" "$PY" - <<'PYEOF'
import os
import sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}", file=sys.stderr)
if os.environ["SUITE_DEVICE"] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available to torch: this suite needs a GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB",
          file=sys.stderr)
    print(f"{props.major}.{props.minor}")
PYEOF
); then
    echo "environment check failed (PY=$PY): it needs torch with CUDA and the packages of requirements-dev.txt"
    exit 2
fi
echo "compute capability: ${ARCH:-none (SUITE_DEVICE=$DEVICE)}"

build() {
    if [[ -n "$ARCH" ]]; then
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
    else
        export SFRON_OPS_BUILD_CUDA=${SFRON_OPS_BUILD_CUDA:-0}
    fi
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if timeout "$BUILD_S" "$PY" setup.py build_ext --inplace; then
        "$PY" -c "import sfron_ops as s; print('extension:', 'loaded' if s.extension_available() else s.extension_error())"
    else
        echo "build failed or ran out of time: the benchmarks measure the backends that load without it"
        failed+=(build)
    fi
}

run_tests() {
    local rc=0
    if [[ $DEVICE == cuda ]]; then
        timeout "$TEST_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests || rc=$?
    else
        timeout "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider tests/test_benchmarks.py || rc=$?
    fi
    if [[ $rc -eq 5 ]]; then
        echo "no tests are marked gpu"
    elif [[ $rc -ne 0 ]]; then
        echo "tests failed (exit $rc$([[ $rc -eq 124 ]] && echo ', out of time'))"
        failed+=(tests)
    fi
}

if [[ $PHASES == *,build,* ]]; then
    phase "build (limit ${BUILD_S} s)"
    build
fi
if [[ $PHASES == *,tests,* ]]; then
    phase "$DEVICE tests (limit ${TEST_S} s)"
    run_tests
fi

# the run stops starting measurements at its deadline and keeps a minute to write its files
budget=$(left)
deadline=$(( budget - 60 ))
phase "benchmarks (limit ${budget} s, deadline ${deadline} s)"
if [[ $PHASES != *,bench,* ]]; then
    echo "not in SUITE_PHASES"
elif (( deadline < 60 )); then
    echo "less than two minutes left: benchmarks skipped"
    failed+=(benchmarks)
elif ! timeout "$budget" "$PY" -m benchmarks.run --device "$DEVICE" --out "$OUT" --deadline "$deadline" $RESUME \
        ${BENCH_ARGS:-}; then
    failed+=(benchmarks)
fi

phase "done in $(elapsed) s"
ls -l "$OUT"/"$DEVICE"* 2>/dev/null || true
if (( ${#failed[@]} )); then
    echo "failed phases: ${failed[*]}"
    exit 1
fi
echo "all phases passed"
