"""Contenders and the measurement of one op on one case, shared by ``run.py`` and the pytest benchmarks."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable

import torch

from sfron_ops import _impl

from . import baselines, cases
from .measure import peak_extra_bytes
from .ops import OPS, Runner, backend

BASELINE_NAMES = ("torch", "official")


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "ours" or "baseline"
    build: Callable[[str, cases.OpState], Runner]


def _ours(impl: str) -> Contender:
    return Contender(impl, "ours", lambda op, st: OPS[op].ours(st, backend(impl)))


def _baseline(name: str) -> Contender:
    table = baselines.BASELINES[name]
    return Contender(name, "baseline", lambda op, st: table[op](st))


def contenders(device, names=None) -> tuple[list[Contender], dict]:
    """Every backend that can run on ``device``, then the baselines; and why the others cannot run."""
    available = dict(_impl.available_impls(device))
    if torch.device(device).type == "cpu" and available.get("triton") is None:
        # TRITON_INTERPRET=1 makes Triton run on CPU tensors in its interpreter: a correctness tool, not a backend
        available["triton"] = "on CPU Triton only runs in its interpreter (TRITON_INTERPRET=1); not a speed contender"
    out = [_ours(impl) for impl, why in available.items() if why is None]
    out += [_baseline(name) for name in BASELINE_NAMES]
    unavailable = {impl: why for impl, why in available.items() if why is not None}
    if names:
        known = {c.name for c in out}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"contenders {missing} are not available on {device}: "
                             + "; ".join(f"{n}: {unavailable.get(n, 'unknown')}" for n in missing))
        out = [c for c in out if c.name in names]
    return out, unavailable


#: states at least this large are collected explicitly (a full gc pass costs ~0.1-0.5 s with torch loaded)
COLLECT_NUMEL = 1 << 24


def release(device, numel: int = COLLECT_NUMEL) -> None:
    """Give the memory of a finished measurement back (reference cycles included for large states)."""
    if numel >= COLLECT_NUMEL:
        gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def verify(op: str, case: cases.Case, dtype, device, the_contenders, seed=0) -> dict:
    """One call of every contender from the same state; the largest difference from ``reference``.

    Returns ``{contender: worst relative difference}`` (``None`` for the
    reference itself): per output tensor, the largest absolute difference over
    the largest absolute reference value, in float32 on the CPU. Bool outputs
    count mismatching elements instead.
    """
    spec = OPS[op]
    template = cases.make_state(case, dtype, device, spec.needs, seed)
    results = {}
    ref_outputs = None
    ordered = sorted(the_contenders, key=lambda c: c.name != "reference")
    if ordered[0].name != "reference":
        raise ValueError("verify needs the reference backend among the contenders")
    for contender in ordered:
        with torch.no_grad():
            runner = contender.build(op, template.copy())
            runner.step()
            outputs = [t.detach().cpu() for t in runner.outputs()]
        if ref_outputs is None:
            ref_outputs = outputs
            results[contender.name] = None
            continue
        if len(outputs) != len(ref_outputs):
            raise AssertionError(f"{op}/{contender.name}: {len(outputs)} outputs, reference has {len(ref_outputs)}")
        worst = 0.0
        for got, want in zip(outputs, ref_outputs):
            if want.dtype == torch.bool or got.dtype == torch.bool:
                worst = max(worst, float((got.to(torch.bool) != want.to(torch.bool)).sum()))
            else:
                if want.numel():
                    scale = max(float(want.float().abs().max()), 1e-30)
                    worst = max(worst, float((got.float() - want.float()).abs().max()) / scale)
        results[contender.name] = worst
        del runner
    release(device, case.numel)
    return results


def measure(op: str, state: cases.OpState, contender: Contender, timer, memory=True) -> dict:
    """Time ``contender`` on ``op`` with its own copy of ``state``; peak memory after the timing."""
    with torch.no_grad():
        runner = contender.build(op, state.copy())
        timing = timer(runner.step)
        peak = peak_extra_bytes(runner.step, state.device) if memory else None
    row = {"contender": contender.name, "kind": contender.kind, "note": runner.note, **timing, "memory": peak}
    del runner
    release(state.device, state.case.numel)
    return row
