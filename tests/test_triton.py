"""The Triton backend on its own: launches, plan caching and layouts.

CPU tensors run through the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` when there is no GPU); CUDA tensors run the compiled kernels and
are marked ``gpu``. Each op's comparison with the reference is in tests/test_<stem>.py;
these tests check what is specific to this backend: one launch per pass (pointer tables),
the table cache following tensor addresses, deterministic norms, the non-contiguous
fallback, tracing by ``torch.compile``, and that the kernels compile to vectorised sm_90 code.
Whole SFRon trajectories are compared in ``tests/test_trajectory.py``.
"""

import os
import subprocess
import sys
from typing import Optional

import pytest
import torch

pytest.importorskip("triton")

from helpers import clones, dtype_id, make, make_masks  # noqa: E402

from sfron_ops import _impl, _ops, reference  # noqa: E402

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ([pytest.param("cpu", id="cpu-interpreted")] if TRITON_ON_CPU else []) + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
if _impl.why_unavailable("triton", "cuda" if torch.cuda.is_available() else "cpu") is not None:
    pytest.skip(_impl.why_unavailable("triton", "cuda" if torch.cuda.is_available() else "cpu"),
                allow_module_level=True)

from sfron_ops.triton import KERNELS, TRITON_OPS, _common, count_launches  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASK_KINDS = ["none", "zeros", "ones", "random", "float", "packed"]
#: 0 and 1 elements, odd, empty 3-d, more than one update chunk (4096) and one norm chunk (16384)
EDGE_SHAPES = [(0,), (1,), (7,), (2, 0, 3), (3, 5, 7), (4099,), (16411,)]
#: more than 110 tensors of small odd sizes
MANY_SHAPES = [(1 + (5 * i) % 23,) if i % 4 else (3, 1 + i % 5) for i in range(113)]
SHAPES = {"edges": EDGE_SHAPES, "many": MANY_SHAPES}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _fresh_caches():
    _common.clear_caches()
    yield


def assert_lists(actual, expected, what, exact=False):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if exact:
            assert a.dtype == e.dtype and torch.equal(a, e), f"{what}[{i}] differs"
        else:
            torch.testing.assert_close(a, e, msg=lambda m, i=i, e=e: f"{what}[{i}] (shape {tuple(e.shape)}): {m}")


def steps_for(n, device):
    """Alternately fresh (0) and running (3) counters, so first-step paths are covered."""
    return [torch.tensor(3.0 * (i % 2), device=device) for i in range(n)]


def matrix(*cases):
    """Every dtype x mask kind on the edge sizes; every mask kind once (rotating dtypes) on 113 tensors."""
    out = [(dtype, kind, "edges") for dtype in DTYPES for kind in MASK_KINDS]
    out += [(DTYPES[i % len(DTYPES)], kind, "many") for i, kind in enumerate(MASK_KINDS)]
    return pytest.mark.parametrize("dtype,mask_kind,case", out, ids=lambda v: dtype_id(v) if
                                   isinstance(v, torch.dtype) else str(v))


# ------------------------------------------------------------------------------------------------- the ops
# The comparisons of every op with the reference are in tests/test_<stem>.py (impl="triton" among the others).
@matrix()
def test_masked_norm(device, dtype, mask_kind, case):
    shapes = SHAPES[case]
    grads = make(shapes, dtype, device, -3.0, 3.0)
    masks, packed = make_masks(mask_kind, shapes, device, dtype)
    expected = torch.tensor([2.5, 0.0], device=device)  # accumulates onto what is there
    actual = expected.clone()
    reference.masked_sq_norm_(grads, masks, expected, alpha=1.75, packed_masks=packed)
    with count_launches() as launches:
        KERNELS["masked_norm"](grads, masks, actual, alpha=1.75, packed_masks=packed)
    assert dict(launches) == {"_masked_norm_kernel": 1}  # one launch for every mask kind and > 110 tensors
    # the kernel adds in another order than the per-tensor reference
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=0)
    assert actual[1].item() == expected[1].item() == 0.0


# ------------------------------------------------------------------------------------------------- launches
def resnet18_shapes(width=4, classes=10):
    """The 62 parameter shapes of the CIFAR ResNet-18 of the official code, channels scaled by width/64."""
    shapes = [(width, 3, 3, 3), (width,), (width,)]
    cin = width
    for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and stage > 0:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(classes, 8 * width), (classes,)]


def test_one_launch_per_pass_on_the_resnet18_list(device):
    shapes = resnet18_shapes()
    assert len(shapes) == 62
    params, grads = make(shapes, torch.float32, device), make(shapes, torch.float32, device)
    masks = [torch.rand(s, device=device) < 0.5 for s in shapes]
    steps = [torch.zeros((), device=device) for _ in shapes]
    bufs, m1, m2 = ([torch.zeros_like(p) for p in params] for _ in range(3))
    state = torch.zeros(2, device=device)
    expected_sgd = [clones(params), clones(bufs), clones(steps)]
    expected_state = torch.zeros(2, device=device)
    reference.masked_sq_norm_(grads, masks, expected_state, alpha=2.0)
    reference.sgd_update_(expected_sgd[0], grads, masks, expected_sgd[1], expected_sgd[2], expected_state, lr=0.01,
                          scale=-2.0, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, max_norm=7.0)
    calls = {
        "masked_norm": lambda: KERNELS["masked_norm"](grads, masks, state, alpha=2.0),
        "sgd_update": lambda: KERNELS["sgd_update"](params, grads, masks, bufs, steps, state, lr=0.01, scale=-2.0,
                                                    momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False,
                                                    max_norm=7.0),
        "adamw_update": lambda: KERNELS["adamw_update"](clones(params), grads, masks, m1, m2, clones(steps), state,
                                                        lr=1e-3, scale=1.0, beta1=0.9, beta2=0.999, eps=1e-8,
                                                        weight_decay=0.05, max_norm=0.0),
        "fisher_accumulate": lambda: KERNELS["fisher_accumulate"]([torch.zeros_like(p) for p in params], grads,
                                                                  scale=0.5),
        "saliency_mask": lambda: KERNELS["saliency_mask"]([g.abs() for g in grads], [p.abs() for p in params],
                                                          [torch.empty(s, dtype=torch.bool, device=device)
                                                           for s in shapes], torch.zeros((), dtype=torch.int64,
                                                                                         device=device), gamma=1.0),
        "slow_sync": lambda: KERNELS["slow_sync"](clones(params), clones(params), alpha=0.5, reset_fast=True),
    }
    for stem, call in calls.items():
        with count_launches() as launches:
            call()
        assert sum(launches.values()) == 1, (stem, dict(launches))
    # the optimizer's two passes of a clipped forget step gave the reference's result
    assert_lists(params, expected_sgd[0], "params")
    assert_lists(bufs, expected_sgd[1], "momentum_buffers")
    assert_lists(steps, expected_sgd[2], "steps", exact=True)


def test_plan_cache_follows_tensor_addresses(device):
    """A call repeating an earlier call's tensors reuses its plan (Note [plans]); new tensors (new
    addresses, as after zero_grad()) get their own plan and their own values are read."""
    shapes = [(5,), (4100,), (3, 3)]
    fishers = make(shapes, torch.float32, device, 0.0, 1.0)
    expected = clones(fishers)
    for round_ in range(3):
        grads = make(shapes, torch.float32, device)
        reference.fisher_accumulate_(expected, grads, scale=1.0)
        before = len(_common._plans)
        KERNELS["fisher_accumulate"](fishers, grads, scale=1.0)
        assert len(_common._plans) <= before + 1
        with count_launches() as launches:
            KERNELS["fisher_accumulate"](fishers, grads, scale=0.0)  # the same tensors: a cached plan
        assert len(_common._plans) <= before + 1 and sum(launches.values()) == 1
        assert_lists(fishers, expected, f"fishers after round {round_}")


def test_cached_plans_still_reject_bad_input(device):
    """A plan is reused only for the same signature: a changed shape is checked again."""
    params, grads = make([(4,), (6,)], torch.float32, device), make([(4,), (6,)], torch.float32, device)
    hyper = dict(lr=0.1, scale=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, max_norm=0.0)
    KERNELS["sgd_update"](params, grads, [], [], steps_for(2, device), None, **hyper)
    before = clones(params)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \(2, 3\), expected \(6,\)"):
        KERNELS["sgd_update"](params, [grads[0], grads[1].view(2, 3)], [], [], steps_for(2, device), None, **hyper)
    assert_lists(params, before, "params", exact=True)


def test_plans_do_not_keep_tensors_alive(device):
    import weakref

    shapes = [(3,), (5,)]
    fishers, grads = make(shapes, torch.float32, device), make(shapes, torch.float32, device)
    KERNELS["fisher_accumulate"](fishers, grads, scale=1.0)
    KERNELS["fisher_accumulate"](fishers[:1], grads[:1], scale=1.0)  # direct mode
    refs = [weakref.ref(t) for t in fishers + grads]
    del fishers, grads
    assert all(r() is None for r in refs)


def test_norm_is_deterministic(device):
    grads = make(MANY_SHAPES + [(40000,)], torch.float32, device, -5.0, 5.0)
    results = []
    for _ in range(2):
        state = torch.zeros(2, device=device)
        KERNELS["masked_norm"](grads, [], state, alpha=3.0)
        results.append(state)
    assert torch.equal(results[0], results[1])


# ------------------------------------------------------------------------------------------------- edge cases
def test_non_contiguous_tensors(device):
    """Transposed views are staged through contiguous copies; channels-last tensors with equal strides are
    processed in memory order (and their table cached)."""
    base = [torch.rand(6, 5, device=device), torch.rand(7, 3, device=device)]
    params = [b.t() for b in base]  # non-contiguous views; results must land in base
    grads = make([p.shape for p in params], torch.float32, device)  # contiguous: the tuple's layouts differ
    masks = [torch.rand(p.shape, device=device) < 0.5 for p in params]
    steps = steps_for(2, device)
    expected = [p.clone() for p in params]
    reference.sgd_update_(expected, grads, masks, [], clones(steps), None, lr=0.1, scale=2.0, momentum=0.0,
                          dampening=0.0, weight_decay=0.1, nesterov=False, max_norm=0.0)
    KERNELS["sgd_update"](params, grads, masks, [], steps, None, lr=0.1, scale=2.0, momentum=0.0, dampening=0.0,
                          weight_decay=0.1, nesterov=False, max_norm=0.0)
    assert_lists(params, expected, "params")
    assert_lists([b.t() for b in base], expected, "base storage")
    assert len(_common._plans) == 0  # staged copies have fresh addresses: not cached

    nhwc = [torch.rand(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last) for _ in range(2)]
    slow = [t.clone() for t in nhwc]  # clone keeps the channels-last strides
    fast = [t + 1.0 for t in nhwc]
    expected = [clones(slow), clones(fast)]
    reference.slow_sync_(*expected, alpha=0.25, reset_fast=False)
    KERNELS["slow_sync"](slow, fast, alpha=0.25, reset_fast=False)
    assert_lists(slow, expected[0], "slow_params")
    assert all(not s.is_contiguous() for s in slow)
    assert len(_common._plans) == 1  # no copies: the plan is cached


def test_mixed_dtypes_in_one_call(device):
    """One launch per dtype combination; masks of several dtypes are read as float32 in one launch."""
    shapes = [(9,), (4,), (33,), (2, 2)]
    params = [torch.rand(s, device=device).to(d) for s, d in
              zip(shapes, [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16])]
    grads = [torch.rand_like(p) for p in params]
    masks = [torch.rand(shapes[0], device=device) < 0.5, torch.rand(shapes[1], device=device),
             torch.randint(0, 2, shapes[2], dtype=torch.uint8, device=device),
             torch.rand(shapes[3], device=device).to(torch.float16)]
    steps = steps_for(4, device)
    expected = [clones(params), clones(steps)]
    reference.sgd_update_(expected[0], grads, masks, [], expected[1], None, lr=0.1, scale=-1.0, momentum=0.0,
                          dampening=0.0, weight_decay=0.0, nesterov=False, max_norm=0.0)
    with count_launches() as launches:
        KERNELS["sgd_update"](params, grads, masks, [], steps, None, lr=0.1, scale=-1.0, momentum=0.0,
                              dampening=0.0, weight_decay=0.0, nesterov=False, max_norm=0.0)
    assert launches["_sgd_update_kernel"] == 2
    assert_lists(params, expected[0], "params")
    assert_lists(steps, expected[1], "steps", exact=True)


def test_empty_lists_launch_nothing(device):
    with count_launches() as launches:
        KERNELS["masked_norm"]([], [], torch.zeros(2, device=device), alpha=1.0)
        KERNELS["slow_sync"]([], [], alpha=0.5, reset_fast=True)
    assert sum(launches.values()) == 0


def test_shared_step_counter_is_rejected(device):
    params = make([(3,), (3,)], torch.float32, device)
    before = clones(params)
    step = torch.tensor(0.0, device=device)
    with pytest.raises(RuntimeError, match=r"steps\[0\] and steps\[1\] share memory"):
        KERNELS["sgd_update"](params, clones(params), [], [], [step, step], None, lr=0.1, scale=1.0, momentum=0.0,
                              dampening=0.0, weight_decay=0.0, nesterov=False, max_norm=0.0)
    assert_lists(params, before, "params", exact=True)




# ------------------------------------------------------------------------------------------------- integration
def test_impl_selection(device):
    assert _impl.resolve_impl("triton", device) == "triton"
    assert _impl.kernels("triton") is KERNELS
    if device.type == "cuda" and not _impl.extension_available():
        assert _impl.default_impl(device) == "triton"
    if device.type == "cpu":
        assert _impl.default_impl(device) != "triton"  # the interpreter is never picked on its own


def test_signatures_match_the_op_schemas():
    """KERNELS take the ops' arguments; each triton_op has the op's schema under its own name and names
    its kernel (torch hashes the kernel sources into its compile caches)."""
    import inspect

    for stem, kernel in KERNELS.items():
        ours = inspect.signature(kernel).parameters
        theirs = inspect.signature(getattr(reference, _ops.OP_NAMES[stem])).parameters
        assert ours.keys() == theirs.keys(), stem
        assert all(ours[n].default == p.default for n, p in theirs.items()), stem
        # the op's positional arguments first, in order; its keyword-only numbers keyword-only. The optional tensors
        # may also be given by position here: torch.library ops (the triton_ops) take no keyword-only tensors
        positional = [n for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert list(ours)[:len(positional)] == positional, stem
        assert all(ours[n].kind is p.kind or ours[n].annotation == Optional[torch.Tensor]
                   for n, p in theirs.items()), stem
        op_schema = torch._C.parse_schema(f"sfron_ops::{_ops.SCHEMAS[stem]}")
        triton_schema = TRITON_OPS[stem]._opoverload._schema
        assert triton_schema.name == f"sfron_ops::{_ops.OP_NAMES[stem]}triton_"

        def described(schema):
            # torch.library takes no keyword-only tensors: the triton ops take the optional tensor scalars
            # (lr_tensor, ...) before their keyword-only numbers, so arguments are compared by name
            return {a.name: (str(a.type), a.kwarg_only and "Tensor" not in str(a.type), a.default_value,
                             a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments}

        assert described(triton_schema) == described(op_schema), stem
        if not TRITON_ON_CPU:  # interpreted kernels are not JIT functions; the CPU check is in triton_compile_check.py
            kernels = torch._library.triton.get_triton_kernels_for_op(triton_schema.name)
            assert [k.__name__ for k in kernels] == [f"_{stem}_kernel"], stem


def compiled_step(grads, masks, params, bufs, steps, norm_state, slow):
    KERNELS["masked_norm"](grads, masks, norm_state, alpha=2.0)
    KERNELS["sgd_update"](params, grads, masks, bufs, steps, norm_state, lr=0.1, scale=-2.0, momentum=0.9,
                          dampening=0.0, weight_decay=1e-2, nesterov=True, max_norm=0.5)
    KERNELS["slow_sync"](slow, params, alpha=0.5, reset_fast=True)


def test_torch_compile_fullgraph(device):
    """Dynamo records the triton_ops without a graph break. On CUDA Inductor compiles them; the interpreter
    cannot be traced into an AOT graph, so on CPU the graph runs with the eager backend."""
    shapes = [(7,), (4099,), (3, 5)]
    grads = make(shapes, torch.float32, device)
    masks = [torch.rand(s, device=device) < 0.5 for s in shapes]

    def state():
        params = make(shapes, torch.float32, device)
        return [params, [torch.zeros_like(p) for p in params], steps_for(3, device), torch.zeros(2, device=device),
                clones(params)]

    torch.manual_seed(3)
    eager = state()
    compiled_step(grads, masks, *eager)
    torch.manual_seed(3)
    traced = state()
    torch._dynamo.reset()
    backend = "inductor" if device.type == "cuda" else "eager"
    torch.compile(compiled_step, fullgraph=True, backend=backend)(grads, masks, *traced)
    for name, a, b in zip(("params", "momentum_buffers", "steps"), traced[:3], eager[:3]):
        # CUDA: Inductor launches the kernels per tensor, so the norm is summed in another order
        assert_lists(a, b, name, exact=device.type == "cpu")
    torch.testing.assert_close(traced[3], eager[3], rtol=1e-6, atol=0)


def test_triton_ops_under_opcheck(device):
    shapes = [(7,), (3, 5)]
    params, grads = make(shapes, torch.float32, device), make(shapes, torch.float32, device)
    masks = [torch.rand(s, device=device) < 0.5 for s in shapes]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if device.type == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    cases = {
        "masked_norm": ((grads, masks, torch.zeros(2, device=device)), dict(alpha=2.0)),
        "sgd_update": ((clones(params), grads, masks, [torch.zeros_like(p) for p in params], steps_for(2, device),
                        torch.tensor([4.0, 0.0], device=device)),
                       dict(lr=0.1, scale=1.0, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                            max_norm=1.0)),
        "adamw_update": ((clones(params), grads, [], [torch.zeros_like(p) for p in params],
                          [torch.zeros_like(p) for p in params], steps_for(2, device), None),
                         dict(lr=0.1, scale=1.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, max_norm=0.0)),
        "fisher_accumulate": (([torch.zeros_like(p) for p in params], grads), dict(scale=1.0)),
        "saliency_mask": (([g.abs() for g in grads], [p.abs() for p in params], clones(masks),
                           torch.zeros((), dtype=torch.int64, device=device)), dict(gamma=1.0)),
        "slow_sync": ((clones(params), clones(grads)), dict(alpha=0.5, reset_fast=True)),
    }
    for stem, (args, kwargs) in cases.items():
        torch.library.opcheck(TRITON_OPS[stem], args, kwargs, test_utils=utils)


def test_kernels_compile_to_vectorised_sm90_code_and_trace_with_exact_writes():
    """Triton's compiler and ptxas (shipped with Triton) build every launched variant for an H100/H200
    without a GPU: valid code, no register spills, 16-byte vector accesses. torch.compile records one
    kernel launch per tensor, and torch's analysis of each kernel finds exactly the arguments it writes."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, os.path.join(here, "triton_compile_check.py"), "--arch", "90"],
                            env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(here))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 without vector loads or with spills" in result.stdout
    writes = {}
    for line in result.stdout.splitlines():
        if line.startswith("graph "):
            _, name, listed = line.split()
            writes.setdefault(name, []).append(set(listed.removeprefix("writes=").split(",")))
    expected = {
        "_masked_norm_kernel": {"norm_state", "partials", "counter"},
        "_sgd_update_kernel": {"params", "momentum_buffers", "steps", "counter"},
        "_adamw_update_kernel": {"params", "exp_avgs", "exp_avg_sqs", "steps", "counter"},
        "_slow_sync_kernel": {"slow_params", "params"},
        "_fisher_accumulate_kernel": {"fishers"},
        "_saliency_mask_kernel": {"masks", "kept"},
    }
    assert writes.keys() == expected.keys()
    for name, found in writes.items():
        assert found == [expected[name]] * 2, name  # one launch for each of the two tensors
    # each triton_op names its kernel (torch hashes kernel sources into its compile caches)
    registered = dict(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("registry "))
    assert registered == {f"sfron_ops::{_ops.OP_NAMES[stem]}triton_": f"_{stem}_kernel" for stem in KERNELS}


# ------------------------------------------------------------------------------------------------- GPU only
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu_only
def test_no_host_synchronisation():
    """The clip coefficient and the skip flag stay on the device: a cached step makes no synchronising call."""
    device = torch.device("cuda")
    shapes = resnet18_shapes()
    params, grads = make(shapes, torch.float32, device), make(shapes, torch.float32, device)
    masks = [torch.rand(s, device=device) < 0.5 for s in shapes]
    bufs, steps, state = [torch.zeros_like(p) for p in params], steps_for(62, device), torch.zeros(2, device=device)

    def step():
        state.zero_()
        KERNELS["masked_norm"](grads, masks, state, alpha=2.0)
        KERNELS["sgd_update"](params, grads, masks, bufs, steps, state, lr=0.01, scale=-2.0, momentum=0.9,
                              dampening=0.0, weight_decay=5e-4, nesterov=False, max_norm=7.0)

    step()  # builds the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.slow
@gpu_only
def test_offsets_past_two_to_the_31():
    """int64 offsets: a tensor of 2**31 + 8 elements is updated to its last element."""
    device = torch.device("cuda")
    n = 2**31 + 8
    fisher = torch.zeros(n, dtype=torch.float32, device=device)
    grad = torch.full((n,), 2.0, dtype=torch.bfloat16, device=device)
    KERNELS["fisher_accumulate"]([fisher], [grad], scale=0.5)
    assert fisher[-9:].eq(2.0).all() and fisher[:4].eq(2.0).all()
    assert int((fisher != 2.0).sum()) == 0
