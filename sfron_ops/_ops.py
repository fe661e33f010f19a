"""The op schemas: the single source of truth for every backend.

Each op family has one in-place op in the ``sfron_ops`` namespace. Lists are
``Tensor[]`` (mutated ones annotated ``(a!)``), scalars are keyword-only and
every op returns nothing. The same file stem names the family everywhere:
``csrc/cpu/<stem>.cpp``, ``csrc/cuda/<stem>.cu``, ``sfron_ops/triton/<stem>.py``,
``tests/test_<stem>.py`` and ``benchmarks/bench_<stem>.py``.

Conventions shared by all ops:

* arithmetic is float32 whatever the tensor dtype; results are rounded once
  to the dtype of the tensor they are stored in;
* ``masks`` is either empty (no mask: all ones) or aligned with the other
  lists; a mask is bool, uint8 or floating point and multiplies the gradient.
  With ``packed_masks=True`` each mask is instead a contiguous uint8 tensor of
  ``ceil(numel / 8)`` bytes, one bit per element: element ``i`` is bit
  ``i % 8`` (least significant first) of byte ``i // 8``;
* ``norm_state`` is a float32 tensor of two elements on the tensors' device:
  ``[sum of squares of the direction, non-finite flag]``. ``masked_sq_norm_``
  adds to it; the update ops read it to clip (``max_norm > 0``) and to skip
  the whole update when the flag is set. ``None`` means neither;
* ``steps`` are float32 scalars (0-dim) on the parameters' device. The update
  ops increment them unless the step is skipped, so an optimizer step needs no
  host synchronisation;
* tensor scalars: ``alpha_tensor``, ``lr_tensor`` and ``scale_tensor`` are
  optional float32 0-dim tensors on the tensors' device that multiply
  ``alpha``, ``lr`` and ``scale``. The kernels read them where they run, so a
  schedule that updates them in place reaches a compiled step or a captured
  CUDA graph without a host read;
* ``slow_sync_`` with a ``counter`` (a float32 0-dim tensor on the device,
  remain steps since the last sync) counts a step and syncs only when the
  count reaches ``period`` (then restarts it from 0); with a ``norm_state``
  whose flag is set it changes nothing, counter included.

The plain per-tensor PyTorch implementation in :mod:`sfron_ops.reference` is
registered as every op's default kernel; compiled kernels register for the
CPU and CUDA dispatch keys on top of it.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch._subclasses.fake_tensor import is_fake

NAMESPACE = "sfron_ops"

#: family stem -> schema (without the namespace). The op name is ``stem + "_"``.
SCHEMAS = {
    "masked_norm": (
        "masked_sq_norm_(Tensor[] grads, Tensor[] masks, Tensor(a!) norm_state, *, float alpha, "
        "bool packed_masks=False, Tensor? alpha_tensor=None) -> ()"
    ),
    "sgd_update": (
        "sgd_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[] masks, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] steps, Tensor? norm_state, *, float lr, float scale, float momentum, float dampening, "
        "float weight_decay, bool nesterov, float max_norm, bool packed_masks=False, Tensor? lr_tensor=None, "
        "Tensor? scale_tensor=None) -> ()"
    ),
    "adamw_update": (
        "adamw_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[] masks, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor? norm_state, *, float lr, float scale, "
        "float beta1, float beta2, float eps, float weight_decay, float max_norm, bool packed_masks=False, "
        "Tensor? lr_tensor=None, Tensor? scale_tensor=None) -> ()"
    ),
    "fisher_accumulate": "fisher_accumulate_(Tensor(a!)[] fishers, Tensor[] grads, *, float scale) -> ()",
    "saliency_mask": (
        "saliency_mask_(Tensor[] forget_fishers, Tensor[] remain_fishers, Tensor(a!)[] masks, "
        "Tensor(b!) kept, *, float gamma) -> ()"
    ),
    "slow_sync": (
        "slow_sync_(Tensor(a!)[] slow_params, Tensor(b!)[] params, *, float alpha, bool reset_fast, "
        "Tensor? norm_state=None, Tensor(c!)? counter=None, int period=1) -> ()"
    ),
}

#: family stem -> op name inside the namespace
OP_NAMES = {stem: schema.split("(", 1)[0] for stem, schema in SCHEMAS.items()}

#: saliency ratio guard, as in the official code
RATIO_EPS = 1e-15

#: the library that defines the ops (reference.py registers their default kernels on it)
LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)


def qualname(stem: str) -> str:
    return f"{NAMESPACE}::{OP_NAMES[stem]}"


def op(stem: str):
    """The dispatcher overload for a family, e.g. ``op("sgd_update")``."""
    return getattr(torch.ops.sfron_ops, OP_NAMES[stem]).default


def kernel_table(backend) -> dict:
    """A backend's table ``{family stem: kernel}``: its functions named like the ops (``sgd_update_``, ...)."""
    return {stem: getattr(backend, name) for stem, name in OP_NAMES.items()}


# --------------------------------------------------------------------------- checks
# The fake kernels only check; they are also run by the reference before it
# touches anything, so a bad call fails the same way on every backend.

_MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_aligned(name: str, lists: dict[str, list[torch.Tensor]], like: list[torch.Tensor], optional=()):
    n = len(like)
    for key, tensors in lists.items():
        if key in optional and len(tensors) == 0:
            continue
        torch._check(len(tensors) == n, lambda: f"{name}: {key} has {len(tensors)} tensors, expected {n}")
        for i, (t, ref) in enumerate(zip(tensors, like)):
            torch._check(
                t.shape == ref.shape,
                lambda: f"{name}: {key}[{i}] has shape {tuple(t.shape)}, expected {tuple(ref.shape)}",
            )
            torch._check(
                t.device == ref.device,
                lambda: f"{name}: {key}[{i}] is on {t.device}, expected {ref.device}",
            )


def _check_masks(name: str, masks, like, packed=False):
    if not packed:
        _check_aligned(name, {"masks": masks}, like, optional=("masks",))
        for i, m in enumerate(masks):
            torch._check(m.dtype in _MASK_DTYPES, lambda: f"{name}: masks[{i}] has unsupported dtype {m.dtype}")
        return
    torch._check(len(masks) == len(like), lambda: f"{name}: packed_masks needs one mask per tensor")
    for i, (m, t) in enumerate(zip(masks, like)):
        torch._check(
            m.dtype == torch.uint8 and m.numel() == (t.numel() + 7) // 8 and m.is_contiguous(),
            lambda: f"{name}: packed masks[{i}] must be contiguous uint8 with {(t.numel() + 7) // 8} bytes, "
            f"got {m.dtype} with {m.numel()}",
        )
        torch._check(m.device == t.device, lambda: f"{name}: masks[{i}] is on {m.device}, expected {t.device}")


def _span(t):
    """The bytes a tensor's elements lie in, as ``(first, end)``."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_distinct_writes(name: str, lists: dict):
    """No two tensors an op writes share memory (a parameter twice, overlapping views, one step counter for two
    parameters): their elements would be updated twice, and on a GPU by racing blocks."""
    tensors = [(key, i, t) for key, ts in lists.items() for i, t in enumerate(ts) if t is not None and t.numel()]
    if not tensors or is_fake(tensors[0][2]) or tensors[0][2].device.type == "meta":
        return  # tracing: no memory to compare
    spans = sorted((*_span(t), key, i) for key, i, t in tensors)
    for (_, end, k1, i1), (start, _, k2, i2) in zip(spans, spans[1:]):
        torch._check(start >= end, lambda: f"{name}: {k1}[{i1}] and {k2}[{i2}] share memory; each tensor the op "
                                           "writes must be its own")


def _check_same_dtype(name: str, key: str, tensors, dtype):
    for i, t in enumerate(tensors):
        torch._check(t.dtype == dtype, lambda: f"{name}: {key}[{i}] has dtype {t.dtype}, expected {dtype}")


def _check_norm_state(name: str, norm_state, like):
    if norm_state is None:
        return
    torch._check(
        norm_state.dtype == torch.float32 and norm_state.numel() == 2,
        lambda: f"{name}: norm_state must be a float32 tensor of 2 elements, got {norm_state.dtype} "
        f"with {norm_state.numel()} elements",
    )
    for i, t in enumerate(like):
        torch._check(
            t.device == norm_state.device,
            lambda: f"{name}: norm_state is on {norm_state.device} but params[{i}] is on {t.device}",
        )


def _check_scalar_tensor(name: str, key: str, t, like):
    if t is None:
        return
    torch._check(
        t.dtype == torch.float32 and t.numel() == 1,
        lambda: f"{name}: {key} must be a float32 scalar tensor, got {t.dtype} with {t.numel()} elements",
    )
    for i, p in enumerate(like):
        torch._check(t.device == p.device, lambda: f"{name}: {key} is on {t.device} but tensor {i} is on {p.device}")


def _check_steps(name: str, steps, like):
    torch._check(len(steps) == len(like), lambda: f"{name}: steps has {len(steps)} tensors, expected {len(like)}")
    for i, (s, p) in enumerate(zip(steps, like)):
        torch._check(
            s.numel() == 1 and s.dtype == torch.float32,
            lambda: f"{name}: steps[{i}] must be a float32 scalar, got {s.dtype} with {s.numel()} elements",
        )
        torch._check(s.device == p.device, lambda: f"{name}: steps[{i}] is on {s.device}, expected {p.device}")


def check_masked_sq_norm(grads, masks, norm_state, *, alpha, packed_masks=False, alpha_tensor=None):
    name = OP_NAMES["masked_norm"]
    _check_masks(name, masks, grads, packed_masks)
    _check_norm_state(name, norm_state, grads)
    _check_scalar_tensor(name, "alpha_tensor", alpha_tensor, grads)
    for i, g in enumerate(grads):
        torch._check(g.dtype in _FLOAT_DTYPES, lambda: f"{name}: grads[{i}] has non-floating dtype {g.dtype}")


def check_sgd_update(params, grads, masks, momentum_buffers, steps, norm_state, *, lr, scale, momentum,
                     dampening, weight_decay, nesterov, max_norm, packed_masks=False, lr_tensor=None,
                     scale_tensor=None):
    name = OP_NAMES["sgd_update"]
    _check_scalar_tensor(name, "lr_tensor", lr_tensor, params)
    _check_scalar_tensor(name, "scale_tensor", scale_tensor, params)
    _check_aligned(name, {"grads": grads, "momentum_buffers": momentum_buffers}, params,
                   optional=("momentum_buffers",))
    torch._check(
        momentum == 0 or len(momentum_buffers) == len(params),
        lambda: f"{name}: momentum={momentum} needs one momentum buffer per parameter",
    )
    _check_masks(name, masks, params, packed_masks)
    _check_steps(name, steps, params)
    _check_norm_state(name, norm_state, params)
    _check_distinct_writes(name, {"params": params, "momentum_buffers": momentum_buffers, "steps": steps})
    for key, tensors in (("grads", grads), ("momentum_buffers", momentum_buffers)):
        for i, (t, p) in enumerate(zip(tensors, params)):
            torch._check(t.dtype == p.dtype, lambda: f"{name}: {key}[{i}] has dtype {t.dtype}, expected {p.dtype}")


def check_adamw_update(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, *, lr, scale, beta1,
                       beta2, eps, weight_decay, max_norm, packed_masks=False, lr_tensor=None, scale_tensor=None):
    name = OP_NAMES["adamw_update"]
    _check_scalar_tensor(name, "lr_tensor", lr_tensor, params)
    _check_scalar_tensor(name, "scale_tensor", scale_tensor, params)
    _check_aligned(name, {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, params)
    _check_masks(name, masks, params, packed_masks)
    _check_steps(name, steps, params)
    _check_norm_state(name, norm_state, params)
    _check_distinct_writes(name, {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps})
    for key, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        for i, (t, p) in enumerate(zip(tensors, params)):
            torch._check(t.dtype == p.dtype, lambda: f"{name}: {key}[{i}] has dtype {t.dtype}, expected {p.dtype}")


def check_fisher_accumulate(fishers, grads, *, scale):
    name = OP_NAMES["fisher_accumulate"]
    _check_aligned(name, {"fishers": fishers}, grads)
    _check_same_dtype(name, "fishers", fishers, torch.float32)
    _check_distinct_writes(name, {"fishers": fishers})


def check_saliency_mask(forget_fishers, remain_fishers, masks, kept, *, gamma):
    name = OP_NAMES["saliency_mask"]
    _check_aligned(name, {"remain_fishers": remain_fishers, "masks": masks}, forget_fishers)
    _check_same_dtype(name, "forget_fishers", forget_fishers, torch.float32)
    _check_same_dtype(name, "remain_fishers", remain_fishers, torch.float32)
    for i, m in enumerate(masks):
        torch._check(m.dtype in (torch.bool, torch.uint8),
                     lambda: f"{name}: masks[{i}] must be bool or uint8, got {m.dtype}")
    _check_distinct_writes(name, {"masks": masks, "kept": [kept]})
    torch._check(kept.dtype == torch.int64 and kept.numel() == 1,
                 lambda: f"{name}: kept must be an int64 scalar, got {kept.dtype} with {kept.numel()} elements")


def check_slow_sync(slow_params, params, *, alpha, reset_fast, norm_state=None, counter=None, period=1):
    name = OP_NAMES["slow_sync"]
    _check_aligned(name, {"slow_params": slow_params}, params)
    _check_norm_state(name, norm_state, params)
    _check_scalar_tensor(name, "counter", counter, params)
    _check_distinct_writes(name, {"slow_params": slow_params, "params": params, "counter": [counter]})
    torch._check(period >= 1, lambda: f"{name}: period must be at least 1, got {period}")
    for i, (s, p) in enumerate(zip(slow_params, params)):
        torch._check(s.dtype == p.dtype, lambda: f"{name}: slow_params[{i}] has dtype {s.dtype}, expected {p.dtype}")


CHECKS = {
    "masked_norm": check_masked_sq_norm,
    "sgd_update": check_sgd_update,
    "adamw_update": check_adamw_update,
    "fisher_accumulate": check_fisher_accumulate,
    "saliency_mask": check_saliency_mask,
    "slow_sync": check_slow_sync,
}

_step = threading.local()


@contextlib.contextmanager
def step_scope():
    """One optimizer step over lists that its step plan checked when it was built.

    Inside, the Python backends skip their checks (the C++ and Triton kernels check on every call
    anyway), and, since nothing writes a gradient before the block ends, a backend may keep what it
    derives from the gradients in :func:`step_memo` for the step's later calls.
    """
    outer = getattr(_step, "memo", None)
    _step.memo = {} if outer is None else outer
    try:
        yield
    finally:
        _step.memo = outer


def step_memo() -> dict | None:
    """The current :func:`step_scope`'s memo; ``None`` outside one (and while compiling)."""
    return None if torch.compiler.is_compiling() else getattr(_step, "memo", None)


def validate(stem: str, *args, **kwargs) -> None:
    """Run a family's checks in eager mode outside a step (Dynamo cannot trace the message closures;
    traced calls come from the optimizer, whose lists are consistent by construction)."""
    if not torch.compiler.is_compiling() and getattr(_step, "memo", None) is None:
        CHECKS[stem](*args, **kwargs)


# Fake kernels: the ops return nothing and only mutate, so checking is all
# torch.compile needs to trace them.
for _stem, _check in CHECKS.items():
    torch.library.register_fake(qualname(_stem), _check, lib=LIBRARY)
