"""What every Triton family shares: launch constants, pointer tables, workspaces, device helpers.

Note [one launch per pass]
    A call covers all of its tensors with one kernel launch. Each program
    handles one chunk of ``CHUNK`` elements of one tensor. With a single
    tensor the kernel gets the tensor itself ("direct" mode, the flat-buffer
    case: typed pointer arguments, nothing looked up). With several tensors it
    gets one int64 device table ("table" mode)::

        table[0 : C]                    chunk map: (tensor index << 32) | chunk index within the tensor
        table[C + t*NCOLS + k]          address of tensor t in column k (params, grads, ...)
        table[C + t*NCOLS + NCOLS - 1]  numel of tensor t

    and reads its chunk's addresses from it, casting them to the element type
    of a "witness" argument (the first tensor of the same column, which also
    fixes the kernel's specialisation). Tables are built once per call
    signature and cached with the call's plan (Note [plans]), so a training
    loop whose tensors stay where they are pays for the table once; a miss
    costs one small host-to-device copy from pinned memory, no synchronisation.

    Tensors that are not contiguous are processed in memory order when every
    tensor of an element tuple (param, grad, state, mask) has the same dense
    strides; otherwise they are staged through contiguous copies and copied
    back (a correctness fallback: still one kernel launch, plus the copies).

Note [last program]
    Work that must wait for the whole pass (the final sum of the norm
    partials, the step increments) is done by the program that finishes
    last: every program bumps an int32 counter with an acq_rel atomic after
    a barrier, and the one that sees ``num_programs - 1`` does the epilogue
    and resets the counter to zero for the next launch on the stream. The
    partial sums are added in program order, so the result does not depend
    on scheduling (no float atomics), and the skip flag and the clip
    coefficient never leave the device.

Under ``torch.compile`` the tensors are fake while tracing and have no
addresses; the same kernels are then launched in direct mode, one launch per
tensor, through ``torch.library.wrap_triton`` so that Inductor sees them.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import triton_op

from .. import _ops

#: elements per inner iteration of a program; Triton's default 4 warps give each thread 8 elements
#: (two 16-byte vectors of float32, one of bfloat16)
BLOCK = 1024
#: elements per program of the elementwise passes (4 iterations)
CHUNK = 4096
#: elements per program of the norm pass: fewer partial sums for the last program to add
NORM_CHUNK = 16384
#: partial sums the last program adds per iteration
REDUCE_BLOCK = 1024
#: step counters the last program advances per iteration
STEP_BLOCK = 128
#: call plans kept per process (least recently used evicted), Note [plans]
PLAN_CACHE_SIZE = 64

#: largest finite float32; |u| <= FLT_MAX is false exactly for NaN and +-inf
FLT_MAX = tl.constexpr(3.4028234663852886e38)

#: values of the MASK_KIND constexpr
NO_MASK = 0
ELEMENT_MASK = 1  # bool (read as uint8), uint8 or floating point: m = float(mask[i])
PACKED_MASK = 2  # bit i % 8 of byte i // 8
# the same, as globals kernels can read
_ELEMENT_MASK = tl.constexpr(ELEMENT_MASK)
_PACKED_MASK = tl.constexpr(PACKED_MASK)
_NO_MASK = tl.constexpr(NO_MASK)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_function(fn):
    """``@triton.jit`` for the helpers that kernels call.

    Under ``TRITON_INTERPRET=1`` the interpreter patches ``triton.language`` again on every
    nested call (milliseconds each, most of the interpreted run time); the calling kernel has
    already patched it, so the interpreted helper's rewritten body is called directly.
    """
    jitted = triton.jit(fn)
    rewrite = getattr(jitted, "rewrite", None) if interpreted() else None
    if rewrite is None:
        return jitted

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return rewrite()(*args, **kwargs)

    return call


# --------------------------------------------------------------------------- device helpers


@device_function
def chunk_of(table, num_chunks, NCOLS: tl.constexpr, CHUNK: tl.constexpr):
    """Table mode: (row pointer, first element, numel) of this program's chunk."""
    entry = tl.load(table + tl.program_id(0))
    tensor = entry >> 32
    row = table + num_chunks + tensor * NCOLS
    start = (entry - (tensor << 32)) * CHUNK
    numel = tl.load(row + (NCOLS - 1))
    return row, start, numel


@device_function
def chunk_extent(start, numel, EVEN: tl.constexpr, CHUNK: tl.constexpr):
    """How many elements of a chunk to visit: all of them, or only up to the end of the tensor."""
    if EVEN:
        extent = CHUNK
    else:
        extent = tl.minimum(numel - start, CHUNK)
    return extent


@device_function
def column(row, COL: tl.constexpr, witness, ALIGNED: tl.constexpr):
    """Table mode: the address in column ``COL`` of a row, typed like ``witness``."""
    ptr = tl.load(row + COL).to(witness.dtype, bitcast=True)
    if ALIGNED:
        # the host checked that every address of the table is 16-byte aligned: allows vector accesses
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_function
def program_chunk(table, num_chunks, numel, NCOLS: tl.constexpr, CHUNK: tl.constexpr, TABLE: tl.constexpr):
    """(table row, first element, numel) of this program's chunk; in direct mode, of the call's one tensor.

    Direct-mode kernels pass ``None`` for the table and get a row that is no tensor: torch.compile's mutation
    analysis counts every argument of a helper whose result reaches a store (the addresses from ``tensor_at(row,
    ...)``) as written.
    """
    if TABLE:
        row, start, n = chunk_of(table, num_chunks, NCOLS, CHUNK)
    else:
        row = numel  # not read
        start = tl.program_id(0).to(tl.int64) * CHUNK
        n = numel
    return row, start, n


@device_function
def tensor_at(row, COL: tl.constexpr, arg, ALIGNED: tl.constexpr, TABLE: tl.constexpr):
    """The chunk's tensor of column ``COL``: its address from the table row, or the argument itself (direct mode)."""
    if TABLE:
        ptr = column(row, COL, arg, ALIGNED)
    else:
        ptr = arg
    return ptr


@device_function
def load_f32(ptr, offs, numel, EVEN: tl.constexpr):
    """ptr[offs] as float32; out-of-range lanes read 0 unless the whole block is in range (EVEN)."""
    if EVEN:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=offs < numel, other=0)
    return x.to(tl.float32)


@device_function
def round_to(value, DTYPE: tl.constexpr):
    """float32 ``value`` rounded to nearest-even in ``DTYPE``.

    bfloat16 is rounded with integer operations: the same result as the GPU's
    ``cvt.rn.bf16.f32``, and correct under the interpreter too, which truncates.
    """
    if value.dtype == DTYPE:
        rounded = value
    elif DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(value == value, bits, 0x7FC0)  # NaN stays a (quiet) NaN
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = value.to(DTYPE)
    return rounded


@device_function
def store(ptr, offs, value, numel, EVEN: tl.constexpr):
    """ptr[offs] = value rounded once to the element type of ptr."""
    value = round_to(value, ptr.dtype.element_ty)
    if EVEN:
        tl.store(ptr + offs, value)
    else:
        tl.store(ptr + offs, value, mask=offs < numel)


@device_function
def load_mask(mask_ptr, offs, numel, MASK_KIND: tl.constexpr, EVEN: tl.constexpr):
    """The mask value of each element as float32 (1 where there is no mask)."""
    if MASK_KIND == _PACKED_MASK:
        if EVEN:
            byte = tl.load(mask_ptr + (offs >> 3))
        else:
            byte = tl.load(mask_ptr + (offs >> 3), mask=offs < numel, other=0)
        m = ((byte.to(tl.int32) >> (offs & 7).to(tl.int32)) & 1).to(tl.float32)
    elif MASK_KIND == _ELEMENT_MASK:
        m = load_f32(mask_ptr, offs, numel, EVEN)
    else:
        m = 1.0
    return m


@device_function
def direction(g, m, coef, MASK_KIND: tl.constexpr):
    """u = (g * m) * coef, the reference's order (an infinite g under a zero mask gives NaN, as there)."""
    if MASK_KIND != _NO_MASK:
        g = g * m
    return g * coef


@device_function
def times_tensor(value, tensor, HAS_TENSOR: tl.constexpr):
    """``value * tensor[0]`` for an op's optional tensor scalar (read where the kernel runs), else ``value``."""
    if HAS_TENSOR:
        value = value * tl.load(tensor)
    return value


@device_function
def clip_and_skip(norm_state, scale, max_norm, HAS_NORM: tl.constexpr):
    """(scale * min(1, max_norm / (sqrt(norm_state[0]) + 1e-6)) if max_norm > 0 else scale, skip flag)."""
    if HAS_NORM:
        sq_norm = tl.load(norm_state)
        skip = tl.load(norm_state + 1) > 0
        clip = tl.minimum(tl.math.div_rn(max_norm, tl.sqrt_rn(sq_norm) + 1e-6), 1.0)
        coef = tl.where(max_norm > 0, scale * clip, scale)
    else:
        skip = False
        coef = scale
    return coef, skip


@device_function
def arrive(counter):
    """Signal that this program is done; True in the program that finished last (Note [last program])."""
    # every thread's loads and stores of this program come before the release below
    tl.debug_barrier()
    done = tl.atomic_add(counter, 1, sem="acq_rel")
    return done == tl.num_programs(0) - 1


@device_function
def advance_steps(table, num_chunks, num_tensors, steps, NCOLS: tl.constexpr, STEP_COL: tl.constexpr,
                  TABLE: tl.constexpr, STEP_BLOCK: tl.constexpr):
    """steps[t] += 1 for every tensor of the call (run by the last program only)."""
    if TABLE:
        for first in range(0, num_tensors, STEP_BLOCK):
            t = first + tl.arange(0, STEP_BLOCK)
            valid = t < num_tensors
            addr = tl.load(table + num_chunks + t.to(tl.int64) * NCOLS + STEP_COL, mask=valid, other=0)
            ptrs = addr.to(steps.dtype, bitcast=True)
            tl.store(ptrs, tl.load(ptrs, mask=valid, other=0) + 1.0, mask=valid)
    else:
        tl.store(steps, tl.load(steps) + 1.0)


# --------------------------------------------------------------------------- host: launches


class LaunchRecord(NamedTuple):
    kernel: object
    grid: int
    args: tuple
    constexprs: dict


_recorders: list[tuple[list, bool]] = []


@contextlib.contextmanager
def record_launches(execute: bool = True):
    """Record every kernel launch made inside the block (a list of :class:`LaunchRecord`).

    ``execute=False`` records without launching (to compile the launched variants ahead of time).
    """
    records: list[LaunchRecord] = []
    entry = (records, execute)
    _recorders.append(entry)
    try:
        yield records
    finally:
        del _recorders[next(i for i, e in enumerate(_recorders) if e is entry)]


@contextlib.contextmanager
def count_launches():
    """``{kernel name: launches}`` for the launches made inside the block."""
    counts: collections.Counter = collections.Counter()
    with record_launches() as records:
        yield counts
        counts.update(r.kernel.__name__ for r in records)


def traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tracing stand-in (fake or functional tensor) without real storage."""
    return is_fake(t) or isinstance(t, FunctionalTensor)


def launch(kernel, grid: int, args: tuple, *, trace: bool, **constexprs) -> None:
    """Launch ``kernel`` on a 1-D grid.

    While tracing, ``kernel`` is the family's ``wrap_triton(kernel)``, so that torch.compile records
    the launch (and ``triton_op`` finds the kernel in the family's source).
    """
    execute = True
    for records, run in _recorders:
        raw = kernel.kernel if isinstance(kernel, TraceableTritonKernelWrapper) else kernel
        records.append(LaunchRecord(raw, grid, args, constexprs))
        execute = execute and run
    if not execute:
        return
    if trace and interpreted():
        # wrap_triton cannot trace interpreted kernels: fake-tensor propagation has nothing to
        # compute for an op that returns nothing, but a graph without the kernels would be wrong
        if any(isinstance(a, FunctionalTensor) for a in args):
            raise RuntimeError(
                "sfron_ops Triton kernels under TRITON_INTERPRET=1 cannot be traced into an AOT graph; "
                "use torch.compile(backend='eager') on CPU, or a CUDA device for Inductor")
        return
    kernel[(grid,)](*args, **constexprs)


# --------------------------------------------------------------------------- host: workspaces


_workspaces: dict = {}


def workspace(device: torch.device, partials: int, trace: bool):
    """(counter, partial sums) for one launch: an int32 zero that the kernel leaves at zero, and
    ``partials`` float32 slots. Cached per device and stream; fresh tensors while tracing."""
    if trace:
        return (torch.zeros(1, dtype=torch.int32, device=device),
                torch.empty(max(partials, 1), dtype=torch.float32, device=device))
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    entry = _workspaces.get(key)
    if entry is None or entry[1].numel() < partials:
        counter = entry[0] if entry is not None else torch.zeros(1, dtype=torch.int32, device=device)
        size = max(partials, 2 * entry[1].numel() if entry is not None else 4096)
        entry = _workspaces[key] = (counter, torch.empty(size, dtype=torch.float32, device=device))
    return entry


def placeholder(device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """An empty tensor: a typed pointer argument that is never dereferenced."""
    return torch.empty(0, dtype=dtype, device=device)


def optional_arg(tensor, device: torch.device) -> torch.Tensor:
    """An op's optional tensor (norm_state, a tensor scalar) as a kernel argument: a float32 placeholder when absent."""
    return placeholder(device, torch.float32) if tensor is None else tensor


def mask_kind(masks, packed_masks: bool) -> int:
    """The MASK_KIND constexpr of a call."""
    return PACKED_MASK if packed_masks else ELEMENT_MASK if masks else NO_MASK


# --------------------------------------------------------------------------- host: the op's entry


def op_entry(stem: str, host: Callable, mutates_args: set[str]):
    """The family's kernel with the op's arguments, and its ``triton_op`` (``sfron_ops::<op>triton_``).

    ``host`` takes the op's arguments, its optional tensors before the keyword-only numbers (torch.library
    ops take no keyword-only tensors). Eager calls run it directly; while torch.compile traces, the
    triton_op records it, so that Inductor sees the kernels.
    """
    name = _ops.OP_NAMES[stem]
    traced = triton_op(f"{_ops.NAMESPACE}::{name}triton_", host, mutates_args=mutates_args)

    @functools.wraps(host)
    def kernel(*args, **kwargs):
        return (traced if torch.compiler.is_compiling() else host)(*args, **kwargs)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = f"``{_ops.qualname(stem)}`` in one Triton launch (per dtype group); see :mod:`{host.__module__}`."
    return kernel, traced


# --------------------------------------------------------------------------- host: element tuples
#
# A call is described by its columns: lists aligned with the tensors of the call (params, grads,
# masks, ...), ``None`` for an absent one (no mask, no momentum). The first ``elements`` columns hold
# one value per element; the others (step counters) one value per tensor. Every family fixes the
# order of its columns, which is also the order of a table row.


def _dense_in_memory(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements from ``data_ptr`` (any dim order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_memory_order(tensors) -> bool:
    """Whether elementwise math over raw memory pairs the right elements of ``tensors``."""
    if all(t.is_contiguous() for t in tensors):
        return True
    first = tensors[0]
    return all(t.stride() == first.stride() for t in tensors) and _dense_in_memory(first)


class Staging:
    """Contiguous stand-ins for tensors that cannot be processed in place, copied back after the launch."""

    def __init__(self):
        self.writeback = []
        self.copies = False

    def fix(self, columns, elements: int, mutated: tuple[int, ...], logical_order: bool = False) -> None:
        """Replace, in place in ``columns``, the tensors of every element tuple that needs it.

        ``mutated``: the columns written by the kernel (copied back by :meth:`finish`).
        ``logical_order``: a column is addressed by logical index (packed masks), so only
        contiguous tensors can be processed in memory order.
        """
        present = [(c, col) for c, col in enumerate(columns[:elements]) if col is not None]
        for i in range(len(present[0][1])):
            tup = [col[i] for _, col in present]
            if all(t.is_contiguous() for t in tup) or (not logical_order and same_memory_order(tup)):
                continue
            for c, col in present:
                t = col[i]
                if not t.is_contiguous():
                    col[i] = self.copy(t, c in mutated)

    def copy(self, t: torch.Tensor, mutated: bool) -> torch.Tensor:
        self.copies = True
        staged = t.contiguous()
        if mutated:
            self.writeback.append((t, staged))
        return staged

    def finish(self) -> None:
        for original, staged in self.writeback:
            original.copy_(staged)


def mask_column(masks: list[torch.Tensor], staging: Staging) -> list[torch.Tensor]:
    """Masks of one dtype per call: several dtypes become float32 copies, which is exactly what the
    kernels convert every mask value to. (bool masks are read as uint8, the same bytes: see
    :meth:`Launch.witnesses`.)"""
    if len({m.dtype for m in masks}) > 1:
        staging.copies = True
        return [m.to(torch.float32) for m in masks]
    return masks


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """bool tensors as uint8 (the same bytes), so that every kernel reads and writes bytes."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


# --------------------------------------------------------------------------- host: plans and tables
#
# Note [plans]
#     Validating a call (the shared checks of sfron_ops._ops), choosing launches and building tables
#     cost far more host time than launching. Each call has a signature: for every tensor its address
#     (its device when it has no storage), shape, strides and dtype, plus the structural flags of the
#     family. Everything the checks and the launch choices look at is a function of the signature, so a
#     call whose signature was seen before reuses that call's plan: no checks, no table building, only
#     the launches. A plan holds no reference to the call's tensors (tables store addresses, and typed
#     empty tensors stand in as witnesses), so it does not keep freed gradients alive; if new tensors
#     later occupy the same addresses with the same layout, the plan is exactly right for them too.


def signature(items) -> tuple:
    """The part of a call's signature that comes from tensors: lists, single tensors or None."""
    out = []
    for item in items:
        if item is None:
            out.append(None)
        elif isinstance(item, torch.Tensor):
            out.append((item.data_ptr() or item.device, item.shape, item.stride(), item.dtype))
        else:
            out.append(tuple([(t.data_ptr() or t.device, t.shape, t.stride(), t.dtype) for t in item]))
    return tuple(out)


class Launch:
    """One launch over a group of a call's tensors: direct (one tensor) or through a pointer table."""

    def __init__(self, columns, indices: list[int], elements: int, chunk: int, trace: bool):
        first = columns[0][indices[0]]
        self.indices = indices
        self.final = False  # the last launch of its call (set by execute)
        self.device = first.device
        self.num_tensors = len(indices)
        self.table_mode = len(indices) > 1
        if self.table_mode:
            group = [None if col is None else [col[i] for i in indices] for col in columns]
            self.table, self.num_chunks, self.aligned = _device_table(group, elements, chunk)
            self.grid = self.num_chunks
            self.numel = 0
            # the kernel only needs each column's element type: typed empty tensors, not the call's tensors
            self._witnesses = [placeholder(self.device, torch.int64) if col is None else
                               _byte_view(placeholder(self.device, col[0].dtype)) for col in group]
        else:
            # direct: Triton's own argument specialisation sees the alignment
            self.table, self.num_chunks, self.aligned = placeholder(self.device), 0, False
            self.numel = first.numel()
            self.grid = torch.sym_max((self.numel + chunk - 1) // chunk, 1)

    def witnesses(self, columns, trace: bool) -> list[torch.Tensor]:
        """The kernel's typed pointer arguments, one per column."""
        if self.table_mode:
            return self._witnesses
        i = self.indices[0]
        return [placeholder(self.device) if col is None else _byte_view(col[i]) for col in columns]


def _device_table(columns, elements, chunk):
    """The int64 table of Note [one launch per pass] on the device, its number of chunks, and whether
    every element address is 16-byte aligned."""
    present = [col for col in columns if col is not None]
    device = present[0][0].device
    numels = torch.tensor([t.numel() for t in present[0]], dtype=torch.int64)
    num_tensors = numels.numel()
    chunks_per_tensor = torch.clamp((numels + chunk - 1) // chunk, min=1)  # an empty tensor gets one idle chunk
    num_chunks = int(chunks_per_tensor.sum())
    tensor_index = torch.repeat_interleave(torch.arange(num_tensors, dtype=torch.int64), chunks_per_tensor)
    first_chunk = torch.cumsum(chunks_per_tensor, 0) - chunks_per_tensor
    chunk_index = torch.arange(num_chunks, dtype=torch.int64) - first_chunk[tensor_index]

    rows = torch.zeros((num_tensors, len(columns) + 1), dtype=torch.int64)
    for k, col in enumerate(columns):
        if col is not None:
            rows[:, k] = torch.tensor([t.data_ptr() for t in col], dtype=torch.int64)
    rows[:, -1] = numels

    host = torch.empty(num_chunks + rows.numel(), dtype=torch.int64, pin_memory=device.type == "cuda")
    host[:num_chunks] = (tensor_index << 32) | chunk_index
    host[num_chunks:] = rows.reshape(-1)
    aligned = all(t.data_ptr() % 16 == 0 for col in columns[:elements] if col is not None
                  for t in col if t.numel() > 0)
    if device.type == "cpu":
        return host, num_chunks, aligned
    # stream-ordered copy from pinned memory: no host synchronisation
    table = host.to(device, non_blocking=True)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a CUDA graph replays the copy from this pinned buffer: it must outlive the graph
        _captured_sources.append(host)
    return table, num_chunks, aligned


_plans: collections.OrderedDict = collections.OrderedDict()
_captured_sources: list[torch.Tensor] = []


def clear_caches() -> None:
    """Drop the cached plans and workspaces (they are rebuilt on the next call)."""
    _plans.clear()
    _workspaces.clear()


def execute(family: str, columns, elements: int, chunk: int, *, check, issue, flags=(), state=(),
            mutated=(), masks_at: int | None = None, packed_masks: bool = False) -> None:
    """Validate, plan and launch one call of a family (Note [plans]).

    Args:
        columns: the call's columns (see above); ``columns[masks_at]`` holds the masks as given.
        check: runs the op's checks (raises on bad input before anything is written).
        issue: ``issue(launch, witnesses, state, trace)`` makes one kernel launch.
        flags: the family's structural choices (mask kind, momentum on or off, ...).
        state: small tensors the kernels index directly (norm_state, kept), ``(tensor or None, mutated)``.
        mutated: the columns the kernel writes.
        masks_at: the index of the mask column, if the family has one.
        packed_masks: the masks are packed bits, addressed by logical element index.
    """
    first = columns[0]
    trace = bool(first) and traced(first[0])
    key = None
    if first and not trace:
        key = (family, flags, signature(columns), signature([t for t, _ in state]))
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            tensors = [t for t, _ in state]
            for call in plan:
                issue(call, call.witnesses(columns, False), tensors, False)
            return
    check()
    if not first:
        return
    staging = Staging()
    columns = [None if col is None else list(col) for col in columns]
    if masks_at is not None and columns[masks_at] is not None and not packed_masks:
        columns[masks_at] = mask_column(columns[masks_at], staging)
    staging.fix(columns, elements, mutated, logical_order=packed_masks)
    tensors = [t if t is None or t.is_contiguous() else staging.copy(t, m) for t, m in state]
    plan = [Launch(columns, indices, elements, chunk, trace) for indices in _launch_groups(columns, elements, trace)]
    plan[-1].final = True
    for call in plan:
        issue(call, call.witnesses(columns, trace), tensors, trace)
    staging.finish()
    if key is not None and not staging.copies:
        _plans[key] = plan
        if len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)


def _launch_groups(columns, elements, trace):
    """Tensor indices per launch: one launch per dtype combination of the element columns (one in all
    usual cases), and one per tensor while tracing, when tensors have no addresses."""
    groups: dict = {}
    for i in range(len(columns[0])):
        key = tuple(col[i].dtype for col in columns[:elements] if col is not None)
        groups.setdefault(key, []).append(i)
    if trace:
        return [[i] for idx in groups.values() for i in idx]
    return list(groups.values())
