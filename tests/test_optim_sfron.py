"""SFRon's public surface: phases, masks, validation, non-finite protection, slow weights, checkpoints."""

import copy
import io
import math

import pytest
import torch
from models import batches, random_masks, small_cnn
from torch.nn import functional as F

from sfron_ops import SFRon, adaptive_cross_entropy

BASE_KW = {
    "sgd": dict(lr=0.02, momentum=0.9, dampening=0.1, weight_decay=5e-4),
    "adamw": dict(lr=1e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05),
}


def make_opt(model, base="sgd", impl="reference", mask=True, **kw):
    options = dict(BASE_KW[base], base=base, forget_alpha=3.0, max_grad_norm=5.0, impl=impl)
    options.update(kw)
    return SFRon(model.named_parameters(), mask=random_masks(model) if mask else None, **options)


def iterate(model, opt, data, i, forget_every=3):
    """One SFR-on iteration: a forget step every `forget_every` iterations, then a remain step."""
    (xf, yf), (xr, yr) = data[2 * i], data[2 * i + 1]
    if i % forget_every == 0:
        opt.zero_grad()
        adaptive_cross_entropy(model(xf), yf).backward()
        opt.step(phase="forget")
    opt.zero_grad()
    F.cross_entropy(model(xr), yr).backward()
    opt.step()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters()) if p in opt.state}
    return params, state


def assert_same(a, b):
    """Bitwise equality of two snapshots."""
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys(), i
        for k in a[1][i]:
            x, y = a[1][i][k], b[1][i][k]
            assert (torch.equal(x, y) and x.dtype == y.dtype) if torch.is_tensor(x) else x == y, (i, k)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_is_bitwise_equal(base, impl_any):
    """Forget steps clip (their direction's norm is above 0.3), and clipping reads a norm summed over fixed
    chunks, so a run restored from a checkpoint continues on exactly the same bits."""
    data = batches(80, seed=3)
    kw = dict(slow_alpha=0.5, sync_period=3, max_grad_norm=0.3, remain_max_grad_norm=10.0)
    model = small_cnn()
    opt = make_opt(model, base, impl_any, **kw)
    for i in range(40):
        iterate(model, opt, data, i)
    straight = snapshot(model, opt)

    model = small_cnn()
    opt = make_opt(model, base, impl_any, **kw)
    for i in range(20):
        iterate(model, opt, data, i)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu")
    model = small_cnn(seed=5)  # different init: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt = make_opt(model, base, impl_any, mask=False, **kw)
    opt.load_state_dict(saved["opt"])
    for i in range(20, 40):
        iterate(model, opt, data, i)
    assert_same(snapshot(model, opt), straight)


def test_state_dict_keeps_fisher_and_mask_dtypes():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    masks = {"weight": torch.rand(3, 4) < 0.5, "bias": torch.rand(3)}  # bool and a float32 soft mask
    opt = SFRon(model.named_parameters(), mask=masks, lr=0.1, impl="reference")
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.accumulate_fisher("forget", scale=1 / 3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    fresh = SFRon(model.named_parameters(), lr=0.1, impl="reference")
    fresh.load_state_dict(sd)
    for p in model.parameters():
        assert fresh.state[p]["fisher_forget"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["fisher_forget"], opt.state[p]["fisher_forget"])
        assert fresh.state[p]["step"].dtype == torch.float32
    assert fresh.state[model.weight]["mask"].dtype == torch.bool
    assert fresh.state[model.bias]["mask"].dtype == torch.float32
    assert torch.equal(fresh.state[model.bias]["mask"], masks["bias"])
    # loading copies: stepping the new optimizer leaves the saved dict alone
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    fresh.step()
    assert sd["state"][0]["step"].item() == 1.0


# ---------------------------------------------------------------------------------------------- phases
def test_phase_keyword_and_context_are_the_same(impl_any):
    data = batches(4, seed=4)
    runs = []
    for use_context in (False, True):
        model = small_cnn()
        opt = make_opt(model, "sgd", impl_any)
        x, y = data[0]
        adaptive_cross_entropy(model(x), y).backward()
        if use_context:
            with opt.phase("forget"):
                assert opt.current_phase == "forget"
                opt.step()
            assert opt.current_phase == "remain"
        else:
            opt.step(phase="forget")
        runs.append(snapshot(model, opt))
    assert_same(*runs)


def test_forget_phase_ascends_and_never_writes_grad():
    model = torch.nn.Linear(3, 1, bias=False)
    opt = SFRon(model.parameters(), lr=0.1, forget_alpha=2.0, impl="reference")
    x = torch.ones(1, 3)
    model(x).sum().backward()
    grad = model.weight.grad.clone()
    before = model.weight.detach().clone()
    opt.step(phase="forget")
    assert torch.equal(model.weight.grad, grad)
    torch.testing.assert_close(model.weight.detach(), before + 0.1 * 2.0 * grad)


def test_unknown_phase_raises_and_changes_nothing():
    model = small_cnn()
    opt = make_opt(model)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="Invalid phase: 'unlearn'"):
        opt.step(phase="unlearn")
    with pytest.raises(ValueError, match="Invalid phase: 'unlearn'"):
        with opt.phase("unlearn"):
            pass
    assert_same(snapshot(model, opt), before)


def test_phase_context_restores_on_error():
    opt = SFRon([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(KeyError):
        with opt.phase("forget"):
            raise KeyError("boom")
    assert opt.current_phase == "remain"


def test_closure_is_called_and_returned():
    model = torch.nn.Linear(2, 1)
    opt = SFRon(model.parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))


def test_hooks_fire_for_both_phases():
    opt = SFRon([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", kwargs.get("phase"))))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", kwargs.get("phase"))))
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step(phase="forget")
    opt.step()
    assert seen == [("pre", "forget"), ("post", "forget"), ("pre", None), ("post", None)]


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-0.1), "Invalid lr: -0.1"),
    (dict(forget_alpha=-1.0), "Invalid forget_alpha: -1.0"),
    (dict(momentum=-0.5), "Invalid momentum: -0.5"),
    (dict(dampening=2.0), "Invalid dampening: 2.0"),
    (dict(weight_decay=-1e-4), "Invalid weight_decay: -0.0001"),
    (dict(betas=(1.0, 0.9)), "Invalid betas\\[0\\]: 1.0"),
    (dict(eps=-1.0), "Invalid eps: -1.0"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm: 0.0"),
    (dict(remain_max_grad_norm=-3), "Invalid remain_max_grad_norm: -3"),
    (dict(slow_alpha=1.5), "Invalid slow_alpha: 1.5"),
    (dict(sync_period=0), "Invalid sync_period: 0"),
    (dict(base="lion"), "Invalid base: 'lion'"),
    (dict(impl="magic"), "Invalid impl: 'magic'"),
    (dict(nesterov=True), "Invalid nesterov: True needs momentum > 0"),
    (dict(lr=float("nan")), "Invalid lr: nan"),
])
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFRon([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_param_group_is_rejected_whole():
    opt = SFRon([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="Invalid forget_alpha: -2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "forget_alpha": -2})
    assert len(opt.param_groups) == 1


def test_explicit_impl_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="impl='triton' cannot run on cpu"):
        import os

        old = os.environ.pop("TRITON_INTERPRET", None)
        try:
            from sfron_ops import _impl

            if _impl.why_unavailable("triton", "cpu") is None:
                raise RuntimeError("impl='triton' cannot run on cpu")  # interpreter build: nothing to check
            SFRon([torch.nn.Parameter(torch.ones(2))], impl="triton")
        finally:
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old


# ---------------------------------------------------------------------------------------------- masks
def _named_linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


@pytest.mark.parametrize("bad, message", [
    ({"0.weight": torch.ones(4, 3, dtype=torch.bool)}, "mask for parameter '0.weight' has shape \\(4, 3\\), "
                                                       "expected \\(3, 4\\)"),
    ({"0.bias": torch.ones(3, dtype=torch.int64)}, "mask for parameter '0.bias' has dtype torch.int64"),
    ({"1.bias": torch.ones(2, device="meta")}, "mask for parameter '1.bias' is on the meta device"),
    ({"2.weight": torch.ones(2)}, "mask for '2.weight' names no parameter"),
    ([torch.ones(3, 4)], "mask is a list of 1 entries but the optimizer has 4 parameters"),
])
def test_bad_masks_are_named_and_store_nothing(bad, message):
    model = _named_linear()
    good = {"1.weight": torch.ones(2, 3, dtype=torch.bool)}
    opt = SFRon(model.named_parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        opt.set_masks({**good, **bad} if isinstance(bad, dict) else bad)
    assert all("mask" not in opt.state[p] for p in model.parameters())
    with pytest.raises(ValueError, match=message):
        SFRon(model.named_parameters(), lr=0.1, mask=bad)


def test_name_keyed_mask_needs_names():
    model = _named_linear()
    with pytest.raises(ValueError, match="keyed by name .* pass model.named_parameters"):
        SFRon(model.parameters(), lr=0.1, mask={"0.weight": torch.ones(3, 4)})


def test_mask_forms_agree_and_names_are_canonical():
    model = _named_linear()
    raw = random_masks(model, seed=9)
    params = list(model.parameters())
    forms = [
        raw,
        {f"module._orig_mod.{n}": m for n, m in raw.items()},
        {p: raw[n] for n, p in model.named_parameters()},
        [raw[n] for n, _ in model.named_parameters()],
    ]
    results = []
    for form in forms:
        opt = SFRon(model.named_parameters(), lr=0.1, mask=form)
        results.append([opt.state[p]["mask"] for p in params])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_mask_zero_freezes_forget_updates_only():
    model = torch.nn.Linear(3, 1, bias=False)
    mask = torch.tensor([[True, False, True]])
    opt = SFRon(model.parameters(), lr=0.1, mask=[mask], impl="reference")
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    opt.step(phase="forget")
    assert model.weight[0, 1] == before[0, 1] and model.weight[0, 0] != before[0, 0]
    opt.step()  # remain steps are not masked
    assert model.weight[0, 1] != before[0, 1]


# ---------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("phase", ["forget", "remain"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_non_finite_step_is_skipped(impl_any, base, phase, clip, bad):
    data = batches(12, seed=6)
    kw = dict(max_grad_norm=5.0 if clip else None, remain_max_grad_norm=5.0 if clip else None)

    def run(poison_at):
        model = small_cnn()
        opt = make_opt(model, base, impl_any, **kw)
        for i in range(6):
            if i == poison_at:
                x, y = data[2 * i]
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                next(model.parameters()).grad.view(-1)[3] = bad
                before = snapshot(model, opt)
                opt.step(phase=phase)
                after = snapshot(model, opt)
                assert_same(after[:1] + ({},), before[:1] + ({},))
                for i_state, entries in after[1].items():
                    for key, value in entries.items():
                        if key in before[1].get(i_state, {}):
                            assert torch.equal(value, before[1][i_state][key]), key
                        elif key == "slow_param":
                            assert torch.equal(value, after[0][i_state])
                        else:  # state created by the skipped first step holds its initial values
                            assert not value.any(), key
                assert opt.skipped_steps == 1
                continue
            iterate(model, opt, data, i)
        return snapshot(model, opt), opt

    clean, clean_opt = run(poison_at=None)
    assert clean_opt.skipped_steps == 0
    for poison_at in (0, 2):  # on the very first step (fresh state) and mid-run
        poisoned, _ = run(poison_at)
        # skipping changed nothing: the run equals one that never saw the bad step, minus that iteration
        model = small_cnn()
        opt = make_opt(model, base, impl_any, **kw)
        for i in range(6):
            if i != poison_at:
                iterate(model, opt, data, i)
        assert_same(poisoned[0:1] + ({},), snapshot(model, opt)[0:1] + ({},))


def test_check_finite_off_lets_nan_through():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SFRon([p], lr=0.1, check_finite=False, impl="reference")
    p.grad = torch.tensor([1.0, math.nan, 1.0])
    opt.step()
    assert math.isnan(p[1].item()) and opt.skipped_steps == 0


# ---------------------------------------------------------------------------------------------- groups
def test_clip_norm_spans_param_groups(impl_any):
    data = batches(6, seed=8)
    model_a, model_b = small_cnn(), small_cnn()
    opt_a = make_opt(model_a, "sgd", impl_any, mask=False, max_grad_norm=0.5)
    params = list(model_b.parameters())
    opt_b = SFRon([{"params": params[:3]}, {"params": params[3:]}], base="sgd", forget_alpha=3.0, max_grad_norm=0.5,
                  impl=impl_any, **BASE_KW["sgd"])
    for i in range(3):
        iterate(model_a, opt_a, data, i, forget_every=1)
        iterate(model_b, opt_b, data, i, forget_every=1)
    # equal up to the summation order of the squared norm (one sum per group)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q)


def test_group_hyperparameters_and_late_groups():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SFRon([{"params": [a], "lr": 0.0}, {"params": [b], "lr": 0.5}], lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(2)) and torch.equal(b.detach(), torch.full((2,), 0.5))
    c = torch.nn.Parameter(torch.ones(1))
    opt.add_param_group({"params": [c], "forget_alpha": 4.0})
    c.grad = torch.ones(1)
    opt.step(phase="forget")
    torch.testing.assert_close(c.detach(), torch.tensor([1.4]))  # ascent: 1 + 0.1 * 4 * 1


def test_parameters_without_grad_or_elements():
    empty = torch.nn.Parameter(torch.ones(0))
    idle = torch.nn.Parameter(torch.ones(2))
    used = torch.nn.Parameter(torch.ones(2))
    opt = SFRon([empty, idle, used], lr=0.1, momentum=0.9, max_grad_norm=1.0)
    empty.grad, used.grad = torch.ones(0), torch.ones(2)
    opt.step(phase="forget")
    assert idle not in opt.state and torch.equal(idle.detach(), torch.ones(2))
    assert not torch.equal(used.detach(), torch.ones(2))


# ---------------------------------------------------------------------------------------------- slow weights
def _manual_slow(base, slow_alpha, sync_period, reset_fast, impl):
    """SFRon without slow weights plus slow weights written out by hand."""
    data = batches(20, seed=10)
    model = small_cnn()
    opt = make_opt(model, base, impl)
    slow = [p.detach().clone() for p in model.parameters()]
    remain_steps = 0
    for i in range(10):
        iterate(model, opt, data, i)
        remain_steps += 1
        if remain_steps % sync_period == 0:
            with torch.no_grad():
                for s, p in zip(slow, model.parameters()):
                    s.copy_(torch.lerp(s, p, slow_alpha))
                    if reset_fast:
                        p.copy_(s)
    return model, slow


@pytest.mark.parametrize("reset_fast", [True, False])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_slow_weights_match_hand_written(impl_any, base, reset_fast):
    expected_model, expected_slow = _manual_slow(base, 0.3, 3, reset_fast, impl_any)
    data = batches(20, seed=10)
    model = small_cnn()
    opt = make_opt(model, base, impl_any, slow_alpha=0.3, sync_period=3, reset_fast=reset_fast)
    for i in range(10):
        iterate(model, opt, data, i)
    for p, q in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(p, q)
    for s, e in zip(opt.slow_weights(), expected_slow):
        torch.testing.assert_close(s, e)


def test_identity_slow_weights_allocate_nothing():
    model = small_cnn()
    opt = make_opt(model, "sgd", slow_alpha=1.0, reset_fast=True)
    iterate(model, opt, batches(2), 0)
    assert all("slow_param" not in opt.state[p] for p in model.parameters())
    assert all(s is not None and torch.equal(s, p) for s, p in zip(opt.slow_weights(), model.parameters()))


def test_use_slow_weights_swaps_and_restores():
    model = small_cnn()
    opt = make_opt(model, "sgd", slow_alpha=0.5, sync_period=100, reset_fast=False)
    data = batches(6)
    for i in range(3):
        iterate(model, opt, data, i)
    fast = [p.detach().clone() for p in model.parameters()]
    slow = [s.clone() for s in opt.slow_weights()]
    assert any(not torch.equal(f, s) for f, s in zip(fast, slow))
    with opt.use_slow_weights():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), slow))
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))


# ---------------------------------------------------------------------------------------------- Fisher and masks
def test_accumulate_fisher_and_compute_mask(impl_any):
    model = small_cnn()
    opt = make_opt(model, "sgd", impl_any, mask=False)
    forget, remain = batches(3, seed=13), batches(4, seed=14)
    expected = {"forget": [torch.zeros_like(p) for p in model.parameters()],
                "remain": [torch.zeros_like(p) for p in model.parameters()]}
    model.eval()
    for which, loader in (("forget", forget), ("remain", remain)):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.accumulate_fisher(which, scale=1 / len(loader))
            for e, p in zip(expected[which], model.parameters()):
                e.add_(p.grad * p.grad / len(loader))
    for which in expected:
        for f, e in zip(opt.fisher(which), expected[which]):
            torch.testing.assert_close(f, e)
    kept, total = opt.compute_mask(gamma=1.0)
    ratios = [(f + 1e-15) / (r + 1e-15) for f, r in zip(expected["forget"], expected["remain"])]
    assert total == sum(p.numel() for p in model.parameters())
    assert kept == sum(int((r >= 1.0).sum()) for r in ratios)
    for m, r in zip(opt.masks(), ratios):
        assert m.dtype == torch.bool and torch.equal(m, r >= 1.0)
    kept, _ = opt.compute_mask(density=0.25)
    assert kept >= math.ceil(0.25 * total)


def test_bad_fisher_arguments():
    opt = SFRon([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="Invalid which: 'test'"):
        opt.accumulate_fisher("test")
    with pytest.raises(ValueError, match="Invalid scale: -1.0"):
        opt.accumulate_fisher("forget", scale=-1.0)
    with pytest.raises(ValueError, match="Invalid density: 2"):
        opt.compute_mask(density=2)


# ---------------------------------------------------------------------------------------------- ecosystem basics
@pytest.mark.parametrize("phase", ["forget", "remain"])
def test_grad_scaler_power_of_two_scaling_is_exact(phase):
    data = batches(8, seed=15)
    runs = []
    for use_scaler in (False, True):
        model = small_cnn()
        opt = make_opt(model, "sgd", "reference")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        for x, y in data:
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.step(opt, phase=phase)
            scaler.update()
        runs.append(snapshot(model, opt))
    assert_same(*runs)


def test_grad_scaler_skips_overflowing_steps():
    model = small_cnn()
    opt = make_opt(model, "sgd", "reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batches(1)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    next(model.parameters()).grad.view(-1)[0] = math.inf
    before = snapshot(model, opt)
    scaler.step(opt, phase="forget")
    scaler.update()
    assert_same(snapshot(model, opt), before)
    assert scaler.get_scale() < 2.0**10


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9**e),
], ids=["cosine", "step", "onecycle", "lambda"])
def test_lr_schedulers_drive_both_phases(make_sched):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = SFRon([p], lr=0.1, forget_alpha=1.0)
    sched = make_sched(opt)
    lrs = []
    for i in range(4):
        lr = opt.param_groups[0]["lr"]
        before = p.detach().clone()
        p.grad = torch.ones(1)
        opt.step(phase="forget" if i % 2 else "remain")
        torch.testing.assert_close((p.detach() - before).abs(), torch.tensor([lr]))
        lrs.append(lr)
        sched.step()
    assert len(set(lrs)) > 1


def test_report_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sfron_ops.report"], capture_output=True, text=True, check=True)
    assert "impl=None picks" in out.stdout and "reference  available" in out.stdout
