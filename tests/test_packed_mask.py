"""Bit-packed masks (``SFRon(..., mask_format="packed")``): same trajectory as bool masks, 8x fewer bytes."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import impl_skip_reason
from torch import nn
from torch.nn import functional as F

import sfron_ops
from sfron_ops import _impl, _ops, functional
from sfron_ops.packing import mask_bytes, packed_bytes
from sfron_ops.reference import pack_mask, unpack_mask

IMPLS = ["reference", "foreach", "fused", "triton"]
CONFIGS = {
    "sgd": dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adamw": dict(base="adamw", lr=0.01, weight_decay=0.05),
}


def mlp(seed=0):
    torch.manual_seed(seed)
    # 24*13 = 312 weights, a 13-element bias (not a multiple of 8), 5*13 weights, 5 biases
    return nn.Sequential(nn.Linear(24, 13), nn.Tanh(), nn.Linear(13, 5))


def random_masks(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters()}


def data(n=8, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 24, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def run(model, opt, batches, start=0):
    for i, (x, y) in enumerate(batches, start):
        if i % 2 == 0:
            sfron_ops.adaptive_cross_entropy(model(x), y).backward()
            opt.step(phase="forget")
            opt.zero_grad()
        F.cross_entropy(model(x.flip(0)), y.flip(0)).backward()
        opt.step()
        opt.zero_grad()


def make(model, impl, base, fmt, masks=None):
    return sfron_ops.SFRon(model.named_parameters(), mask=masks, impl=impl, mask_format=fmt, forget_alpha=3.0,
                           max_grad_norm=0.5, slow_alpha=0.5, sync_period=2, **CONFIGS[base])


@pytest.mark.parametrize("base", list(CONFIGS))
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_matches_dense_bitwise(impl, base):
    reason = impl_skip_reason(impl, "cpu")
    if reason is not None:
        pytest.skip(reason)
    missing = set(_ops.SCHEMAS) - set(_impl.kernels(impl))
    if missing:
        pytest.skip(f"impl={impl!r} has no kernel yet for {sorted(missing)}")
    batches = data()
    finals = {}
    for fmt in ("dense", "packed"):
        model = mlp()
        opt = make(model, impl, base, fmt, random_masks(model))
        run(model, opt, batches)
        finals[fmt] = [p.detach().clone() for p in model.parameters()]
        if fmt == "packed":
            assert all("packed_mask" in opt.state[p] and "mask" not in opt.state[p] for p in model.parameters())
    for a, b in zip(finals["dense"], finals["packed"]):
        assert torch.equal(a, b)


def test_packed_masks_hold_one_bit_per_weight():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))  # every tensor a multiple of 8 elements
    masks = random_masks(model)
    dense = sfron_ops.SFRon(model.named_parameters(), mask=masks)
    packed = sfron_ops.SFRon(model.named_parameters(), mask=masks, mask_format="packed")
    dense_bytes = mask_bytes([dense.state[p]["mask"] for p in model.parameters()])
    packed_bytes_ = mask_bytes([packed.state[p]["packed_mask"] for p in model.parameters()])
    numel = sum(p.numel() for p in model.parameters())
    assert dense_bytes == numel  # bool: one byte a weight
    assert packed_bytes_ * 8 == dense_bytes
    # odd sizes round up to whole bytes per tensor
    odd = mlp()
    opt = sfron_ops.SFRon(odd.named_parameters(), mask=random_masks(odd), mask_format="packed")
    got = mask_bytes([opt.state[p]["packed_mask"] for p in odd.parameters()])
    assert got == sum(packed_bytes(p.numel()) for p in odd.parameters())
    # the checkpoint shrinks by as much
    sizes = {}
    for name, o in (("dense", dense), ("packed", packed)):
        buf = io.BytesIO()
        torch.save({k: v for k, v in o.state_dict()["state"].items()}, buf)
        sizes[name] = buf.getbuffer().nbytes
    assert sizes["dense"] - sizes["packed"] >= 0.8 * (dense_bytes - packed_bytes_)


def test_masks_read_back_unpacked_and_compute_mask_packs():
    model = mlp()
    masks = random_masks(model)
    opt = sfron_ops.SFRon(model.named_parameters(), mask=masks, mask_format="packed")
    for (name, p), m in zip(model.named_parameters(), opt.masks()):
        assert m.dtype == torch.bool and torch.equal(m, masks[name])
        assert torch.equal(opt.state[p]["packed_mask"], pack_mask(masks[name]))
    # Fisher-ratio masks come out the same either way
    results = {}
    for fmt in ("dense", "packed"):
        model = mlp()
        opt = sfron_ops.SFRon(model.named_parameters(), mask_format=fmt)
        for which, (x, y) in zip(("forget", "remain"), data(2, seed=9)):
            F.cross_entropy(model(x), y).backward()
            opt.accumulate_fisher(which)
            opt.zero_grad()
        results[fmt] = (opt.compute_mask(gamma=1.0), [m.clone() for m in opt.masks()])
    assert results["dense"][0] == results["packed"][0]
    for a, b in zip(results["dense"][1], results["packed"][1]):
        assert torch.equal(a.bool(), b)


@pytest.mark.parametrize("saved_fmt,loaded_fmt", [("packed", "packed"), ("packed", "dense"), ("dense", "packed")])
def test_state_dict_round_trip(saved_fmt, loaded_fmt):
    batches = data(8)
    model = mlp()
    opt = make(model, "foreach", "adamw", saved_fmt, random_masks(model))
    run(model, opt, batches[:4])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(model, opt, batches[4:], start=4)

    resumed = mlp(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed, "foreach", "adamw", loaded_fmt)
    opt2.load_state_dict(saved_opt)
    key = "packed_mask" if loaded_fmt == "packed" else "mask"
    assert all(key in opt2.state[p] and len({"mask", "packed_mask"} & set(opt2.state[p])) == 1
               for p in resumed.parameters())
    run(resumed, opt2, batches[4:], start=4)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.masks(), opt2.masks()):
        assert torch.equal(a, b)


def test_soft_masks_cannot_be_packed_and_nothing_changes():
    model = mlp()
    good = random_masks(model)
    opt = sfron_ops.SFRon(model.named_parameters(), mask=good, mask_format="packed")
    before = [opt.state[p]["packed_mask"].clone() for p in model.parameters()]
    # a valid mask first: it must not be stored either
    soft = {"0.weight": ~good["0.weight"], "2.weight": good["2.weight"].float() * 0.5}
    with pytest.raises(ValueError, match=r"'2.weight'.*floating point.*mask_format='packed'"):
        opt.set_masks(soft)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(opt.state[p]["packed_mask"], b)
    with pytest.raises(ValueError, match="Invalid mask_format: 'bits'"):
        sfron_ops.SFRon(model.parameters(), mask_format="bits")
    # a dense optimizer keeps a soft mask; loading it into a packed one is refused by name
    dense = sfron_ops.SFRon(mlp().named_parameters(), mask=soft)
    packed = sfron_ops.SFRon(mlp().named_parameters(), mask_format="packed")
    with pytest.raises(ValueError, match="loaded mask for parameter .* floating point"):
        packed.load_state_dict(dense.state_dict())


def test_buckets_separate_packed_dense_and_unmasked():
    ts = [torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(1)]
    ms = [pack_mask(torch.ones(4, 4)), torch.ones(4, 4, dtype=torch.uint8), None, torch.ones(4, 4, dtype=torch.bool),
          torch.ones(1, dtype=torch.uint8)]
    got = functional.buckets(ts, ms)
    cpu = torch.device("cpu")
    assert got == {(cpu, torch.float32, "packed"): [0], (cpu, torch.float32, torch.uint8): [1, 4],
                   (cpu, torch.float32, None): [2], (cpu, torch.float32, torch.bool): [3]}
    # one element: a dense uint8 {0, 1} mask and its packed byte read the same
    m = torch.tensor([1], dtype=torch.uint8)
    assert torch.equal(unpack_mask(pack_mask(m), m), m.bool())
