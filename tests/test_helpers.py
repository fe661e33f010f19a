"""AdaptiveLoss / adaptive_weights, fisher_diagonal and canonical_name."""

import warnings

import pytest
import torch
from models import batches, small_cnn
from torch.nn import functional as F

import sfron_ops.loss
from sfron_ops import (
    AdaptiveLoss,
    adaptive_cross_entropy,
    adaptive_weights,
    canonical_name,
    fisher_diagonal,
    saliency_mask,
)
from sfron_ops.loss import ZeroForgetLossWarning


def test_adaptive_weights_hand_checked():
    losses = torch.tensor([1.0, 4.0, 0.25])
    # c = 1/sqrt(l) = (1, 0.5, 2); w = 3 c / 3.5
    torch.testing.assert_close(adaptive_weights(losses, 0.5), torch.tensor([3 / 3.5, 1.5 / 3.5, 6 / 3.5]))
    torch.testing.assert_close(adaptive_weights(losses, 0.0), torch.ones(3))
    assert adaptive_weights(losses).mean().item() == pytest.approx(1.0)


def test_adaptive_weights_concentrate_on_zero_losses_without_a_floor(monkeypatch):
    # the official formula: a sample fitted exactly gets weight ~N, since with l = 0 its c is 1e15
    monkeypatch.setattr(sfron_ops.loss, "_zero_loss_warned", False)
    with pytest.warns(ZeroForgetLossWarning, match="1 of 3 forget samples"):
        w = adaptive_weights(torch.tensor([0.0, 1.0, 2.0]), loss_floor=None)
    assert w[0].item() == pytest.approx(3.0, rel=1e-6) and w[1:].sum().item() < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the first batch with zeros warns
        adaptive_weights(torch.tensor([0.0, 1.0]), loss_floor=None)


def test_adaptive_weights_floor_by_default():
    losses = torch.tensor([0.0, 1e-6, 1e-4, 0.01, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a floor: nothing to warn about
        w = adaptive_weights(losses)
    c = 1 / torch.tensor([1e-4, 1e-4, 1e-4, 0.01, 1.0]).sqrt()  # max(l, 1e-4)^-0.5
    torch.testing.assert_close(w, 5 * c / c.sum())
    assert sfron_ops.LOSS_FLOOR == 1e-4
    torch.testing.assert_close(adaptive_weights(losses, 0.5, loss_floor=0.01),
                               adaptive_weights(losses.clamp_min(0.01), 0.5, loss_floor=None))
    logits, target = torch.randn(6, 3), torch.randint(0, 3, (6,))
    per_sample = F.cross_entropy(logits, target, reduction="none")
    for floor in (None, 1e-4, 0.5):
        expected = (adaptive_weights(per_sample, 0.5, floor) * per_sample).mean()
        torch.testing.assert_close(AdaptiveLoss(lambd=0.5, loss_floor=floor)(logits, target), expected)
        torch.testing.assert_close(adaptive_cross_entropy(logits, target, 0.5, loss_floor=floor), expected)


def test_adaptive_weights_eps():
    # c = 1 / (l^0.5 + eps): with eps = 1, c = (1/2, 1/3), w = 2 c / sum(c)
    torch.testing.assert_close(adaptive_weights(torch.tensor([1.0, 4.0]), 0.5, eps=1.0),
                               torch.tensor([2 * 3 / 5, 2 * 2 / 5]))
    with pytest.raises(ValueError, match="Invalid eps: -1"):
        adaptive_weights(torch.ones(2), eps=-1.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1e-4"])
def test_adaptive_loss_rejects_a_bad_floor(bad):
    for make in (lambda: AdaptiveLoss(loss_floor=bad), lambda: adaptive_weights(torch.ones(2), loss_floor=bad),
                 lambda: adaptive_cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), loss_floor=bad)):
        with pytest.raises(ValueError, match="Invalid loss_floor"):
            make()


def test_adaptive_loss_weights_carry_no_gradient():
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.randint(0, 4, (5,))
    loss = AdaptiveLoss(lambd=0.6)(logits, target)
    per_sample = F.cross_entropy(logits, target, reduction="none")
    w = adaptive_weights(per_sample, 0.6)
    torch.testing.assert_close(loss, (w * per_sample).mean())
    (grad,) = torch.autograd.grad(loss, logits)
    (expected,) = torch.autograd.grad((w.detach() * F.cross_entropy(logits, target, reduction="none")).mean(), logits)
    torch.testing.assert_close(grad, expected)
    assert loss.item() > 0


def test_adaptive_loss_rejects_reduced_losses():
    with pytest.raises(ValueError, match="reduction='none'"):
        AdaptiveLoss(torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="Invalid lambd: -1"):
        AdaptiveLoss(lambd=-1)


def test_fisher_diagonal_matches_a_hand_loop_and_restores_the_model():
    model = small_cnn()
    model.train()
    loader = batches(3, seed=21)
    marker = torch.full_like(model[-1].weight, 7.0)
    model[-1].weight.grad = marker.clone()
    running = model[1].running_mean.clone()
    fisher = fisher_diagonal(model, loader, F.cross_entropy)
    assert model.training and torch.equal(model[-1].weight.grad, marker)
    assert torch.equal(model[1].running_mean, running)  # eval mode: batch-norm statistics untouched
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for x, y in loader:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad ** 2 / len(loader)
    assert fisher.keys() == expected.keys()
    for n in fisher:
        assert fisher[n].dtype == torch.float32
        torch.testing.assert_close(fisher[n], expected[n])
    # the helpers compose: a mask straight from two Fisher passes
    result = saliency_mask(fisher, fisher_diagonal(model, batches(2, seed=22), F.cross_entropy))
    assert set(result.masks) == set(fisher) and 0 < result.kept < result.total


def test_fisher_diagonal_bad_input():
    with pytest.raises(ValueError, match="loader is empty"):
        fisher_diagonal(small_cnn(), [], F.cross_entropy)
    with pytest.raises(ValueError, match="no len"):
        fisher_diagonal(small_cnn(), iter(batches(1)), F.cross_entropy)


@pytest.mark.parametrize("name, canonical", [
    ("layer1.0.conv1.weight", "layer1.0.conv1.weight"),
    ("module.layer1.weight", "layer1.weight"),
    ("module.module.fc.bias", "fc.bias"),
    ("_orig_mod.fc.bias", "fc.bias"),
    ("_fsdp_wrapped_module.layer._fsdp_wrapped_module.weight", "layer.weight"),
    ("encoder.module.weight", "encoder.module.weight"),
])
def test_canonical_name(name, canonical):
    assert canonical_name(name) == canonical
