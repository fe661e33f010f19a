"""The CUDA emulation (tests/cuda_emulation): that it really enforces what it claims, and what it adds
to the kernel suites, which already run csrc/cuda through it against the reference (impl
``cuda_emulated`` in tests/test_<stem>.py, ``fused_device`` in tests/test_fused.py):

- results that do not depend on the order in which blocks and threads run;
- no write outside the tensors a kernel is given, at every tail and chunk border.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import EMULATED_CUDA, assert_lists_close, dtype_id, impl_skip_reason

from sfron_ops import _ops, reference

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def emulation():
    reason = impl_skip_reason(EMULATED_CUDA, "cpu")
    if reason is not None:
        pytest.skip(reason)
    import cuda_emulation

    yield cuda_emulation
    cuda_emulation.set_reverse_order(False)


# ----------------------------------------------------------------------------- the emulation itself


def test_rewrite_turns_launches_into_calls_and_registers_for_cpu():
    import cuda_emulation

    source = (
        "multi_tensor_kernel<DEPTH, Functor><<<static_cast<unsigned>(n), BLOCK_THREADS, 0, stream>>>(*table, f);\n"
        "finish<<<1, 1024, 0, stream>>>(a, b);\n"
        "TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) { m.impl(\"x\", &x); }\n"
    )
    assert cuda_emulation.rewrite(source, "sample.cu") == (
        "::cuda_emulation::launch(static_cast<unsigned>(n), BLOCK_THREADS, 0, stream, "
        "multi_tensor_kernel<DEPTH, Functor>, *table, f);\n"
        "::cuda_emulation::launch(1, 1024, 0, stream, finish, a, b);\n"
        "TORCH_LIBRARY_IMPL(sfron_ops_cuda_emulated, CPU, m) { m.impl(\"x\", &x); }\n"
    )
    with pytest.raises(RuntimeError, match="odd.cu"):
        cuda_emulation.rewrite("k<<<grid, block>>>\n(args);", "odd.cu")


@pytest.mark.parametrize("stem", list(_ops.SCHEMAS))
def test_every_cuda_kernel_is_emulated(emulation, stem):
    qualname = f"{emulation.NAMESPACE}::{_ops.OP_NAMES[stem]}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("threads", [32, 512, 1024])
def test_block_sum_over_warps_and_shared_memory(emulation, threads, reverse):
    emulation.set_reverse_order(reverse)
    values = torch.randint(-1000, 1000, (threads,), dtype=torch.float64)  # integers: every order sums exactly
    assert emulation.ops().block_sum(values).item() == values.sum().item()


def test_a_barrier_some_thread_never_reaches_is_reported(emulation):
    with pytest.raises(RuntimeError, match="63 threads at __syncthreads.*1 returned"):
        emulation.ops().barrier_after_return(64, 5)
    emulation.ops().barrier_after_return(64, 64)  # nobody returns early: the barrier completes


_LOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
import cuda_emulation
print(cuda_emulation.ops().vector_load(torch.arange(16, dtype=torch.float32), {index}).tolist())
"""


@pytest.mark.parametrize("index", [4, 1])
def test_a_misaligned_vector_load_ends_the_process(emulation, index):
    """As it faults on a GPU: the build checks the alignment of every vector access."""
    run = subprocess.run([sys.executable, "-c", _LOAD.format(tests=str(HERE), index=index)], capture_output=True,
                         text=True, timeout=600)
    if index == 4:  # 16 bytes from a 64-byte aligned allocation
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "[4.0, 5.0, 6.0, 7.0]"
    else:
        assert run.returncode != 0
        assert "misaligned address" in run.stderr


# ----------------------------------------------------------------------------- every op, two ways

SHAPES = [(0,), (1,), (3,), (22,), (4097,), (70000,), (3, 7, 5)]  # tails, and chunk borders at 16384
GUARD = 64  # elements around every tensor; also the alignment of every tensor's start
SENTINEL = {torch.float32: -1024.0, torch.bfloat16: -1024.0, torch.float16: -1024.0, torch.uint8: 77}


def _guarded(tensors):
    """Copies of tensors laid out in one buffer with a sentinel-filled gap before and after each."""
    dtype = tensors[0].dtype
    offsets, end = [], GUARD
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() // GUARD) * GUARD + GUARD
    buffer = torch.full((end,), SENTINEL[dtype], dtype=dtype)
    used = torch.zeros(end, dtype=torch.bool)
    views = []
    for t, offset in zip(tensors, offsets):
        view = buffer[offset:offset + t.numel()].view(t.shape)
        view.copy_(t)
        used[offset:offset + t.numel()] = True
        views.append(view)
    return views, (buffer, used)


def _untouched(guard):
    buffer, used = guard
    outside = buffer[~used]
    return torch.equal(outside, torch.full_like(outside, SENTINEL[buffer.dtype]))


def _inputs(dtype):
    g = torch.Generator().manual_seed(11)

    def like(scale=1.0, positive=False):
        ts = [(torch.randn(s, generator=g) * scale) for s in SHAPES]
        return [(t.abs() if positive else t).to(dtype) for t in ts]

    return dict(
        params=like(), grads=like(), bufs=like(), m1=like(0.1), m2=like(0.01, positive=True), slow=like(),
        masks=[torch.rand(s, generator=g) < 0.6 for s in SHAPES],
        fishers=[torch.rand(s, generator=g) for s in SHAPES], remain=[torch.rand(s, generator=g) for s in SHAPES],
        steps=[torch.tensor(float(i % 3)) for i in range(len(SHAPES))],
    )


def _run_all(kernels, x, guard=False):
    """Every op once, in the order of an SFR-on iteration: {name: what it wrote}, {name: guard}."""
    out, guards = {}, {}

    def place(name, tensors):
        if guard:
            out[name], guards[name] = _guarded(tensors)
        else:
            out[name] = [t.clone() for t in tensors]
        return out[name]

    state = place("norm_state", [torch.tensor([0.5, 0.0])])[0]
    kernels["masked_norm"](x["grads"], x["masks"], state, alpha=3.0)
    params, bufs = place("sgd params", x["params"]), place("momentum_buffers", x["bufs"])
    out["sgd steps"] = [s.clone() for s in x["steps"]]
    kernels["sgd_update"](params, x["grads"], x["masks"], bufs, out["sgd steps"], state, lr=0.1, scale=-3.0,
                          momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True, max_norm=2.0)
    adam_params, m1, m2 = place("adamw params", x["params"]), place("exp_avgs", x["m1"]), place("exp_avg_sqs", x["m2"])
    out["adamw steps"] = [s.clone() for s in x["steps"]]
    kernels["adamw_update"](adam_params, x["grads"], x["masks"], m1, m2, out["adamw steps"], state, lr=0.01,
                            scale=1.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, max_norm=2.0)
    kernels["fisher_accumulate"](place("fishers", x["fishers"]), x["grads"], scale=0.3)
    out["kept"] = [torch.tensor(0)]
    masks = place("masks", [torch.zeros(s, dtype=torch.uint8) for s in SHAPES])
    kernels["saliency_mask"](x["fishers"], x["remain"], masks, out["kept"][0], gamma=0.9)
    kernels["slow_sync"](place("slow_params", x["slow"]), params, alpha=0.3, reset_fast=True)
    return out, guards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_results_do_not_depend_on_the_order_blocks_and_threads_run(emulation, dtype):
    x = _inputs(dtype)
    emulation.set_reverse_order(False)
    forward, _ = _run_all(emulation.kernels(), x)
    emulation.set_reverse_order(True)
    reverse, _ = _run_all(emulation.kernels(), x)
    emulation.set_reverse_order(False)
    for name in forward:
        for i, (a, b) in enumerate(zip(forward[name], reverse[name])):
            assert torch.equal(a, b), f"{name}[{i}] differs between the two orders"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_no_kernel_writes_outside_its_tensors(emulation, dtype):
    x = _inputs(dtype)
    written, guards = _run_all(emulation.kernels(), x, guard=True)
    assert len(guards) == 9
    for name, guard in guards.items():
        assert _untouched(guard), f"{name}: written outside its tensors"
    # the guarded views are the tensors the kernels updated, and they updated them like the reference
    expected, _ = _run_all(_ops.kernel_table(reference), x)
    for name in expected:
        assert_lists_close(written[name], expected[name], name)
