"""saliency_mask_: m = [(F_f + eps) / (F_r + eps) >= gamma] with the kept count; the density rule's exact count."""

import math

import pytest
import torch
from helpers import dtype_id, kernels, make, shapes_for

from sfron_ops import reference, saliency_mask
from sfron_ops.mask import density_count, density_mask


def test_reference_hand_checked():
    ff, fr = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 0.0, 3.0])
    m = torch.empty(4, dtype=torch.bool)
    kept = torch.zeros((), dtype=torch.int64)
    reference.saliency_mask_([ff], [fr], [m], kept, gamma=1.0)
    # 0/0 is guarded by eps: (0 + eps) / (0 + eps) = 1 >= 1
    assert m.tolist() == [True, False, True, True]
    assert kept.item() == 3


def _fisher_pair(shapes, device, gamma):
    """Forget and remain Fisher with exact zeros on both sides (the eps guard), whole zero tensors, and ratios
    exactly at the cut-off (the >=)."""
    forget = make(shapes, torch.float32, device, 0.0, 1.0)
    remain = make(shapes, torch.float32, device, 0.0, 1.0)
    for f, r in zip(forget, remain):
        f.view(-1)[::5] = r.view(-1)[::5] * gamma
        f.view(-1)[::7] = 0.0
        r.view(-1)[::11] = 0.0
    for f in forget[::4]:
        f.zero_()
    return forget, remain


@pytest.mark.parametrize("gamma", [0.37, 1.0, 3.0])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8], ids=dtype_id)
@pytest.mark.parametrize("case", ["sizes", "many"])
def test_matches_reference_exactly(impl, device, case, mask_dtype, gamma):
    shapes = shapes_for(case)
    ff, fr = _fisher_pair(shapes, device, gamma)
    expected = [torch.empty(s, dtype=mask_dtype, device=device) for s in shapes]
    actual = [torch.full(s, 7, dtype=torch.uint8, device=device).to(mask_dtype) for s in shapes]
    kept_e = torch.zeros((), dtype=torch.int64, device=device)
    kept_a = torch.full((), 5, dtype=torch.int64, device=device)
    reference.saliency_mask_(ff, fr, expected, kept_e, gamma=gamma)
    kernels(impl)["saliency_mask"](ff, fr, actual, kept_a, gamma=gamma)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and torch.equal(a, e)
    assert kept_a.item() == kept_e.item() + 5  # kept accumulates


def test_empty_call_does_nothing(impl, device):
    kept = torch.tensor(3, device=device)
    kernels(impl)["saliency_mask"]([], [], [], kept, gamma=1.0)
    assert kept.item() == 3


def test_bad_calls_name_the_argument(impl, device):
    d = device
    with pytest.raises(RuntimeError, match=r"saliency_mask_: masks\[0\] must be bool or uint8, got torch.float32"):
        kernels(impl)["saliency_mask"]([torch.ones(3, device=d)], [torch.ones(3, device=d)], [torch.ones(3, device=d)],
                                       torch.tensor(0, device=d), gamma=1.0)
    with pytest.raises(RuntimeError, match=r"saliency_mask_: kept must be an int64 scalar, got torch.int32"):
        kernels(impl)["saliency_mask"]([torch.ones(3, device=d)], [torch.ones(3, device=d)],
                                       [torch.zeros(3, dtype=torch.bool, device=d)],
                                       torch.tensor(0, dtype=torch.int32, device=d), gamma=1.0)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5])
def test_density_cutoff_agrees_with_the_reference_ratio(impl_any, density):
    """The density mode ranks the reference's float32 ratios in plain PyTorch whatever ``impl`` is, so every
    backend gives the reference's masks element for element."""
    ff, fr = _fisher_pair(shapes_for("sizes"), "cpu", 1.0)
    ours = saliency_mask(ff, fr, density=density, impl=impl_any)
    theirs = saliency_mask(ff, fr, density=density, impl="reference")
    assert ours.kept == theirs.kept
    for a, b in zip(ours.masks, theirs.masks):
        assert torch.equal(a, b)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_density_keeps_the_largest_ratios(density):
    ff = [torch.rand(101), torch.rand(7, 3)]
    fr = [torch.rand(101), torch.rand(7, 3)]
    result = saliency_mask(ff, fr, density=density)
    ratios = torch.cat([reference.saliency_ratio(f, r).flatten() for f, r in zip(ff, fr)])
    k = int(torch.tensor(density * ratios.numel()).ceil())
    assert result.total == 122
    assert result.kept == k  # random ratios have no ties
    kept_values = torch.cat([r.flatten()[m.flatten()] for r, m in
                             zip([reference.saliency_ratio(f, r) for f, r in zip(ff, fr)], result.masks)])
    if k:
        assert kept_values.min() >= ratios.topk(k).values.min()


def test_density_breaks_ties_at_the_cutoff_by_flat_index():
    ff = [torch.tensor([4.0, 2.0, 2.0, 2.0, 1.0])]
    fr = [torch.ones(5)]
    result = saliency_mask(ff, fr, density=0.6)  # ceil(0.6 * 5) = 3: 4 and the first two of three tied 2s
    assert result.masks[0].tolist() == [True, True, True, False, False]
    assert (result.kept, result.total) == (3, 5)
    # across tensors the flat index runs over the tensors in order
    ff = [torch.tensor([2.0, 5.0]), torch.tensor([[2.0, 2.0], [0.5, 2.0]])]
    result = saliency_mask(ff, [torch.ones(2), torch.ones(2, 2)], density=0.5, dtype=torch.uint8)
    assert [m.tolist() for m in result.masks] == [[1, 1], [[1, 0], [0, 0]]] and result.kept == 3


def test_density_count_is_exact_with_many_exact_zeros():
    """A gradient with many exact zeros (a dead ReLU unit, an unused class): the zeros all tie, and the
    mask must still keep ceil(density * N), not every tied element."""
    g = torch.Generator().manual_seed(3)
    forget = [torch.rand(300, generator=g), torch.rand(40, 25, generator=g), torch.rand(7, generator=g)]
    forget[0][::3] = 0
    forget[1][5:] = 0  # 700 of 1000 zeros
    forget[2][:] = 0
    remain = [torch.zeros_like(f) for f in forget]  # zero forget Fisher: ratio exactly (0 + eps) / (0 + eps) = 1
    ratios = torch.cat([reference.saliency_ratio(f, r).flatten() for f, r in zip(forget, remain)])
    n = ratios.numel()
    ties = int((ratios == 1.0).sum())
    assert ties > n // 2
    for density in (0.2, 0.5, 0.8, 1.0):
        result = saliency_mask(forget, remain, density=density)
        kept = torch.cat([m.flatten() for m in result.masks])
        k = math.ceil(density * n - 1e-9)
        assert result.kept == int(kept.sum()) == k
        # every element above the cut-off is kept, and the kept tied elements are the first ones in flat order
        cutoff = ratios.topk(k).values.min()
        assert kept[ratios > cutoff].all()
        tied_kept = kept[ratios == cutoff]
        assert tied_kept[: int(tied_kept.sum())].all() and not tied_kept[int(tied_kept.sum()):].any()
    # the same rule ranks any scores: SalUn's |gradient| masks
    scores = {"w": torch.tensor([[0.0, 3.0], [0.0, 0.0]]), "b": torch.tensor([0.0, 1.0])}
    result = density_mask(scores, 0.5)
    assert result.masks["w"].tolist() == [[True, True], [False, False]] and result.masks["b"].tolist() == [False, True]


def test_density_count_reads_density_as_written():
    assert [density_count(d, n) for d, n in ((0.3, 10), (0.4, 5), (0.7, 10), (0.1, 122), (0.8, 85002))] == \
        [3, 2, 7, 13, 68002]
    assert density_count(0.0, 9) == 0 and density_count(1, 9) == 9 and density_count(1e-12, 9) == 1
    assert saliency_mask([torch.rand(10)], [torch.rand(10)], density=0.3).kept == 3  # not ceil(0.3 * 10.0) = 4
    with pytest.raises(ValueError, match="NaN"):
        saliency_mask([torch.tensor([1.0, float("nan")])], [torch.ones(2)], density=0.5)


def test_dict_in_dict_out_and_bad_input():
    ff = {"a": torch.ones(3), "b": torch.zeros(2)}
    fr = {"a": torch.zeros(3), "b": torch.ones(2)}
    result = saliency_mask(ff, fr, gamma=2.0)
    assert set(result.masks) == {"a", "b"} and result.kept == 3 and result.total == 5
    with pytest.raises(ValueError, match="Invalid density: 1.5"):
        saliency_mask(ff, fr, density=1.5)
    with pytest.raises(ValueError, match="Fisher shapes differ for 'a'"):
        saliency_mask(ff, {"a": torch.zeros(4), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="same keys"):
        saliency_mask(ff, {"a": torch.zeros(3)})
