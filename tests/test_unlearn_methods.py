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
from sfron_ops.unlearn.methods import distill_kl, magnitude_mask, random_labels

pytestmark = pytest.mark.usefixtures("one_thread")


def _overfit_linear():
    """A linear classifier and four forget samples: two fitted so well that their float32 loss is exactly 0."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[30.0, -30.0], [-30.0, 30.0]]))
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.02, 0.0], [0.0, 0.03]])
    y = torch.tensor([0, 0, 0, 1])
    return model, x, y


def test_zero_losses_take_all_the_adaptive_weight(monkeypatch):
    monkeypatch.setattr(sfron_ops.loss, "_zero_loss_warned", False)  # it warns once per process
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


@pytest.mark.filterwarnings("ignore::sfron_ops.ZeroForgetLossWarning")  # the official formula on purpose
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


def test_magnitude_mask_size_is_exact_with_many_zero_gradients():
    """Dead ReLU units give exact-zero gradients to their weights; the mask still keeps ceil(density * N)
    weights (before, every weight tied with a zero cut-off was kept and SalUn became RL)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].bias[:20] = -100.0  # 20 of 32 hidden units never fire
    x, y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    ce = nn.CrossEntropyLoss(reduction="none")
    model.zero_grad()
    ce(model(x), y).mean().backward()
    grads = torch.cat([p.grad.abs().flatten() for p in model.parameters()])
    n, zeros = grads.numel(), int((grads == 0).sum())
    assert zeros > 0.5 * n
    for density in (0.3, 0.5, 0.8):
        masks = magnitude_mask(model, [(x, y)], ce, density=density)
        kept = torch.cat([m.flatten() for m in masks.values()])
        k = math.ceil(density * n - 1e-9)
        assert int(kept.sum()) == k < n
        assert kept[grads > 0].all() or grads[kept].min() > 0  # the nonzero gradients come first
        if k > n - zeros:  # the zero ties taken are the first ones in flat order
            zero_kept = kept[grads == 0]
            assert zero_kept[: k - (n - zeros)].all() and not zero_kept[k - (n - zeros):].any()


def test_distill_kl_hand_case():
    s = torch.log(torch.tensor([[0.25, 0.75]]))
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    # T = 1: KL(teacher || student) = .5 ln(.5/.25) + .5 ln(.5/.75)
    assert distill_kl(s, t, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert distill_kl(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def _task():
    model, forget, remain = _fitted_task(1)
    return model, TensorLoader(*forget, 10, shuffle=True, seed=1), TensorLoader(*remain, 25, shuffle=True, seed=2)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _forget_loss(model, loader):
    with torch.no_grad():
        return sum(nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in loader)


@pytest.mark.parametrize("name, hp", [
    ("ga", dict(iterations=10, lr=0.05)),
    ("rl", dict(iterations=10, lr=0.05)),
    ("salun", dict(iterations=10, lr=0.05)),
    ("scrub", dict(iterations=10, lr=0.1)),
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


# ---------------------------------------------------------------------------------------------- the authors' procedures
class _Logged:
    """A loader that notes in ``log`` which loader each batch came from, in the order they are drawn."""

    def __init__(self, name, loader, log):
        self.name, self.loader, self.log = name, loader, log

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.log.append(self.name)
            yield batch


def _logged_task():
    model, forget, remain = _task()  # 2 forget batches, 4 remain batches
    log = []
    return model, _Logged("f", forget, log), _Logged("r", remain, log), log


@pytest.mark.parametrize("name, hp, expected", [
    ("rl", dict(epochs=2), "ffrrrr" * 2),
    ("salun", dict(epochs=2), "ff" + "ffrrrr" * 2),  # first a pass over D_f for the mask
    ("rl", dict(iterations=9), "ffrrrr" + "ffr"),  # the budget cuts the second epoch short
    ("rl", dict(epochs=2, batch_order="paired"), "frfrfrfr" * 2),
    ("ga", dict(iterations=5), "fffff"),
    ("scrub", dict(epochs=3), "ffrrrr" * 2 + "rrrr"),  # max-steps in the first max_epochs = 2 epochs
    ("scrub", dict(epochs=2, max_epochs=1), "ffrrrr" + "rrrr"),
])
def test_batch_order(name, hp, expected):
    model, forget, remain, log = _logged_task()
    res = run(name, model, forget, remain, progress=False, lr=0.01, **hp)
    assert "".join(log) == expected
    steps = expected[2:] if name == "salun" else expected
    assert res.iterations == len(steps if hp.get("batch_order") != "paired" else steps[::2])
    assert res.info["epochs"] == pytest.approx(hp.get("epochs", 0) or {"rl": 1.5, "ga": 2.5}[name])


def test_random_labels_are_uniform_over_every_class():
    target = torch.arange(10).repeat(3000)  # 30,000 samples
    torch.manual_seed(0)
    uniform = random_labels(target, 10)
    counts = torch.bincount(uniform, minlength=10).float()
    assert (counts - 3000).abs().max() < 4 * math.sqrt(3000 * 0.9)  # every class ~1/10, four sigma
    same = (uniform == target).float().mean().item()
    assert abs(same - 0.1) < 4 * math.sqrt(0.09 / 30000)  # the true label ~1/10 of the time
    wrong = random_labels(target, 10, "wrong")
    assert not (wrong == target).any()
    assert (torch.bincount((wrong - target) % 10, minlength=10)[1:].float() - 30000 / 9).abs().max() < 4 * math.sqrt(
        30000 / 9)
    torch.manual_seed(0)
    assert torch.equal(random_labels(target, 10), uniform)  # drawn from the global generator, on the CPU


def test_rl_relabels_each_forget_batch_afresh():
    """The labels RL trains the forget batches on: fresh every time a sample is seen, the true one included."""
    seen = []

    def loss_fn(output, target):
        seen.append(target.clone())
        return nn.functional.cross_entropy(output, target, reduction="none")

    model, forget, remain = _task()
    run("rl", model, forget, remain, progress=False, lr=0.0, epochs=40, loss_fn=loss_fn)
    # per epoch: two forget steps (training labels, then the true ones for the record), four remain steps
    assert len(seen) == 40 * (2 * 2 + 4)
    labels = torch.cat([seen[j] for j in range(len(seen)) if j % 8 in (0, 2)])
    truth = torch.cat([seen[j] for j in range(len(seen)) if j % 8 in (1, 3)])
    assert labels.numel() == truth.numel() == 40 * 20
    assert torch.bincount(labels, minlength=3).min() > 200  # all three classes
    assert 0.25 < (labels == truth).float().mean().item() < 0.42  # the true label about a third of the time


@pytest.mark.parametrize("batch_order, steps", [("paired", 3), ("sequential", 4)])
def test_next_labels_and_remain_weight(batch_order, steps):
    """``labels="next"`` trains D_f on (y + 1) mod C; ``remain_weight`` w makes a paired step descend
    forget mean + w * remain mean and a remain step w * its mean (SalUn's DDPM recipe, here on a classifier)."""
    w, lr = 0.1, 0.05
    model, forget, remain = _task()  # 2 forget batches, 4 remain batches
    ce = nn.functional.cross_entropy

    def cycle(loader):
        while True:
            yield from loader

    fit, rit = cycle(forget), cycle(remain)
    opt = torch.optim.SGD(model.parameters(), lr)
    kinds = ["paired"] * steps if batch_order == "paired" else ["forget", "forget", "remain", "remain"]
    for kind in kinds:
        if kind == "remain":
            x, y = next(rit)
            loss = w * ce(model(x), y)
        else:
            x, y = next(fit)
            loss = ce(model(x), (y + 1) % 3)
            if kind == "paired":
                xr, yr = next(rit)
                loss = loss + w * ce(model(xr), yr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    twin, forget, remain = _task()
    res = run("rl", twin, forget, remain, progress=False, iterations=steps, lr=lr, momentum=0.0, weight_decay=0.0,
              labels="next", batch_order=batch_order, remain_weight=w)
    assert res.iterations == steps
    assert torch.equal(_flat(twin), _flat(model))
    assert not torch.equal(_flat(twin), _flat(_task()[0]))


def _lrs(res, lr):
    """The learning rate of every step: the first, then each record's (taken after the step's scheduler step)."""
    return [lr] + [h["lr"] for h in res.history[:-1]]


@pytest.mark.parametrize("name, hp, per_epoch", [
    ("rl", dict(epochs=3), [1.0, 1.0, 1.0]),  # MultiStepLR at 91 and 136: constant
    ("rl", dict(epochs=3, lr_milestones=(1, 2), lr_decay=0.5), [1.0, 0.5, 0.25]),
    ("ga", dict(epochs=3, lr_milestones=[2]), [1.0, 1.0, 0.1]),
    ("scrub", dict(epochs=5), [1.0, 1.0, 1.0, 0.1, 0.1]),  # SCRUB's milestones 3, 5, 9
])
def test_learning_rate_is_multistep_by_epoch(name, hp, per_epoch):
    model, forget, remain, log = _logged_task()
    res = run(name, model, forget, remain, progress=False, lr=1.0, log_every=1, momentum=0.0, **hp)
    lrs = _lrs(res, 1.0)
    sizes = [6 if name != "ga" else 2] * len(per_epoch)
    if name == "scrub":
        sizes = [6, 6] + [4] * (len(per_epoch) - 2)
    expected = [f for f, n in zip(per_epoch, sizes) for _ in range(n)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_is_one_argument_away():
    model, forget, remain, _ = _logged_task()
    res = run("rl", model, forget, remain, progress=False, lr=1.0, log_every=1, iterations=8, lr_schedule="cosine")
    assert _lrs(res, 1.0) == pytest.approx([(1 + math.cos(math.pi * i / 8)) / 2 for i in range(8)])


def test_salun_holds_masked_out_weights_and_their_momentum():
    model, forget, remain = _task()
    start = [p.detach().clone() for p in model.parameters()]
    method = make_method("salun", epochs=2, lr=0.05, momentum=0.9, weight_decay=0.05, density=0.3)
    res = run(method, model, forget, remain, progress=False)
    out = [~method.masks[n] for n, _ in model.named_parameters()]
    for p, p0, o in zip(model.parameters(), start, out):
        assert torch.equal(p.detach()[o], p0[o])  # exactly their starting values
        assert (method.optimizer.state[p]["momentum_buffer"][o] == 0).all()
    trained = sum(int((p.detach() != p0)[~o].sum()) for p, p0, o in zip(model.parameters(), start, out))
    assert trained == res.info["mask_kept"]  # every salient weight moved
    # before the authors' weight-decay fix: only the gradient is masked, and decay moves the others
    model, forget, remain = _task()
    run("salun", model, forget, remain, progress=False, epochs=2, lr=0.05, momentum=0.9, weight_decay=0.05,
        density=0.3, restore_masked=False)
    drift = max(float((p.detach() - p0)[o].abs().max()) for p, p0, o in zip(model.parameters(), start, out))
    assert drift > 1e-4


def _topk_by_index(scores, density):
    """An independent rule: a stable sort of the negated flat scores keeps ties in flat order."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = math.ceil(density * flat.numel() - 1e-9)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(-flat, stable=True).indices[:k]] = True
    out, at = {}, 0
    for name, s in scores.items():
        out[name] = keep[at:at + s.numel()].view(s.shape)
        at += s.numel()
    return out


@pytest.mark.parametrize("name", ["ga", "rl", "salun"])
def test_matches_a_literal_transcription_of_salun_code(name):
    """GA, RL and SalUn against the loops of SalUn's Classification/ code (unlearn/GA.py, unlearn/RL.py's CIFAR-10
    branch, unlearn/impl.py, generate_mask.py at a6e89fd) written out step by step: bitwise equal."""
    epochs, lr, density = 3, 0.02, 0.4
    model, forget, remain = _task()
    torch.manual_seed(5)
    mask = None
    if name == "salun":
        model.eval()
        model.zero_grad()
        for x, y in forget:
            (-nn.functional.cross_entropy(model(x), y)).backward()
        mask = _topk_by_index({n: p.grad.abs() for n, p in model.named_parameters()}, density)
        model.zero_grad(set_to_none=True)
        model.train()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[91, 136], gamma=0.1)

    def sgd_step(loss):
        opt.zero_grad()
        loss.backward()
        if mask:
            for n, p in model.named_parameters():
                p.grad *= mask[n]
        opt.step()
        if mask:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    m = mask[n].float()
                    p.mul_(m).add_(theta0[n] * (1 - m))
                    opt.state[p]["momentum_buffer"].mul_(m)

    for _ in range(epochs):
        for x, y in forget:
            if name == "ga":
                sgd_step(-nn.functional.cross_entropy(model(x), y))
            else:
                labels = torch.randint(0, 3, y.shape)
                sgd_step(nn.functional.cross_entropy(model(x), labels))
        if name != "ga":
            for x, y in remain:
                sgd_step(nn.functional.cross_entropy(model(x), y))
        sched.step()

    twin, forget, remain = _task()
    res = run(name, twin, forget, remain, progress=False, seed=5, epochs=epochs, lr=lr,
              **(dict(density=density) if name == "salun" else {}))
    assert torch.equal(_flat(twin), _flat(model))
    assert res.iterations == epochs * (2 if name == "ga" else 6)


def test_scrub_matches_a_literal_transcription_of_its_authors_code():
    """SCRUB against meghdadk/SCRUB (98ffb11): large_scale_unlearning.ipynb's epoch loop with loops.py
    train_distill ("maximize", then "minimize"), DistillKL and adjust_learning_rate, written out step by step."""
    epochs, msteps, lr, gamma, alpha, temp = 5, 2, 0.05, 0.99, 0.001, 4.0
    milestones, rate = [3, 5, 9], 0.1
    student, forget, remain = _task()
    teacher = copy.deepcopy(student).eval()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def kl(s, t):  # DistillKL: sum-reduced KL(p_t || p_s) at temperature T, times T^2, over the batch size
        p_s = nn.functional.log_softmax(s / temp, dim=1)
        p_t = nn.functional.softmax(t / temp, dim=1)
        return nn.functional.kl_div(p_s, p_t, reduction="sum") * temp ** 2 / s.shape[0]

    for epoch in range(1, epochs + 1):
        steps = sum(epoch > m for m in milestones)
        if steps > 0:
            for g in opt.param_groups:
                g["lr"] = lr * rate ** steps
        for split, loader in ((("maximize", forget),) if epoch <= msteps else ()) + (("minimize", remain),):
            for x, y in loader:
                logit_s = student(x)
                with torch.no_grad():
                    logit_t = teacher(x)
                if split == "minimize":
                    loss = gamma * nn.functional.cross_entropy(logit_s, y) + alpha * kl(logit_s, logit_t)
                else:
                    loss = -kl(logit_s, logit_t)
                opt.zero_grad()
                loss.backward()
                opt.step()

    twin, forget, remain = _task()
    res = run("scrub", twin, forget, remain, progress=False, epochs=epochs, lr=lr)
    assert res.iterations == 2 * 6 + 3 * 4
    torch.testing.assert_close(_flat(twin), _flat(student), rtol=1e-6, atol=1e-7)


def test_methods_validate_their_hyperparameters():
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
    with pytest.raises(ValueError, match="Invalid labels: 'other'"):
        make_method("rl", labels="other")
    with pytest.raises(ValueError, match="Invalid remain_weight: -1"):
        make_method("rl", remain_weight=-1)
    with pytest.raises(ValueError, match="Invalid batch_order: 'mixed'"):
        make_method("salun", batch_order="mixed")
    with pytest.raises(ValueError, match="Invalid restore_masked: 1"):
        make_method("salun", restore_masked=1)
    with pytest.raises(ValueError, match="Invalid epochs: 0"):
        make_method("ga", epochs=0)
    with pytest.raises(ValueError, match="Invalid lr_milestones entry: -1"):
        make_method("scrub", lr_milestones=[3, -1])
    with pytest.raises(ValueError, match="Invalid max_epochs: -1"):
        make_method("scrub", max_epochs=-1)
    with pytest.raises(ValueError, match="Invalid lr_schedule: 'multistep'"):
        make_method("ft", lr_schedule="multistep")  # fine-tuning counts no epochs
    model, forget, remain = _task()
    with pytest.raises(ValueError, match="rl: the forget loader has no len()"):
        run("rl", model, iter(list(forget)), remain, progress=False)


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
