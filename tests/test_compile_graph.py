"""A full SFR-on iteration under ``torch.compile(fullgraph=True)`` and in CUDA graphs.

Tensor ``lr`` and ``forget_alpha`` are read by the compiled step at run time, so a learning-rate
scheduler and an α schedule that update them in place cause no recompilation. The slow-weight
counter takes ``sync_period`` values, so each phase compiles at most that many variants, all in
the first ``sync_period`` iterations. CUDA-graph capture runs only where a GPU is present.

An LR scheduler replaces ``opt.step`` on the instance by a wrapper that Dynamo does not trace, so
the compiled functions call the class's ``step`` (``type(opt).step(opt, phase=...)``).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import impl_skip_reason  # noqa: E402
from models import batches, random_masks, small_cnn
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

import sfron_ops

ITERS = 8
CONFIGS = {
    "sgd": dict(base="sgd", momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adamw": dict(base="adamw", weight_decay=0.05),
}


def mlp(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).to(device)


def data(device="cpu", n=ITERS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g).to(device), torch.randint(0, 4, (8,), generator=g).to(device))
            for _ in range(2 * n)]


def make(model, impl, base, mask_format="dense", sync_period=2, device="cpu"):
    g = torch.Generator().manual_seed(2)
    masks = {n: (torch.rand(p.shape, generator=g) < 0.5).to(device) for n, p in model.named_parameters()}
    opt = sfron_ops.SFRon(model.named_parameters(), mask=masks, impl=impl, mask_format=mask_format,
                          lr=torch.tensor(0.05 if base == "sgd" else 0.01, device=device),
                          forget_alpha=torch.tensor(3.0, device=device), max_grad_norm=0.5, remain_max_grad_norm=1.0,
                          slow_alpha=0.5, sync_period=sync_period, **CONFIGS[base])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=ITERS)
    return opt, sched


def iteration(i, model, opt, sched, batches, forget_step, remain_step):
    for g in opt.param_groups:
        g["forget_alpha"].fill_(3.0 * (1 + math.cos(math.pi * i / ITERS)) / 2)
    xf, yf = batches[2 * i]
    sfron_ops.adaptive_cross_entropy(model(xf), yf).backward()
    forget_step()
    opt.zero_grad()
    xr, yr = batches[2 * i + 1]
    F.cross_entropy(model(xr), yr).backward()
    remain_step()
    opt.zero_grad()
    sched.step()


def run(impl, base, compiled, mask_format="dense", sync_period=2):
    torch._dynamo.reset()
    counters.clear()
    model = mlp()
    opt, sched = make(model, impl, base, mask_format, sync_period)

    # the class's step: an LR scheduler wraps the instance's opt.step in a function Dynamo does not trace
    step = type(opt).step

    def forget_step():
        step(opt, phase="forget")

    def remain_step():
        step(opt)

    graphs = []
    steps = (lambda: opt.step(phase="forget"), opt.step)
    for i in range(ITERS):
        if compiled and i == 1:  # state exists after one eager iteration
            steps = (torch.compile(forget_step, fullgraph=True), torch.compile(remain_step, fullgraph=True))
        iteration(i, model, opt, sched, batches=DATA, forget_step=steps[0], remain_step=steps[1])
        graphs.append(counters["stats"]["unique_graphs"])
    return [p.detach().clone() for p in model.parameters()], graphs, opt


DATA = data()


@pytest.mark.parametrize("impl,base,mask_format", [("reference", "sgd", "dense"), ("foreach", "sgd", "dense"),
                                                   ("foreach", "adamw", "dense"), ("foreach", "adamw", "packed"),
                                                   ("fused", "sgd", "dense"), ("fused", "adamw", "packed")])
def test_full_iteration_compiles_without_recompiling_on_lr_and_alpha(impl, base, mask_format):
    reason = impl_skip_reason(impl, "cpu")
    if reason is not None:
        pytest.skip(reason)
    sync_period = 2
    eager, _, _ = run(impl, base, compiled=False, mask_format=mask_format, sync_period=sync_period)
    got, graphs, opt = run(impl, base, compiled=True, mask_format=mask_format, sync_period=sync_period)
    # forget and remain, each in one variant per value of the slow-weight counter, plus one recompile when
    # Dynamo adds its "capturable" key to the param groups: all within the first sync_period + 1 compiled
    # iterations, then none while lr and alpha change on every iteration
    settled = sync_period + 1
    assert graphs[0] == 0 and ITERS - 1 - settled >= 4
    assert graphs[settled] == graphs[-1] <= 2 * sync_period + 1, graphs
    # lr and alpha changed on every iteration and the compiled steps followed them
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the class's step
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_a_plan_made_while_tracing_serves_later_eager_steps(impl):
    """The first steps compiled (plan and state made while tracing), the rest eager: the same weights as eager."""
    reason = impl_skip_reason(impl, "cpu")
    if reason is not None:
        pytest.skip(reason)
    results = []
    for compiled_first in (False, True):
        torch._dynamo.reset()
        model = mlp()
        opt, sched = make(model, impl, "sgd")
        step = type(opt).step
        # each iteration's closures are used only within it
        forget_step, remain_step = (lambda: step(opt, phase="forget")), (lambda: step(opt))  # noqa: B023
        if compiled_first:
            forget_step, remain_step = torch.compile(forget_step, fullgraph=True), torch.compile(remain_step,
                                                                                               fullgraph=True)
        iteration(0, model, opt, sched, DATA, forget_step, remain_step)
        for i in range(1, 3):
            iteration(i, model, opt, sched, DATA, lambda: opt.step(phase="forget"), opt.step)  # noqa: B023
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_float_lr_is_what_recompiles():
    """The control: the same run with a float lr recompiles as the scheduler changes it."""
    torch._dynamo.reset()
    counters.clear()
    model = mlp()
    opt = sfron_ops.SFRon(model.parameters(), lr=0.05, momentum=0.9, impl="foreach")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=ITERS)
    step = torch.compile(lambda: type(opt).step(opt), fullgraph=True, dynamic=False)
    x, y = DATA[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    graphs = []
    for _ in range(4):
        step()
        sched.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] > graphs[0]


# --------------------------------------------------------------------------- CUDA graphs
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl", ["fused", "triton", "foreach"])
@pytest.mark.parametrize("base", list(CONFIGS))
def test_cuda_graph_replays_the_eager_iteration(base, impl):
    reason = impl_skip_reason(impl, "cuda")
    if reason is not None:
        pytest.skip(reason)
    device = torch.device("cuda")
    batches = data(device)

    def build():
        model = mlp(device)
        opt, sched = make(model, impl, base, sync_period=2, device=device)
        return model, opt, sched

    # eager
    model, opt, sched = build()
    for i in range(ITERS):
        iteration(i, model, opt, sched, batches, lambda: opt.step(phase="forget"), opt.step)
    eager = [p.detach().clone() for p in model.parameters()]

    # captured: one eager warm-up iteration creates the state, then each phase's step is one graph
    model, opt, sched = build()
    iteration(0, model, opt, sched, batches, lambda: opt.step(phase="forget"), opt.step)
    graphs = {}
    for phase in ("forget", "remain"):
        # capture records the kernels without running them; later backwards write into these .grad tensors
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            opt.step(phase=phase)
        torch.cuda.current_stream().wait_stream(side)
        graphs[phase] = graph

    def replay(phase):
        return lambda: graphs[phase].replay()

    for i in range(1, ITERS):
        for g in opt.param_groups:
            g["forget_alpha"].fill_(3.0 * (1 + math.cos(math.pi * i / ITERS)) / 2)
        xf, yf = batches[2 * i]
        for p in model.parameters():
            p.grad.zero_()
        sfron_ops.adaptive_cross_entropy(model(xf), yf).backward()
        replay("forget")()
        for p in model.parameters():
            p.grad.zero_()
        xr, yr = batches[2 * i + 1]
        F.cross_entropy(model(xr), yr).backward()
        replay("remain")()
        sched.step()
    for a, b in zip(model.parameters(), eager):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


def _phase_steps(opt, compiled):
    def forget_step():
        opt.step(phase="forget")

    def remain_step():
        opt.step()

    if compiled:
        return torch.compile(forget_step, fullgraph=True), torch.compile(remain_step, fullgraph=True)
    return forget_step, remain_step


@pytest.mark.parametrize("impl_name", ["reference", "foreach"])
def test_compiled_from_the_first_step_matches_eager(impl_name):
    """Float hyperparameters, and the optimizer state created inside the compiled step on its first call."""
    data = batches(6, seed=16)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = small_cnn()
        opt = sfron_ops.SFRon(model.named_parameters(), mask=random_masks(model), base="sgd", lr=0.02, momentum=0.9,
                              dampening=0.1, weight_decay=5e-4, forget_alpha=3.0, max_grad_norm=5.0, impl=impl_name,
                              slow_alpha=0.5, sync_period=2)
        forget_step, remain_step = _phase_steps(opt, compiled)
        for i in range(3):
            (xf, yf), (xr, yr) = data[2 * i], data[2 * i + 1]
            opt.zero_grad()
            sfron_ops.adaptive_cross_entropy(model(xf), yf).backward()
            forget_step()
            opt.zero_grad()
            F.cross_entropy(model(xr), yr).backward()
            remain_step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@gpu
def test_reduce_overhead_compiles_the_fused_step():
    """torch.compile(mode="reduce-overhead") (CUDA graphs inside) over the fused step, lr and alpha scheduled."""
    device = torch.device("cuda")
    batches = data(device)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = mlp(device)
        opt, sched = make(model, "fused", "sgd", device=device)
        step = type(opt).step
        # each iteration's closures are used only within it
        forget_step, remain_step = (lambda: step(opt, phase="forget")), (lambda: step(opt))  # noqa: B023
        for i in range(ITERS):
            if compiled and i == 1:
                forget_step = torch.compile(forget_step, mode="reduce-overhead", fullgraph=True)
                remain_step = torch.compile(remain_step, mode="reduce-overhead", fullgraph=True)
            iteration(i, model, opt, sched, batches, forget_step, remain_step)
        runs.append([p.detach().clone() for p in model.parameters()])
        if compiled:
            assert counters["stats"]["unique_graphs"] <= 3
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

