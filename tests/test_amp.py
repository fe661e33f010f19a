"""GradScaler with both SFR-on phases, and Fisher accumulated on unscaled gradients (CPU scaler; GPU when present)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sfron_ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)


def batches(device, n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=g).to(device), torch.randint(0, 3, (8,), generator=g).to(device))
            for _ in range(2 * n)]


def make(model, masks=None):
    return sfron_ops.SFRon(model.named_parameters(), mask=masks, lr=0.05, momentum=0.9, weight_decay=5e-4,
                           forget_alpha=3.0, max_grad_norm=0.5, slow_alpha=0.5, sync_period=2, impl="foreach")


def masks_for(model):
    g = torch.Generator().manual_seed(2)
    return {n: (torch.rand(p.shape, generator=g) < 0.5).to(p.device) for n, p in model.named_parameters()}


def run(device, scaler=None, autocast_dtype=None, n=6):
    model = mlp(device)
    opt = make(model, masks_for(model))
    data = batches(device, n)
    ctx = (lambda: torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)) if autocast_dtype \
        else (lambda: torch.autocast(device_type=torch.device(device).type, enabled=False))
    scales = []
    for i in range(n):
        (xf, yf), (xr, yr) = data[2 * i], data[2 * i + 1]
        for phase, loss_fn, (x, y) in (("forget", sfron_ops.adaptive_cross_entropy, (xf, yf)),
                                       ("remain", F.cross_entropy, (xr, yr))):
            with ctx():
                loss = loss_fn(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step(phase=phase)
            else:
                scaler.scale(loss).backward()
                scaler.step(opt, phase=phase)  # kwargs reach opt.step
                scaler.update()  # one step per update: after each phase
                scales.append(scaler.get_scale())
            opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], scales, opt


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_phases_match_unscaled_bitwise(device):
    plain, _, _ = run(device)
    # a power-of-two scale that grows every other step: unscaling is exact, so the run is the same bits
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=2)
    scaled, scales, opt = run(device, scaler)
    assert len(set(scales)) > 1
    for a, b in zip(scaled, plain):
        assert torch.equal(a, b)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_phases_under_bf16_autocast_match_the_unscaled_autocast_run(device):
    plain, _, _ = run(device, autocast_dtype=torch.bfloat16)
    scaled, _, _ = run(device, torch.amp.GradScaler(device, init_scale=2.0 ** 8), autocast_dtype=torch.bfloat16)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fisher_is_accumulated_on_unscaled_gradients(device):
    data = batches(device, 2)
    fishers = {}
    for how in ("plain", "scaler", "scaled_without_scaler"):
        model = mlp(device)
        opt = make(model)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
        for x, y in data[:3]:
            loss = F.cross_entropy(model(x), y)
            if how == "plain":
                loss.backward()
                assert opt.accumulate_fisher("forget", scale=1 / 3) is True
            elif how == "scaler":
                scaler.scale(loss).backward()
                assert opt.accumulate_fisher("forget", scale=1 / 3, grad_scaler=scaler) is True
                scaler.update()
            else:
                scaler.scale(loss).backward()
                opt.accumulate_fisher("forget", scale=1 / 3)
            opt.zero_grad()
        fishers[how] = opt.fisher("forget")
    for a, b, c in zip(fishers["scaler"], fishers["plain"], fishers["scaled_without_scaler"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, b * 2.0 ** 20)  # what forgetting to unscale costs: the scale squared


@pytest.mark.parametrize("device", DEVICES)
def test_overflow_skips_the_fisher_batch_and_both_phases(device):
    model = mlp(device)
    opt = make(model, masks_for(model))
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    (x, y), (x2, y2) = batches(device, 1)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    assert opt.accumulate_fisher("remain", grad_scaler=scaler)
    scaler.update()
    opt.zero_grad()
    before_fisher = [f.clone() for f in opt.fisher("remain")]

    def overflow():
        scaler.scale(F.cross_entropy(model(x2), y2)).backward()
        with torch.no_grad():
            next(model.parameters()).grad[0, 0] = float("inf")

    overflow()
    assert opt.accumulate_fisher("remain", grad_scaler=scaler) is False
    scaler.update()
    opt.zero_grad()
    for a, b in zip(opt.fisher("remain"), before_fisher):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0 ** 9  # the overflow backed the scale off

    params = [p.detach().clone() for p in model.parameters()]
    for phase in ("forget", "remain"):
        overflow()
        scaler.step(opt, phase=phase)
        scaler.update()
        opt.zero_grad()
        for p, b in zip(model.parameters(), params):
            assert torch.equal(p, b)
    assert scaler.get_scale() == 2.0 ** 7
    # the scaler skipped the steps before the optimizer saw them: no state was created, nothing was counted
    assert all("step" not in opt.state[p] for p in model.parameters())
    assert opt.skipped_steps == 0


def test_a_second_step_before_update_is_refused_by_the_scaler():
    model = mlp("cpu")
    opt = make(model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches("cpu", 1)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt, phase="forget")
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called since the last update"):
        scaler.step(opt)
