"""The step path: one functional step on a cached plan, tensor hyperparameters, launches, capture checks."""

import io
import math

import cuda_emulation
import pytest
import torch
from helpers import EMULATED_CUDA, dtype_id, impl_skip_reason
from models import batches, random_masks, small_cnn
from torch.nn import functional as F

import sfron_ops
from sfron_ops import SFRon, functional

BASES = {
    "sgd": dict(base="sgd", lr=0.02, momentum=0.9, dampening=0.1, weight_decay=5e-4),
    "adamw": dict(base="adamw", lr=1e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05),
}


@pytest.fixture
def plans(monkeypatch):
    """How many step plans were made (a list with one counter)."""
    made = [0]
    init = functional.StepPlan.__init__

    def counting(self, *args, **kwargs):
        made[0] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(functional.StepPlan, "__init__", counting)
    return made


def _grads(model, data, i, forget):
    x, y = data[i]
    model.zero_grad()
    loss = sfron_ops.adaptive_cross_entropy(model(x), y) if forget else F.cross_entropy(model(x), y)
    loss.backward()


def test_functional_step_is_the_optimizer_step(impl_any):
    """functional.sfron on the optimizer's own state moves the weights exactly as its step() does."""
    data = batches(6, seed=1)
    kw = dict(BASES["sgd"], forget_alpha=2.0, max_grad_norm=3.0, slow_alpha=0.5, sync_period=2, impl=impl_any)
    a, b = small_cnn(), small_cnn()
    opt_a = SFRon(a.named_parameters(), mask=random_masks(a), **kw)
    opt_b = SFRon(b.named_parameters(), mask=random_masks(b), **kw)
    counter = torch.tensor(0.0)  # remain steps since the last sync
    for i in range(6):
        forget = i % 2 == 0
        _grads(a, data, i, forget)
        opt_a.step(phase="forget" if forget else "remain")
        _grads(b, data, i, forget)
        if i == 0:  # the optimizer's first step creates the state that the functional calls then use
            opt_b.step(phase="forget")
            continue
        params = list(b.parameters())
        states = [opt_b.state[p] for p in params]
        group = functional.GroupTensors(params=params, masks=[s["mask"] for s in states],
                                        steps=[s["step"] for s in states],
                                        state=[[s["momentum_buffer"] for s in states]],
                                        slow_params=[s["slow_param"] for s in states], sync_counter=counter)
        functional.sfron([group], [[p.grad for p in params]], opt_b.param_groups,
                         phase="forget" if forget else "remain", impl=impl_any)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    assert counter.item() == 1.0  # three remain steps: a sync at the second, one counted since


def test_plan_is_made_once_and_again_only_on_change(plans):
    data = batches(12, seed=2)
    model = small_cnn()
    opt = SFRon(model.named_parameters(), mask=random_masks(model), impl="reference", forget_alpha=2.0,
                **BASES["sgd"])
    for i in range(4):
        _grads(model, data, i, forget=i % 2 == 0)
        opt.step(phase="forget" if i % 2 == 0 else "remain")
    assert plans[0] == 1  # the first step creates state and makes the plan; later steps reuse it
    opt.set_masks(random_masks(model, seed=4))
    _grads(model, data, 4, forget=True)
    opt.step(phase="forget")
    assert plans[0] == 2
    p = next(model.parameters())
    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)  # a user resetting one buffer
    _grads(model, data, 5, forget=False)
    opt.step()
    assert plans[0] == 3
    assert torch.count_nonzero(opt.state[p]["momentum_buffer"]) > 0  # the step used the new buffer
    opt.param_groups[0]["momentum"] = 0.0  # a structural change: no buffers needed
    _grads(model, data, 6, forget=False)
    opt.step()
    assert plans[0] == 4
    model.zero_grad()
    F.cross_entropy(model(data[7][0]), data[7][1]).backward()
    list(model.parameters())[-1].grad = None  # a parameter without a gradient this time
    opt.step()
    assert plans[0] == 5
    opt.param_groups[0]["lr"] = 0.5  # numbers are read at every step: no new plan
    _grads(model, data, 8, forget=False)
    opt.step()
    assert plans[0] == 6  # (the gradient is back)
    _grads(model, data, 9, forget=False)
    opt.step()
    assert plans[0] == 6


def test_load_state_dict_and_dtype_change_make_a_new_plan(plans):
    data = batches(4, seed=3)
    model = small_cnn()
    opt = SFRon(model.parameters(), impl="reference", **BASES["adamw"])
    _grads(model, data, 0, forget=False)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    _grads(model, data, 1, forget=False)
    opt.step()
    assert plans[0] == 2
    model.to(torch.float64)
    x, y = data[2]
    model.zero_grad()
    F.cross_entropy(model(x.double()), y).backward()
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()  # the state is float32: torch's optimizers refuse this too
    assert plans[0] == 3


@pytest.mark.parametrize("base", list(BASES))
def test_tensor_hyperparameters_follow_the_same_trajectory(impl_any, base):
    """A schedule of lr and alpha over float32 0-dim tensors (filled in place) and the same schedule over the
    numbers those tensors hold: the same trajectory, bit for bit."""
    data = batches(16, seed=4)
    runs = []
    for as_tensor in (False, True):
        model = small_cnn()
        kw = dict(BASES[base], forget_alpha=4.0, max_grad_norm=4.0, slow_alpha=0.5, sync_period=3)
        if as_tensor:
            kw.update(lr=torch.tensor(kw["lr"]), forget_alpha=torch.tensor(4.0))
        opt = SFRon(model.named_parameters(), mask=random_masks(model), impl=impl_any, **kw)
        for i in range(8):
            cosine = (1 + math.cos(math.pi * i / 8)) / 2
            for key, value in (("lr", BASES[base]["lr"] * cosine), ("forget_alpha", 4.0 * cosine)):
                for g in opt.param_groups:
                    if as_tensor:
                        g[key].fill_(value)
                    else:
                        g[key] = float(torch.tensor(value))  # the number the float32 tensor holds
            _grads(model, data, 2 * i, forget=True)
            opt.step(phase="forget")
            _grads(model, data, 2 * i + 1, forget=False)
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_emulated_cuda_forget_step_is_two_launches():
    """Norm and update, one launch each: the norm's finish and the step counters ride on their last block."""
    if impl_skip_reason(EMULATED_CUDA, "cpu") is not None:
        pytest.skip("the CUDA emulation did not build")
    table = cuda_emulation.kernels()
    torch.manual_seed(0)
    params = [torch.randn(s) for s in ((70000,), (3, 5), (0,), (1,))]
    grads = [torch.randn_like(p) for p in params]
    masks = [torch.rand_like(p) < 0.5 for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    state = torch.zeros(2)
    cuda_emulation.take_launch_count()
    table["masked_norm"](grads, masks, state, alpha=1.0, alpha_tensor=torch.tensor(3.0))
    table["sgd_update"](params, grads, masks, bufs, steps, state, lr=0.1, scale=-1.0, momentum=0.9, dampening=0.0,
                        weight_decay=0.0, nesterov=False, max_norm=1.0, scale_tensor=torch.tensor(3.0))
    assert cuda_emulation.take_launch_count() == 2
    assert [s.item() for s in steps] == [1.0] * 4  # the empty tensor's counter too
    expected = torch.zeros(2)
    sfron_ops.reference.masked_sq_norm_(grads, masks, expected, alpha=3.0)
    torch.testing.assert_close(state, expected, rtol=1e-6, atol=0)


def test_capture_is_refused_clearly(monkeypatch):
    """What cannot be captured in a CUDA graph says why (checked here with capture simulated on the CPU)."""
    data = batches(2, seed=5)
    model = small_cnn()
    opt = SFRon(model.parameters(), impl="reference", **BASES["sgd"])
    monkeypatch.setattr(functional, "capturing", lambda: True)
    _grads(model, data, 0, forget=False)
    with pytest.raises(RuntimeError, match="before one eager step"):
        opt.step()
    assert not opt.state  # nothing was created
    monkeypatch.setattr(functional, "capturing", lambda: False)
    opt.step()
    monkeypatch.setattr(functional, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="one CUDA device"):
        opt.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_capture_refuses_a_cpu_lr_tensor():
    model = small_cnn().cuda()
    opt = SFRon(model.parameters(), lr=torch.tensor(0.01), momentum=0.9)
    x, y = batches(1, seed=6)[0]
    F.cross_entropy(model(x.cuda()), y.cuda()).backward()
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="freeze"):
        with torch.cuda.graph(graph):
            opt.step()


def test_foreach_layouts_serve_interleaved_lists_and_threads():
    """The foreach backend's reused per-shape buffers: lists of other shapes in between, more shapes than it
    keeps, and two threads stepping at once all give the reference's result bitwise."""
    import threading

    from sfron_ops import foreach, reference

    def case(shapes, seed):
        g = torch.Generator().manual_seed(seed)
        params = [torch.randn(s, generator=g) for s in shapes]
        grads = [torch.randn(s, generator=g) for s in shapes]
        masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]
        return params, grads, masks, [torch.zeros(s) for s in shapes], [torch.tensor(float(seed % 2)) for _ in shapes]

    def step(kernels, lists):
        params, grads, masks, bufs, steps = lists
        kernels.sgd_update_(params, grads, masks, bufs, steps, torch.zeros(2), lr=0.1, scale=-2.0, momentum=0.9,
                            dampening=0.1, weight_decay=1e-3, nesterov=False, max_norm=0.0)

    layouts = [[(3, 4), (5,)], [(7,), (2, 2, 2)], [(1,), (0,), (9, 3)]]
    layouts += [[(n,), (n + 1, 2)] for n in range(foreach._Layout.LIMIT + 1)]
    for _ in range(2):  # the second round finds the first layouts evicted
        for i, shapes in enumerate(layouts):
            ours, ref = case(shapes, i), case(shapes, i)
            step(foreach, ours)
            step(reference, ref)
            for a, b in zip(ours, ref):
                for x, y in zip(a, b):
                    assert torch.equal(x, y)
    assert len(foreach._Layout._cache.layouts) == foreach._Layout.LIMIT

    shapes, results, errors = [(300, 7), (11,), (5, 5)], {}, []

    def worker(k):
        try:
            lists = case(shapes, k)
            for _ in range(200):
                step(foreach, lists)
            results[k] = lists
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (10, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in (10, 11):
        ref = case(shapes, k)
        for _ in range(200):
            step(reference, ref)
        for a, b in zip(results[k], ref):
            for x, y in zip(a, b):
                assert torch.equal(x, y)


def _block_views(shapes, dtype, generator=None):
    """Tensors of ``shapes`` cut, in order, from one 1-D block (random values, or zeros without a generator)."""
    numels = [math.prod(s) for s in shapes]
    block = torch.zeros(sum(numels)) if generator is None else torch.randn(sum(numels), generator=generator)
    block = block.to(dtype)
    return block, [piece.view(s) for piece, s in zip(block.split(numels), shapes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_foreach_reads_and_writes_blocks_whole_and_falls_back_when_a_list_is_not_one(dtype):
    """Lists cut from one block (as the optimizer allocates its state) are read and written through the block;
    a subset of a block, or a block whose tensor got new ``.data``, goes tensor by tensor: the reference's
    result bitwise in every case, skipped steps included."""
    from sfron_ops import foreach, reference

    shapes = [(3, 4), (5,), (1,), (0,), (2, 3, 2)]

    def lists(seed):
        g = torch.Generator().manual_seed(seed)
        _, params = _block_views(shapes, dtype, g)
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]
        _, bufs = _block_views(shapes, dtype)
        steps = list(torch.tensor([0.0, 2.0, 0.0, 1.0, 5.0]).unbind())
        _, slow = _block_views(shapes, dtype, g)
        return params, grads, masks, bufs, steps, slow

    def step(kernels, ls, pick, flag):
        params, grads, masks, bufs, steps, slow = ([x[i] for i in pick] for x in ls)
        norm_state = torch.tensor([0.0, flag])
        kernels.sgd_update_(params, grads, masks, bufs, steps, norm_state, lr=0.1, scale=-2.0, momentum=0.9,
                            dampening=0.0, weight_decay=1e-3, nesterov=False, max_norm=0.0)
        kernels.slow_sync_(slow, params, alpha=0.5, reset_fast=True, norm_state=norm_state)

    everything, subset = list(range(len(shapes))), [0, 2, 4]
    ours, ref = lists(0), lists(0)
    assert all(foreach._Blocks.of(ours[k]) is not None for k in (0, 3, 4, 5))
    assert foreach._Blocks.of([ours[0][i] for i in subset]) is None
    for pick, flag in ((everything, 0.0), (everything, 1.0), (subset, 0.0)):
        step(foreach, ours, pick, flag)
        step(reference, ref, pick, flag)
        for a, b in zip(ours, ref):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    ours[3][1].data = ours[3][1].detach().clone()  # no longer a piece of the block
    ref[3][1].data = ref[3][1].detach().clone()
    assert foreach._Blocks.of(ours[3]) is None
    step(foreach, ours, everything, 0.0)
    step(reference, ref, everything, 0.0)
    for a, b in zip(ours, ref):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_state_is_allocated_in_blocks_per_device_and_dtype():
    """Each state entry of the contiguous parameters of a group is a piece of one block per dtype, in
    parameter order; a channels-last parameter keeps its own buffer in its memory format."""
    from sfron_ops import foreach

    conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last))
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16)),
              conv, torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(2, dtype=torch.bfloat16))]
    opt = SFRon(params, lr=0.1, momentum=0.9, slow_alpha=0.5, impl="foreach")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for key in ("step", "momentum_buffer", "slow_param"):
        entries = [opt.state[p][key] for p in params]
        for dtype_group in ([0, 3], [1, 4]):
            assert foreach._Blocks.of([entries[i] for i in dtype_group]) is not None, key
        assert entries[2]._base is None
    assert opt.state[conv]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)

    # a loaded state comes tensor by tensor and is copied into blocks again, values and all
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    before = {key: [opt.state[p][key].clone() for p in params] for key in ("step", "momentum_buffer", "slow_param")}
    opt.load_state_dict(torch.load(saved))
    for key, values in before.items():
        entries = [opt.state[p][key] for p in params]
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(entries, values)), key
        for dtype_group in ([0, 3], [1, 4]):
            assert foreach._Blocks.of([entries[i] for i in dtype_group]) is not None, key
