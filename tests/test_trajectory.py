"""Whole SFRon trajectories of every backend against the reference, step by step.

One test, parametrised over backends (on each device they run on, the CUDA kernels also emulated on
the CPU), bases, dtypes, mask formats and ``reset_fast``, on two runs: a small conv net trained on
random batches, and a parameter list of edge sizes (empty, one element, odd, more than one chunk)
in two param groups with bool, float and no masks and one non-finite forget gradient. Resuming from
a checkpoint is tested in ``test_optim_sfron.py``; ``torch.compile`` in ``test_compile_graph.py``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import EMULATED_CUDA, dtype_id, emulate_cuda_as_fused

from sfron_ops import SFRon

HYPER = {
    "model": {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
              "adamw": dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.05)},
    "tensors": {"sgd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
                "adamw": dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)},
}


@pytest.fixture
def backend(impl, device, monkeypatch):
    """``(impl, device)`` for SFRon; the emulated CUDA kernels run as ``impl="fused"`` on CPU tensors."""
    if impl == EMULATED_CUDA:
        emulate_cuda_as_fused(monkeypatch)
        impl = "fused"
    return impl, device


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params])


def model_run(impl, base, dtype, device, reset_fast, mask_format):
    """8 steps of a conv-BN net (a forget step every third, clipped; slow weights synced every 2nd)."""
    # no conv bias in front of the batch norm: its gradient would be rounding noise, which Adam scales up to lr
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    masks = {n: (torch.rand(p.shape, generator=g) < 0.6).to(device) for n, p in model.named_parameters()}
    opt = SFRon(model.named_parameters(), mask=masks, base=base, impl=impl, forget_alpha=4.0, max_grad_norm=0.5,
                remain_max_grad_norm=2.0, slow_alpha=0.6, sync_period=2, reset_fast=reset_fast,
                mask_format=mask_format, **HYPER["model"][base])
    data = torch.Generator().manual_seed(2)
    params, snapshots = list(model.parameters()), []
    for i in range(8):
        x = torch.randn(6, 3, 8, 8, generator=data).to(device, dtype)
        y = torch.randint(0, 5, (6,), generator=data).to(device)
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step(phase="forget" if i % 3 == 0 else "remain")
        opt.zero_grad()
        snapshots.append(_snapshot(opt, params))
    return snapshots, opt.skipped_steps


def tensors_run(impl, base, dtype, device, reset_fast, mask_format):
    """8 iterations (forget steps on even ones, clipped; remain steps; slow weights synced every 2nd) on
    edge-sized parameters in two groups, with bool, float (dense format only) and no masks, and one
    non-finite forget gradient."""
    g = torch.Generator().manual_seed(11)
    shapes = [(0,), (1,), (7,), (33, 5), (4099,), (2, 3, 3)]
    params = [torch.nn.Parameter((torch.rand(s, generator=g) * 2 - 1).to(device, dtype)) for s in shapes]
    soft = torch.rand(33, 5, generator=g)
    masks = [None, torch.ones(1, dtype=torch.bool), torch.rand(7, generator=g) < 0.5,
             soft.to(dtype) if mask_format == "dense" else soft < 0.5, torch.rand(4099, generator=g) < 0.3, None]
    hyper = HYPER["tensors"][base]
    opt = SFRon([{"params": params[:3]}, {"params": params[3:], "lr": hyper["lr"] / 2}],
                mask=[None if m is None else m.to(device) for m in masks], base=base, forget_alpha=4.0,
                max_grad_norm=3.0, remain_max_grad_norm=20.0, slow_alpha=0.5, sync_period=2,
                reset_fast=reset_fast, impl=impl, mask_format=mask_format, **hyper)
    snapshots = []
    for i in range(8):
        for phase in ["forget", "remain"] if i % 2 == 0 else ["remain"]:
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 3).to(device, dtype)
            if i == 4 and phase == "forget":
                params[4].grad[17] = float("inf")
            opt.step(phase=phase)
            snapshots.append(_snapshot(opt, params))
    return snapshots, opt.skipped_steps


RUNS = {"model": model_run, "tensors": tensors_run}
#: (run, base, dtype, mask format, reset_fast)
CASES = [("model", base, dtype, "dense", reset_fast) for base in ("sgd", "adamw")
         for dtype in (torch.float32, torch.bfloat16) for reset_fast in (True, False)] + [
    ("tensors", "sgd", torch.float32, "dense", True), ("tensors", "adamw", torch.float32, "dense", False),
    ("tensors", "sgd", torch.bfloat16, "dense", True), ("tensors", "adamw", torch.bfloat16, "dense", False),
    ("tensors", "adamw", torch.float32, "packed", False)]
#: state that must match bit for bit; the rest to the dtype's rounding
EXACT = ("step", "mask", "packed_mask")


@pytest.mark.parametrize("run,base,dtype,mask_format,reset_fast", CASES, ids=[
    f"{r}-{b}-{dtype_id(d)}-{f}" + ("" if r == "tensors" else f"-reset_fast={rf}") for r, b, d, f, rf in CASES])
def test_trajectory_matches_the_reference(backend, run, base, dtype, mask_format, reset_fast):
    impl, device = backend
    args = (base, dtype, device, reset_fast, mask_format)
    ours, skipped = RUNS[run](impl, *args)
    theirs, expected_skipped = RUNS[run]("reference", *args)
    assert skipped == expected_skipped == (1 if run == "tensors" else 0)
    assert len(ours) == len(theirs)
    for step, ((params, state), (ref_params, ref_state)) in enumerate(zip(ours, theirs)):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            where = f"step {step} params[{i}]"
            torch.testing.assert_close(p, q, msg=lambda m, where=where: f"{where}: {m}")
        for i, (s, r) in enumerate(zip(state, ref_state)):
            assert s.keys() == r.keys(), (step, i)
            assert "slow_param" in s  # besides steps, buffers or moments, masks
            for key, expected in r.items():
                if not torch.is_tensor(expected):
                    continue
                where = f"step {step} state[{i}][{key!r}]"
                if key in EXACT:
                    assert s[key].dtype == expected.dtype and torch.equal(s[key], expected), where
                else:
                    torch.testing.assert_close(s[key], expected, msg=lambda m, where=where: f"{where}: {m}")
