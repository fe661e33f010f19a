"""Methods: the zero-forget-loss pitfall of the adaptive weights, SalUn's mask, and what each method does."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import sfron_ops.loss
from sfron_ops import AdaptiveLoss, adaptive_weights
from sfron_ops.loss import ZeroForgetLossWarning
from sfron_ops.unlearn import adaptive_forget_loss, make_method, run
from sfron_ops.unlearn.data import TensorLoader
from sfron_ops.unlearn.methods import distill_kl, magnitude_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _overfit_linear():
    """A linear classifier and four forget samples: two fitted so well that their float32 loss is exactly 0."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[30.0, -30.0], [-30.0, 30.0]]))
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.02, 0.0], [0.0, 0.03]])
    y = torch.tensor([0, 0, 0, 1])
    return model, x, y


def test_zero_losses_take_all_the_adaptive_weight():
    model, x, y = _overfit_linear()
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    assert losses[0] == 0 and losses[1] == 0 and losses[2] > 0.1 and losses[3] > 0.1
    with pytest.warns(ZeroForgetLossWarning, match="2 of 4 forget samples have a loss of exactly 0"):
        w = adaptive_weights(losses, 0.5, loss_floor=None)  # the official weights: ~N/2 on each zero, ~1e-15 else
    assert w[:2].tolist() == pytest.approx([2.0, 2.0]) and w[2:].max() < 1e-12
    floored = adaptive_weights(losses, 0.5)  # the default floor, 1e-4
    torch.testing.assert_close(floored, adaptive_weights(losses.clamp_min(1e-4), 0.5, loss_floor=None))
    c = torch.tensor([1e-4 ** -0.5, 1e-4 ** -0.5, losses[2].item() ** -0.5, losses[3].item() ** -0.5])
    expected = 4 * c / c.sum()
    assert floored.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_the_floor_gives_the_ascent_its_gradient_back():
    model, x, y = _overfit_linear()
    ce = nn.CrossEntropyLoss(reduction="none")

    def grad_norm(loss):
        model.zero_grad()
        loss.backward()
        return model.weight.grad.norm().item()

    official = grad_norm(AdaptiveLoss(ce, 0.5, loss_floor=None)(model(x), y))
    same = grad_norm(adaptive_forget_loss(ce(model(x), y), 0.5, None))
    floored = grad_norm(adaptive_forget_loss(ce(model(x), y), 0.5, 1e-4))
    default = grad_norm(AdaptiveLoss(ce, 0.5)(model(x), y))
    plain = grad_norm(ce(model(x), y).mean())
    assert same == official and default == floored
    assert official < 1e-9 * plain  # all weight on samples without gradient: nothing to ascend
    assert floored > 0.01 * plain and floored > 1e6 * official


def _fitted_task(seed=0, steps=20):
    """A small MLP trained for a few steps on random data; forget = the first 20 of 120 samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(120, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (120,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, (x[:20], y[:20]), (x[20:], y[20:])


def test_sfron_stalls_on_zero_losses_without_the_floor(monkeypatch):
    model, (xf, yf), (xr, yr) = _fitted_task(steps=10)
    with torch.no_grad():
        right = (model(xf).argmax(1) == yf).nonzero().flatten()[:4]
        xf = xf.clone()
        xf[right] *= 40  # four forget samples the model is certain about: float32 loss exactly 0
        losses = nn.functional.cross_entropy(model(xf), yf, reduction="none")
    assert 0 < int((losses == 0).sum()) < 20 and losses.mean() > 0.1

    def unlearn(loss_floor):
        m = copy.deepcopy(model)
        monkeypatch.setattr(sfron_ops.loss, "_zero_loss_warned", False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run("sfron", m, TensorLoader(xf, yf, 20), TensorLoader(xr, yr, 50), progress=False, iterations=10,
                forget_freq=1, lr=0.01, forget_alpha=50.0, max_grad_norm=5.0, loss_floor=loss_floor, mask=False)
        zero_warnings = [w for w in seen if issubclass(w.category, ZeroForgetLossWarning)]
        with torch.no_grad():
            out = m(xf)
            return nn.functional.cross_entropy(out, yf).item(), (out.argmax(1) == yf).float().mean().item(), \
                zero_warnings

    acc0 = (model(xf).argmax(1) == yf).float().mean().item()
    loss, acc, warned = unlearn(None)  # the official weights: the ascent stalls
    assert loss == pytest.approx(losses.mean().item(), rel=0.05) and acc >= acc0 - 0.1
    assert len(warned) == 1 and "exactly 0" in str(warned[0].message)  # once, not on each of the 10 batches
    loss, acc, warned = unlearn(1e-4)
    assert loss > 5 * losses.mean().item() and acc <= acc0 - 0.3
    assert not warned


def test_magnitude_mask_keeps_the_largest_gradients():
    model = nn.Linear(4, 2)
    x = torch.randn(10, 4)
    y = torch.randint(0, 2, (10,))
    ce = nn.CrossEntropyLoss(reduction="none")
    masks = magnitude_mask(model, [(x[:5], y[:5]), (x[5:], y[5:])], ce, density=0.5)
    model.zero_grad()
    for sl in (slice(0, 5), slice(5, 10)):
        ce(model(x[sl]), y[sl]).mean().backward()  # gradients summed over batches
    grads = torch.cat([model.weight.grad.abs().flatten(), model.bias.grad.abs().flatten()])
    kept = torch.cat([masks["weight"].flatten(), masks["bias"].flatten()])
    assert int(kept.sum()) == 5  # ceil(0.5 * 10)
    assert grads[kept].min() >= grads[~kept].max()
    assert model.weight.grad is not None  # the caller's gradients are left alone
    none = magnitude_mask(model, [(x, y)], ce, density=0.0)
    assert not any(m.any() for m in none.values())


def test_distill_kl_hand_case():
    s = torch.log(torch.tensor([[0.25, 0.75]]))
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    # T = 1: KL(teacher || student) = .5 ln(.5/.25) + .5 ln(.5/.75)
    assert distill_kl(s, t, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert distill_kl(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def _task():
    model, forget, remain = _fitted_task(1)
    return model, TensorLoader(*forget, 10, shuffle=True, seed=1), TensorLoader(*remain, 25, shuffle=True, seed=2)


def _forget_loss(model, loader):
    with torch.no_grad():
        return sum(nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in loader)


@pytest.mark.parametrize("name, hp", [
    ("ga", dict(iterations=10, lr=0.05)),
    ("rl", dict(iterations=10, lr=0.05)),
    ("salun", dict(iterations=10, lr=0.05)),
    ("scrub", dict(iterations=10, lr=0.05, max_fraction=1.0)),
    ("sfron", dict(iterations=10, lr=0.01, forget_freq=1, forget_alpha=50.0, max_grad_norm=5.0)),
])
def test_forgetting_methods_raise_the_forget_loss(name, hp):
    model, forget, remain = _task()
    before = _forget_loss(model, forget)
    res = run(name, model, forget, remain, progress=False, **hp)
    assert res.completed
    assert _forget_loss(model, forget) > 1.5 * before


def test_ft_only_sees_the_remain_set_and_salun_moves_only_salient_weights():
    model, forget, remain = _task()
    res = run("ft", model, None, remain, progress=False, iterations=3, lr=0.01)
    assert "forget_loss" not in res.history[-1]
    model, forget, remain = _task()
    before = [p.detach().clone() for p in model.parameters()]
    # no momentum or weight decay, so a masked-out weight cannot move at all
    res = run("salun", model, forget, remain, progress=False, iterations=3, lr=0.01, momentum=0.0,
              weight_decay=0.0, density=0.3)
    method_masks = res.info
    assert method_masks["mask_kept"] == math.ceil(0.3 * method_masks["mask_total"])
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    assert 0 < moved <= method_masks["mask_kept"]


def test_scrub_and_sfron_validate_their_hyperparameters():
    with pytest.raises(ValueError, match="Invalid temperature: 0"):
        make_method("scrub", temperature=0)
    with pytest.raises(ValueError, match="Invalid forget_freq: 0"):
        make_method("sfron", forget_freq=0)
    with pytest.raises(ValueError, match="Invalid alpha_schedule: 'linear'"):
        make_method("sfron", alpha_schedule="linear")
    with pytest.raises(ValueError, match="Invalid loss_floor: -1"):
        make_method("sfron", loss_floor=-1)
    with pytest.raises(ValueError, match="Invalid density: 2"):
        make_method("salun", density=2)
    with pytest.raises(ValueError, match="Invalid base: 'adam'"):
        make_method("ft", base="adam")


def test_sfron_slow_weights_average_becomes_the_result():
    model, forget, remain = _task()
    res = run("sfron", model, forget, remain, progress=False, iterations=6, lr=0.01, forget_freq=2,
              forget_alpha=10.0, slow_alpha=0.5, reset_fast=False)
    assert res.completed
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adamw_base_runs():
    model, forget, remain = _task()
    res = run("sfron", model, forget, remain, progress=False, iterations=4, base="adamw", lr=1e-3,
              forget_alpha=500.0, lambd=0.6, forget_freq=1, weight_decay=0.05)
    assert res.completed and res.info["skipped_steps"] == 0
