"""The compiled kernels (``impl="fused"``): registration, schemas, rounding, opcheck, trajectories.

The shared differential suites (``tests/test_<stem>.py``) run every backend through one input
matrix; this file adds what is particular to the compiled kernels: that they are registered for
CPU (and CUDA when built with it), that the C++ schema fragment of the stand-alone library equals
the Python schemas, the CPU rounding, work split and instruction-set choice (bitwise reproducible),
the step counters of launches split by the table size, opcheck, ``torch.compile`` of the ops and CUDA-graph
capture (whole SFRon trajectories: ``tests/test_trajectory.py``). GPU tests run by themselves when CUDA is present.

The kernel tests also run csrc/cuda without a GPU: the ``cuda_emulated`` target compiles the CUDA
sources for the CPU under tests/cuda_emulation, and ``FUSED`` (and ``impl="fused"``) then call them
on CPU tensors. What needs the dispatcher's own ops (opcheck, ``torch.compile``) or a real device
(CUDA graphs) runs on ``dispatch_device`` only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import EMULATED_CUDA, REQUIRED_IMPLS, assert_lists_close, clones, emulate_cuda_as_fused

import sfron_ops
from sfron_ops import _impl, _ops, reference
from sfron_ops.reference import pack_mask

ROOT = Path(__file__).resolve().parents[1]
FUSED = {stem: _ops.op(stem) for stem in _ops.SCHEMAS}
REFERENCE = _ops.kernel_table(reference)
CUDA = torch.cuda.is_available()
# CI sets this where the build must have compiled and linked the CUDA kernels (even without a GPU)
EXPECT_CUDA = os.environ.get("SFRON_OPS_EXPECT_CUDA") == "1"
# the CPU chunk of the compiled kernels (csrc/cpu/tile_abi.h): sizes around it cross chunk borders
CPU_CHUNK = 16384


def _require_fused(device="cpu"):
    reason = _impl.why_unavailable("fused", device)
    if reason is not None:
        if "fused" in REQUIRED_IMPLS:
            pytest.fail(f"fused is required but unavailable on {device}: {reason}")
        pytest.skip(reason)


def _real_device(name):
    if name == "cuda" and not CUDA:
        pytest.skip("CUDA is not available")
    _require_fused(name)
    return torch.device(name)


def _emulated_cuda(monkeypatch):
    """CPU tensors, with FUSED and impl="fused" running csrc/cuda under the emulation."""
    monkeypatch.setattr(sys.modules[__name__], "FUSED", emulate_cuda_as_fused(monkeypatch))
    return torch.device("cpu")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu), EMULATED_CUDA])
def fused_device(request, monkeypatch):
    """Where the compiled kernels under test run: the CPU, the GPU, or the CUDA kernels emulated on the CPU."""
    if request.param == EMULATED_CUDA:
        return _emulated_cuda(monkeypatch)
    return _real_device(request.param)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def dispatch_device(request):
    """A device whose kernels the dispatcher itself calls (torch.ops.sfron_ops.*)."""
    return _real_device(request.param)


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), EMULATED_CUDA])
def cuda_device(request, monkeypatch):
    """The CUDA kernels: on the GPU when there is one, and emulated on the CPU."""
    if request.param == EMULATED_CUDA:
        return _emulated_cuda(monkeypatch)
    return _real_device("cuda")


gpu = pytest.mark.skipif(not CUDA, reason="CUDA is not available")

# ----------------------------------------------------------------------------- registration and schemas


def test_extension_loads_or_says_why():
    if sfron_ops.extension_available():
        assert sfron_ops.extension_error() is None
    else:
        assert sfron_ops.extension_error()
        if "fused" in REQUIRED_IMPLS:
            pytest.fail(f"the compiled extension is required: {sfron_ops.extension_error()}")


@pytest.mark.parametrize("stem", list(_ops.SCHEMAS))
def test_every_op_has_a_compiled_cpu_kernel(stem):
    _require_fused("cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualname(stem), "CPU")


@pytest.mark.parametrize("stem", list(_ops.SCHEMAS))
def test_every_op_has_a_compiled_cuda_kernel(stem):
    if not (EXPECT_CUDA or CUDA):
        pytest.skip("set SFRON_OPS_EXPECT_CUDA=1 where the build includes the CUDA kernels")
    if not EXPECT_CUDA:
        _require_fused("cuda")
    assert sfron_ops.extension_available(), sfron_ops.extension_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualname(stem), "CUDA"), (
        f"{_ops.qualname(stem)} has no CUDA kernel: the extension was built without CUDA")


def _cpp_schemas() -> list[str]:
    """The schema strings of the C++ TORCH_LIBRARY fragment (adjacent literals joined)."""
    source = (ROOT / "csrc" / "sfron_ops.cpp").read_text()
    block = source[source.index("TORCH_LIBRARY(sfron_ops, m)"):]
    block = block[: block.index("\n}")]
    return ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call)) for call in re.findall(r"m\.def\((.*?)\);", block,
                                                                                        flags=re.S)]


def test_cpp_schema_fragment_equals_python_schemas():
    assert sorted(_cpp_schemas()) == sorted(_ops.SCHEMAS.values())


def test_cpu_isa_is_reported():
    _require_fused("cpu")
    from sfron_ops import _C

    assert _C.cpu_isa() in ("default", "avx2", "avx512")


# ----------------------------------------------------------------------------- inputs
# The comparisons of every op with the reference (sizes, dtypes, mask kinds, norm modes, layouts, empty and bad
# calls) are in tests/test_<stem>.py, which run this backend and the emulated CUDA kernels among the others. What
# follows needs the compiled kernels themselves.

SIZES = [0, 1, 22, 4097, CPU_CHUNK, CPU_CHUNK + 1, 70000]


def _tensors(shapes, dtype, device, scale=1.0):
    return [(torch.randn(s, device=device) * scale).to(dtype) for s in shapes]


def _float_masks(shapes, device):
    return [torch.rand(s, device=device) for s in shapes]


def _steps(n, device):
    return [torch.tensor(float((0, 3)[i % 2]), device=device) for i in range(n)]


SGD_HYPER = [
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False),
    dict(lr=0.1, momentum=0.8, dampening=0.25, weight_decay=0.0, nesterov=False),
    dict(lr=0.02, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True),
    dict(lr=0.3, momentum=0.0, dampening=0.0, weight_decay=1e-3, nesterov=False),
]
ADAM_HYPER = [
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
    dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05),
]


def _sgd_call(kernel, lists, norm_state, packed, max_norm, hyper):
    params, grads, masks, bufs, steps = lists
    kernel(params, grads, masks, bufs if hyper["momentum"] else [], steps, norm_state, scale=-3.0,
           max_norm=max_norm, packed_masks=packed, **hyper)


def _adam_call(kernel, lists, norm_state, packed, max_norm, hyper):
    params, grads, masks, m1, m2, steps = lists
    kernel(params, grads, masks, m1, m2, steps, norm_state, scale=-2.0, max_norm=max_norm, packed_masks=packed,
           **hyper)


# ----------------------------------------------------------------------------- rounding and launch tables


def test_cpu_elementwise_kernels_round_like_the_reference():
    """On CPU the kernels apply the reference's float32 operations in its order (no FMA contraction),
    so SGD, the slow-weight lerp and the mask agree bit for bit."""
    _require_fused("cpu")
    shapes = [(n,) for n in SIZES] + [(3, 7, 5)]
    params, grads, bufs = (_tensors(shapes, torch.float32, "cpu") for _ in range(3))
    masks = _float_masks(shapes, "cpu")
    state = torch.tensor([2.5, 0.0])  # read for the skip flag; no clipping, whose sqrt torch may take from MKL
    for hyper in SGD_HYPER:
        expected = [clones(params), grads, masks, clones(bufs), _steps(len(shapes), "cpu")]
        actual = [clones(params), grads, masks, clones(bufs), _steps(len(shapes), "cpu")]
        _sgd_call(REFERENCE["sgd_update"], expected, state, False, 0.0, hyper)
        _sgd_call(FUSED["sgd_update"], actual, state, False, 0.0, hyper)
        assert_lists_close(actual[0], expected[0], "params", rtol=0, atol=0)
        assert_lists_close(actual[3], expected[3], "momentum_buffers", rtol=0, atol=0)
    expected_slow, actual_slow, p = clones(bufs), clones(bufs), clones(params)
    REFERENCE["slow_sync"](expected_slow, p, alpha=0.3, reset_fast=False)
    FUSED["slow_sync"](actual_slow, p, alpha=0.3, reset_fast=False)
    assert_lists_close(actual_slow, expected_slow, "slow_params", rtol=0, atol=0)


def test_thousands_of_step_counters_advance_once_or_not_at_all(fused_device):
    """More step counters than one CUDA launch's table holds (3,900); empty tensors count steps too."""
    n = 4001
    params = [torch.zeros(0, device=fused_device) for _ in range(n - 1)] + [torch.ones(5, device=fused_device)]
    grads = [torch.full_like(p, 2.0) for p in params]
    hyper = ADAM_HYPER[0]
    for flag in (0.0, 1.0):  # a non-finite flag skips the whole step, counters included
        state = torch.tensor([1.0, flag], device=fused_device)
        expected = [clones(params), grads, [], clones(params), clones(params), _steps(n, fused_device)]
        actual = [clones(params), grads, [], clones(params), clones(params), _steps(n, fused_device)]
        _adam_call(REFERENCE["adamw_update"], expected, state, False, 0.0, hyper)
        _adam_call(FUSED["adamw_update"], actual, state, False, 0.0, hyper)
        advanced = torch.stack(expected[5]) - torch.stack(_steps(n, fused_device))
        assert torch.equal(advanced, torch.full_like(advanced, 1.0 - flag))
        assert torch.equal(torch.stack(actual[5]), torch.stack(expected[5]))
        assert_lists_close(actual[0], expected[0], "params")


@gpu
def test_cuda_kernels_reject_tensors_on_two_devices():
    _require_fused("cuda")
    params = [torch.randn(3, device="cuda"), torch.randn(3)]
    steps = [torch.tensor(0.0, device="cuda"), torch.tensor(0.0)]
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cpu"):
        FUSED["sgd_update"](params, [p.clone() for p in params], [], [], steps, None, lr=0.1, scale=1.0,
                            momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, max_norm=0.0)


# ----------------------------------------------------------------------------- determinism


def _norm_of(grads, masks):
    state = torch.zeros(2, dtype=torch.float32, device=grads[0].device)
    FUSED["masked_norm"](grads, masks, state, alpha=0.75)
    return state


def test_cpu_norm_does_not_depend_on_the_thread_count():
    _require_fused("cpu")
    shapes = [(70000,), (3,), (CPU_CHUNK * 5 + 7,), (129, 31)]
    grads = _tensors(shapes, torch.float32, "cpu", scale=100.0)
    masks = _float_masks(shapes, "cpu")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_norm_of(grads, masks))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


_ISA_SCRIPT = r"""
import sys, torch
import sfron_ops
from sfron_ops import _ops, _C
from sfron_ops.reference import pack_mask
torch.manual_seed(0)
shapes = [(70000,), (22,), (16385,), (3, 7, 5), (0,)]
out = {"isa": _C.cpu_isa()}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    g = [(torch.randn(s) * 3).to(dtype) for s in shapes]
    p = [torch.randn(s).to(dtype) for s in shapes]
    b = [torch.randn(s).to(dtype) for s in shapes]
    v = [torch.rand(s).to(dtype) for s in shapes]
    m = [torch.rand(s) < 0.5 for s in shapes]
    state = torch.zeros(2)
    _ops.op("masked_norm")(g, [pack_mask(x) for x in m], state, alpha=2.0, packed_masks=True)
    steps = [torch.tensor(1.0) for _ in shapes]
    _ops.op("sgd_update")(p, g, m, b, steps, state, lr=0.1, scale=-2.0, momentum=0.9, dampening=0.1,
                          weight_decay=0.01, nesterov=False, max_norm=1.0)
    _ops.op("adamw_update")(p, g, [x.float() for x in m], b, v, steps, state, lr=0.01, scale=1.0, beta1=0.9,
                            beta2=0.99, eps=1e-8, weight_decay=0.1, max_norm=1.0)
    f = [torch.rand(s) for s in shapes]
    _ops.op("fisher_accumulate")(f, g, scale=0.5)
    s = [x.clone() for x in b]
    _ops.op("slow_sync")(s, p, alpha=0.3, reset_fast=False)
    out[str(dtype)] = [state, p, b, v, f, s]
torch.save(out, sys.argv[1])
"""


def test_cpu_instruction_sets_give_identical_bits(tmp_path):
    """The tile math is compiled per instruction set; the choice must change speed only."""
    _require_fused("cpu")
    script = tmp_path / "isa.py"
    script.write_text(_ISA_SCRIPT)
    results = {}
    for isa in ("default", "avx2", "avx512"):
        out = tmp_path / f"{isa}.pt"
        env = dict(os.environ, SFRON_OPS_CPU_ISA=isa, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
            "PYTHONPATH", ""))
        subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, cwd=tmp_path)
        results[isa] = torch.load(out)
    assert results["default"]["isa"] == "default"
    for isa in ("avx2", "avx512"):
        for key, tensors in results["default"].items():
            if key == "isa":
                continue
            leaves = zip(torch.utils._pytree.tree_leaves(results[isa][key]), torch.utils._pytree.tree_leaves(tensors))
            for a, b in leaves:
                assert torch.equal(a, b), f"{results[isa]['isa']} differs from default for {key}"


def test_unknown_cpu_isa_is_an_error(tmp_path):
    _require_fused("cpu")
    code = ("import torch, sfron_ops\nfrom sfron_ops import _ops\n"
            "_ops.op('fisher_accumulate')([torch.zeros(3)], [torch.ones(3)], scale=1.0)\n")
    env = dict(os.environ, SFRON_OPS_CPU_ISA="sse9", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "SFRON_OPS_CPU_ISA=sse9" in result.stderr


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples(device):
    g = [torch.randn(5, device=device), torch.randn(2, 3, device=device)]
    masks = [torch.rand(5, device=device) < 0.5, torch.rand(2, 3, device=device)]
    packed = [pack_mask(torch.rand(5, device=device) < 0.5), pack_mask(torch.rand(6, device=device) < 0.5)]
    state = torch.tensor([4.0, 0.0], device=device)

    def steps():
        return [torch.tensor(0.0, device=device), torch.tensor(2.0, device=device)]

    def like(ts, dtype=None):
        return [torch.randn_like(t, dtype=dtype) for t in ts]

    return [
        ("masked_norm", (g, masks, state.clone()), dict(alpha=2.0)),
        ("masked_norm", (g, packed, state.clone()), dict(alpha=-1.0, packed_masks=True)),
        ("sgd_update", (like(g), g, masks, like(g), steps(), state.clone()),
         dict(lr=0.1, scale=-2.0, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, max_norm=1.0)),
        ("sgd_update", (like(g), g, [], [], steps(), None),
         dict(lr=0.1, scale=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, max_norm=0.0)),
        ("adamw_update", (like(g), g, packed, like(g), [t.abs() for t in like(g)], steps(), state.clone()),
         dict(lr=0.01, scale=1.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, max_norm=0.5,
              packed_masks=True)),
        ("fisher_accumulate", ([torch.rand_like(t) for t in g], like(g, torch.bfloat16)), dict(scale=0.5)),
        ("saliency_mask", ([torch.rand_like(t) for t in g], [torch.rand_like(t) for t in g],
                           [torch.zeros_like(t, dtype=torch.bool) for t in g], torch.tensor(0, device=device)),
         dict(gamma=1.0)),
        ("slow_sync", (like(g), like(g)), dict(alpha=0.4, reset_fast=True)),
    ]


@pytest.mark.parametrize("sample", range(8))
def test_opcheck(dispatch_device, sample):
    stem, args, kwargs = _opcheck_samples(dispatch_device)[sample]
    torch.library.opcheck(_ops.op(stem), args, kwargs)


# ----------------------------------------------------------------------------- torch.compile and CUDA graphs


def _forget_step(params, grads, masks, bufs, steps, state):
    state.zero_()
    torch.ops.sfron_ops.masked_sq_norm_(grads, masks, state, alpha=5.0)
    torch.ops.sfron_ops.sgd_update_(params, grads, masks, bufs, steps, state, lr=0.05, scale=-5.0, momentum=0.9,
                                    dampening=0.0, weight_decay=5e-4, nesterov=False, max_norm=1.0)
    torch.ops.sfron_ops.fisher_accumulate_(bufs, grads, scale=0.5)
    torch.ops.sfron_ops.slow_sync_(bufs, params, alpha=0.5, reset_fast=False)


def _step_inputs(device):
    shapes = [(70000,), (22,), (3, 5)]
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    masks = [(torch.rand(s, generator=g) < 0.5).to(device) for s in shapes]
    bufs = [torch.randn(s, generator=g).to(device) for s in shapes]
    steps = [torch.tensor(float(i), device=device) for i in range(len(shapes))]
    return params, grads, masks, bufs, steps, torch.zeros(2, device=device)


def test_compiled_fullgraph_step_runs_the_fused_ops(dispatch_device):
    torch._dynamo.reset()
    eager = _step_inputs(dispatch_device)
    compiled = _step_inputs(dispatch_device)
    step = torch.compile(_forget_step, fullgraph=True)
    for _ in range(3):
        _forget_step(*eager)
        step(*compiled)
    for k, what in enumerate(("params", "grads", "masks", "bufs", "steps")):
        assert_lists_close(compiled[k], eager[k], what, rtol=0, atol=0)
    torch.testing.assert_close(compiled[5], eager[5], rtol=0, atol=0)


@gpu
def test_cuda_graph_replays_a_forget_step():
    """Clip coefficient, skip flag and step counters stay on the device, so the step captures."""
    _require_fused("cuda")
    eager = _step_inputs("cuda")
    captured = _step_inputs("cuda")
    # warm up on a side stream, so nothing initialises lazily during the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _forget_step(*_step_inputs("cuda"))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _forget_step(*captured)  # recorded, not run
    for _ in range(3):
        graph.replay()
        _forget_step(*eager)
    torch.cuda.synchronize()
    for k, what in enumerate(("params", "grads", "masks", "bufs", "steps")):
        assert_lists_close(captured[k], eager[k], what, rtol=0, atol=0)
    # a non-finite gradient makes the replayed update skip, without any host synchronisation
    params_before, steps_before = clones(captured[0]), clones(captured[4])
    captured[1][0][7] = float("nan")
    graph.replay()
    torch.cuda.synchronize()
    assert captured[5][1].item() == 1.0
    assert_lists_close(captured[0], params_before, "params", rtol=0, atol=0)
    assert_lists_close(captured[4], steps_before, "steps", rtol=0, atol=0)


def test_cuda_many_tensors_split_over_launches_and_misaligned_views(cuda_device):
    """More tensors than one kernel-argument table holds, plus views off the vector alignment."""
    shapes = [(1 + (13 * i) % 97,) for i in range(1200)] + [(1 << 20,)]
    base = torch.randn(sum(s[0] for s in shapes) + 1, device=cuda_device)
    params, offset = [], 1  # offset 1: every view starts off a 16-byte boundary
    for (n,) in shapes:
        params.append(base[offset:offset + n])
        offset += n
    grads = _tensors(shapes, torch.float32, cuda_device)
    m1 = _tensors(shapes, torch.float32, cuda_device)
    m2 = [t.abs() for t in _tensors(shapes, torch.float32, cuda_device)]
    masks = [torch.rand(s, device=cuda_device) < 0.5 for s in shapes]
    state_e, state_a = torch.zeros(2, device=cuda_device), torch.zeros(2, device=cuda_device)
    REFERENCE["masked_norm"](grads, masks, state_e, alpha=2.0)
    FUSED["masked_norm"](grads, masks, state_a, alpha=2.0)
    torch.testing.assert_close(state_a, state_e, rtol=1e-5, atol=0)
    expected = [[p.clone() for p in params], grads, masks, clones(m1), clones(m2), _steps(len(shapes), cuda_device)]
    actual = [params, grads, masks, clones(m1), clones(m2), _steps(len(shapes), cuda_device)]
    _adam_call(REFERENCE["adamw_update"], expected, state_e, False, 0.5, ADAM_HYPER[1])
    _adam_call(FUSED["adamw_update"], actual, state_e, False, 0.5, ADAM_HYPER[1])
    for what, k in (("params", 0), ("exp_avgs", 3), ("exp_avg_sqs", 4), ("steps", 5)):
        assert_lists_close(actual[k], expected[k], what)


def test_cuda_norm_is_bitwise_reproducible(cuda_device):
    shapes = [(1 << 22,), (70000,), (3,)]
    grads = _tensors(shapes, torch.float32, cuda_device, scale=10.0)
    masks = _float_masks(shapes, cuda_device)
    first = _norm_of(grads, masks)
    assert all(torch.equal(_norm_of(grads, masks), first) for _ in range(5))
