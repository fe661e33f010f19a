"""saliency_mask_: m = [(F_f + eps) / (F_r + eps) >= gamma] with the kept count."""

import pytest
import torch
from helpers import kernels, make, shapes_for

from sfron_ops import reference, saliency_mask


def test_reference_hand_checked():
    ff, fr = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 0.0, 3.0])
    m = torch.empty(4, dtype=torch.bool)
    kept = torch.zeros((), dtype=torch.int64)
    reference.saliency_mask_([ff], [fr], [m], kept, gamma=1.0)
    # 0/0 is guarded by eps: (0 + eps) / (0 + eps) = 1 >= 1
    assert m.tolist() == [True, False, True, True]
    assert kept.item() == 3


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
@pytest.mark.parametrize("case", ["sizes", "many"])
def test_matches_reference(impl, device, case, mask_dtype, gamma):
    shapes = shapes_for(case)
    ff = make(shapes, torch.float32, device, 0.0, 1.0)
    fr = make(shapes, torch.float32, device, 0.0, 1.0)
    for f in ff[::4]:  # exact zeros and ties exercise the eps guard and the >=
        f.zero_()
    fr[1].copy_(ff[1])
    expected = [torch.empty(s, dtype=mask_dtype, device=device) for s in shapes]
    actual = [torch.full(s, 7, dtype=mask_dtype, device=device) for s in shapes]
    kept_e = torch.zeros((), dtype=torch.int64, device=device)
    kept_a = torch.full((), 5, dtype=torch.int64, device=device)
    reference.saliency_mask_(ff, fr, expected, kept_e, gamma=gamma)
    kernels(impl)["saliency_mask"](ff, fr, actual, kept_a, gamma=gamma)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    assert kept_a.item() == kept_e.item() + 5  # kept accumulates


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


def test_density_keeps_ties_at_the_cutoff():
    ff = [torch.tensor([4.0, 2.0, 2.0, 2.0, 1.0])]
    fr = [torch.ones(5)]
    result = saliency_mask(ff, fr, density=0.4)  # ceil(0.4 * 5) = 2, but three elements tie at the cut-off
    assert result.masks[0].tolist() == [True, True, True, True, False]
    assert result.kept == 4


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
