"""Bad input: every mistake raises an error that names it and changes nothing, on every backend.

Property-based where the space is wide (hyperparameters, masks, gradients, state dicts): hypothesis
draws the bad value, and each example checks both halves of the promise, the message and the
bitwise state of the model and the optimizer (parameters, every state entry, the counters).
"""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import sfron_ops
from sfron_ops import SFRon, saliency_mask
from sfron_ops._groups import check_group

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BASES = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=5e-3), "adamw": dict(lr=1e-2, weight_decay=0.05)}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def masks_for(m):
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=g) < 0.6 for n, p in m.named_parameters()}


def optimizer(m, impl, base="sgd", **kw):
    """Two param groups, masks, clipping and slow weights: every part of a step is in play."""
    named = list(m.named_parameters())
    groups = [{"params": [p for _, p in named[:2]], "param_names": [n for n, _ in named[:2]]},
              {"params": [p for _, p in named[2:]], "param_names": [n for n, _ in named[2:]], "lr": 0.02}]
    options = dict(BASES[base], base=base, forget_alpha=2.0, max_grad_norm=5.0, slow_alpha=0.5, sync_period=2,
                   impl=impl)
    options.update(kw)
    opt = SFRon(groups, **options)
    opt.set_masks(masks_for(m))
    return opt


def backward(m, seed=0, forget=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    m.zero_grad()
    loss = sfron_ops.adaptive_cross_entropy(m(x), y) if forget else F.cross_entropy(m(x), y)
    loss.backward()


def warmed(impl, base="sgd", **kw):
    """A model and optimizer after a few steps of both phases, with gradients for the next."""
    m = model()
    opt = optimizer(m, impl, base, **kw)
    for i in range(3):
        backward(m, i, forget=True)
        opt.step(phase="forget")
        backward(m, 10 + i)
        opt.step()
    backward(m, 20)
    return m, opt


def snapshot(m, opt):
    return ([p.detach().clone() for p in m.parameters()],
            {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(m.parameters())},
            opt.skipped_steps, copy.deepcopy([{k: v for k, v in g.items() if k not in ("params",)}
                                              for g in opt.param_groups]))


def _bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_unchanged(before, after):
    """Bitwise: NaN payloads and the sign of zero included."""
    def same(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))

    for a, b in zip(before[0], after[0]):
        assert same(a, b)
    assert before[1].keys() == after[1].keys()
    for i in before[1]:
        assert before[1][i].keys() == after[1][i].keys(), i
        for k in before[1][i]:
            assert same(before[1][i][k], after[1][i][k]), (i, k)
    assert before[2] == after[2]


# ---------------------------------------------------------------------------------------------- hyperparameters
BAD_NUMBERS = [math.inf, -math.inf, math.nan, -1.0, "0.1", None, True, [0.1]]
NUMBER_KEYS = ["lr", "forget_alpha", "momentum", "dampening", "weight_decay", "eps", "slow_alpha", "max_grad_norm",
               "remain_max_grad_norm"]


def _bad(key, value) -> bool:
    """Whether ``value`` is wrong for ``key`` (None is a valid clip)."""
    return not (value is None and key.endswith("max_grad_norm"))


@SETTINGS
@given(key=st.sampled_from(NUMBER_KEYS), value=st.sampled_from(BAD_NUMBERS))
def test_bad_hyperparameter_at_construction_is_named(key, value):
    if not _bad(key, value):
        return
    with pytest.raises((ValueError, TypeError), match=f"Invalid {key}"):
        SFRon(model().parameters(), **{key: value})


@SETTINGS
@given(key=st.sampled_from(NUMBER_KEYS + ["sync_period", "betas", "nesterov", "reset_fast", "base"]),
       value=st.sampled_from(BAD_NUMBERS + [0, (1.0, 0.9), "adam"]), group=st.sampled_from([0, 1]))
def test_bad_hyperparameter_set_between_steps_is_named_and_changes_nothing(impl_any, key, value, group):
    m, opt = warmed(impl_any)
    good = opt.param_groups[group][key]
    opt.param_groups[group][key] = value
    try:
        check_group(opt.param_groups[group])
    except (ValueError, TypeError):
        pass
    else:
        return  # a valid value after all (0 momentum, say)
    before = snapshot(m, opt)
    for phase in ("forget", "remain"):
        with pytest.raises((ValueError, TypeError), match=f"Invalid {key.split('[')[0]}.*param_groups\\[{group}\\]"):
            opt.step(phase=phase)
    assert_unchanged(before, snapshot(m, opt))
    opt.param_groups[group][key] = good
    opt.step()  # and the optimizer goes on


@SETTINGS
@given(key=st.sampled_from(NUMBER_KEYS), value=st.sampled_from(BAD_NUMBERS))
def test_bad_param_group_is_not_added(key, value):
    if not _bad(key, value):
        return
    opt = SFRon(model().parameters(), lr=0.1)
    with pytest.raises((ValueError, TypeError), match=f"Invalid {key}"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], key: value})
    assert len(opt.param_groups) == 1


def test_duplicate_parameters_are_refused():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="appears twice"):
        SFRon([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        SFRon([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_a_device_tensor_lr_filled_with_a_bad_value_skips_the_step(impl_any, bad):
    m, opt = warmed(impl_any, lr=torch.tensor(0.05), forget_alpha=torch.tensor(2.0))
    for key in ("lr", "forget_alpha"):
        tensor = opt.param_groups[0][key]  # the second group has a number lr of its own
        good = tensor.item()
        tensor.fill_(bad)
        before = snapshot(m, opt)
        opt.step(phase="forget")
        after = snapshot(m, opt)
        assert after[2] == before[2] + 1
        assert_unchanged(before[:2] + (after[2],), after)
        tensor.fill_(good)


# ---------------------------------------------------------------------------------------------- masks
def _bad_mask(kind, shape, where):
    n = math.prod(shape)
    if kind == "uint8_255":
        m = torch.ones(n, dtype=torch.uint8)
        m[where % n] = 255
    elif kind == "uint8_2":
        m = torch.zeros(n, dtype=torch.uint8)
        m[where % n] = 2
    elif kind == "bool_view":  # a bool tensor whose bytes are not 0/1
        raw = torch.ones(n, dtype=torch.uint8)
        raw[where % n] = 7
        m = raw.view(torch.bool)
    elif kind in ("nan", "inf"):
        m = torch.rand(n)
        m[where % n] = math.nan if kind == "nan" else -math.inf
    elif kind == "complex":
        m = torch.ones(n, dtype=torch.complex64)
    elif kind == "int64":
        m = torch.ones(n, dtype=torch.int64)
    elif kind == "shape":
        return torch.ones(n + 1, dtype=torch.bool)
    return m.view(shape)


@SETTINGS
@given(kind=st.sampled_from(["uint8_255", "uint8_2", "bool_view", "nan", "inf", "complex", "int64", "shape"]),
       which=st.integers(0, 3), where=st.integers(0, 100))
def test_bad_mask_is_named_and_stores_nothing(kind, which, where):
    m = model()
    opt = optimizer(m, "reference")
    name, p = list(m.named_parameters())[which]
    before = snapshot(m, opt)
    with pytest.raises((ValueError, TypeError), match=f"mask for parameter '{name}'"):
        opt.set_masks({"0.weight": torch.ones(4, 5, dtype=torch.bool), name: _bad_mask(kind, p.shape, where)})
    assert_unchanged(before, snapshot(m, opt))


# ---------------------------------------------------------------------------------------------- gradients
@SETTINGS
@given(kind=st.sampled_from(["float64", "sparse"]), which=st.integers(0, 3))
def test_bad_gradient_is_named_and_no_group_is_written(impl_any, kind, which):
    """(torch itself refuses a gradient of another shape.) The last parameters' group goes second: it must
    not have been written when the first one fails, nor the other way round."""
    m, opt = warmed(impl_any)
    name, p = list(m.named_parameters())[which]
    if kind == "float64":
        grad, p.grad = p.grad, None
        p.grad_dtype = torch.float64
        p.grad = grad.double()
    else:
        p.grad = p.grad.to_sparse()
    before = snapshot(m, opt)
    with pytest.raises((RuntimeError, ValueError), match=f"parameter '{name}'"):
        opt.step(phase="forget")
    assert_unchanged(before, snapshot(m, opt))


@SETTINGS
@given(which=st.integers(0, 3), where=st.integers(0, 100), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       phase=st.sampled_from(["forget", "remain"]), base=st.sampled_from(["sgd", "adamw"]))
def test_non_finite_gradient_skips_the_whole_step(impl_any, which, where, value, phase, base):
    """Parameters, base state, slow weights, step counters and the slow-weight count: bitwise unchanged."""
    m, opt = warmed(impl_any, base)
    p = list(m.parameters())[which]
    p.grad.view(-1)[where % p.numel()] = value  # masked out or not: inf * 0 is NaN, as in p.grad *= mask
    before = snapshot(m, opt)
    opt.step(phase=phase)
    after = snapshot(m, opt)
    assert after[2] == before[2] + 1
    assert_unchanged(before[:2] + (after[2],), after)
    # the next good step counts the skipped one nowhere: the slow weights sync on schedule
    backward(m, 30)
    opt.step()
    backward(m, 31)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["remain_steps"] in (0, 1)


def test_a_closure_with_a_non_finite_loss_skips_the_step(impl_any):
    m, opt = warmed(impl_any)
    before = snapshot(m, opt)

    def closure():
        backward(m, 40)
        return torch.tensor(math.nan)

    opt.step(closure)
    after = snapshot(m, opt)
    assert after[2] == before[2] + 1
    assert_unchanged(before[:2] + (after[2],), after)


# ---------------------------------------------------------------------------------------------- state dicts
def _tamper(sd, kind, m):
    first = next(iter(sd["state"]))
    entries = sd["state"][first]
    if kind == "negative_lr":
        sd["param_groups"][0]["lr"] = -0.1
    elif kind == "base":
        sd["param_groups"][0]["base"] = "adam"
    elif kind == "shape":
        entries["momentum_buffer"] = torch.zeros(7)
    elif kind == "complex_mask":
        entries["mask"] = entries["mask"].to(torch.complex64)
    elif kind == "fisher64":
        entries["fisher_forget"] = entries["fisher_forget"].double()
    elif kind == "missing_step":
        del entries["step"]
    elif kind == "unknown_key":
        entries["velocity"] = torch.zeros(1)
    elif kind == "nan_buffer":
        entries["momentum_buffer"] = torch.full_like(entries["momentum_buffer"], math.nan)
    elif kind == "skipped":
        sd["skipped_steps"] = -3
    elif kind == "sync_count":
        sd["param_groups"][1]["remain_steps"] = 5
    elif kind == "foreign":
        sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        return sgd.state_dict()
    return sd


@SETTINGS
@given(kind=st.sampled_from(["negative_lr", "base", "shape", "complex_mask", "fisher64", "missing_step",
                             "unknown_key", "nan_buffer", "skipped", "sync_count", "foreign"]))
def test_bad_state_dict_is_named_and_loads_nothing(kind):
    m, opt = warmed("reference")
    backward(m, 1, forget=True)
    opt.accumulate_fisher("forget")
    sd = _tamper(copy.deepcopy(opt.state_dict()), kind, m)
    m2, target = warmed("reference")
    before = snapshot(m2, target)
    with pytest.raises((ValueError, TypeError)):
        target.load_state_dict(sd)
    assert_unchanged(before, snapshot(m2, target))


def test_foreign_state_dict_says_how_to_migrate():
    m = model()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    backward(m)
    sgd.step()
    opt = SFRon(m.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="not an SFRon one.*momentum_buffer"):
        opt.load_state_dict(sgd.state_dict())


def test_a_state_dict_without_masks_keeps_the_optimizers_masks():
    m, opt = warmed("reference")
    sd = copy.deepcopy(opt.state_dict())
    for entries in sd["state"].values():
        entries.pop("mask", None)
    masks = [t.clone() for t in opt.masks()]
    opt.load_state_dict(sd)
    for a, b in zip(opt.masks(), masks):
        assert torch.equal(a, b)


def test_packed_optimizer_refuses_a_soft_mask_before_loading():
    m, opt = warmed("reference")
    opt.set_masks({n: torch.rand(p.shape) for n, p in m.named_parameters()})
    sd = copy.deepcopy(opt.state_dict())
    m2 = model()
    packed = optimizer(m2, "reference", mask_format="packed")
    before = snapshot(m2, packed)
    with pytest.raises(ValueError, match="floating point"):
        packed.load_state_dict(sd)
    assert_unchanged(before, snapshot(m2, packed))


def test_skipped_steps_survive_a_round_trip_through_the_groups():
    """torch.distributed.checkpoint keeps param-group keys but drops a state dict's other top-level keys."""
    m, opt = warmed("reference")
    next(m.parameters()).grad.fill_(math.nan)
    opt.step()
    sd = opt.state_dict()
    del sd["skipped_steps"], sd["format"]
    m2, target = warmed("reference")
    target.load_state_dict(sd)
    assert target.skipped_steps == 1


# ---------------------------------------------------------------------------------------------- ops and helpers
@pytest.mark.parametrize("what", ["same", "view", "step"])
def test_ops_refuse_tensors_written_twice(impl, what):
    from helpers import kernels

    device = torch.device("cpu")
    base = torch.zeros(20, device=device)
    params = [torch.zeros(10, device=device), torch.zeros(10, device=device)]
    steps = [torch.zeros((), device=device), torch.zeros((), device=device)]
    if what == "same":
        params[1] = params[0]
    elif what == "view":
        params = [base[:12], base[8:]]
    else:
        steps[1] = steps[0]
    grads = [torch.ones(p.shape) for p in params]
    with pytest.raises(RuntimeError, match="share memory"):
        kernels(impl)["sgd_update"](params, grads, [], [], steps, None, lr=0.1, scale=1.0, momentum=0.0,
                                    dampening=0.0, weight_decay=0.0, nesterov=False, max_norm=0.0)
    assert all(float(s) == 0 for s in steps) and all(float(p.abs().sum()) == 0 for p in params)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma=0.0), "Invalid gamma: 0.0"),
    (dict(gamma=-1.0), "Invalid gamma"),
    (dict(gamma=math.inf), "Invalid gamma"),
])
def test_saliency_mask_refuses_bad_gamma(kwargs, message):
    f = {"a": torch.rand(3)}
    with pytest.raises(ValueError, match=message):
        saliency_mask(f, {"a": torch.rand(3)}, **kwargs)


def test_saliency_mask_names_mismatched_keys_and_bad_fisher():
    with pytest.raises(ValueError, match="only in forget_fisher: 'b'.*only in remain_fisher: 'c'"):
        saliency_mask({"a": torch.rand(2), "b": torch.rand(2)}, {"a": torch.rand(2), "c": torch.rand(2)})
    with pytest.raises(ValueError, match="remain_fisher\\['a'\\] holds a negative, NaN or infinite value"):
        saliency_mask({"a": torch.rand(2)}, {"a": torch.tensor([0.5, math.nan])})


@pytest.mark.parametrize("kwargs, message", [
    (dict(lambd=math.nan), "Invalid lambd: nan"),
    (dict(lambd=math.inf), "Invalid lambd: inf"),
    (dict(lambd=-0.5), "Invalid lambd: -0.5"),
    (dict(loss_floor=math.nan), "Invalid loss_floor: nan"),
    (dict(loss_floor=-1e-4), "Invalid loss_floor"),
])
def test_adaptive_loss_refuses_bad_weight_arguments(kwargs, message):
    losses = torch.rand(4)
    with pytest.raises(ValueError, match=message):
        sfron_ops.adaptive_weights(losses, **kwargs)
    with pytest.raises(ValueError, match=message):
        sfron_ops.AdaptiveLoss(**kwargs)
    with pytest.raises(ValueError, match=message):
        sfron_ops.adaptive_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), **kwargs)


def test_an_empty_forget_batch_is_refused_before_any_gradient():
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="forget batch is empty"):
        sfron_ops.AdaptiveLoss()(m(torch.randn(0, 5)), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="forget batch is empty"):
        sfron_ops.adaptive_weights(torch.zeros(0))
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
