"""Evaluation metrics against hand-computed cases."""

import math
import warnings

import pytest
import torch

from sfron_ops.unlearn import metrics as M

pytest.importorskip("sklearn")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_accuracy_hand_case_and_nonfinite_rows_count_as_wrong():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [1.0, 0.5]])
    targets = torch.tensor([0, 1, 1, 0])
    assert M.accuracy(logits, targets) == pytest.approx(75.0)
    logits[0, 1] = float("nan")  # row 0 was right; without a prediction it is wrong
    assert M.accuracy(logits, targets) == pytest.approx(50.0)
    assert math.isnan(M.accuracy(torch.empty(0, 2), torch.empty(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="rows"):
        M.accuracy(logits, targets[:3])


def test_entropy_hand_cases():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert M.entropy(probs).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])


def test_kl_hand_case():
    # KL([.5,.5] || [.25,.75]) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3); second row identical: 0
    p = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    q = torch.tensor([[0.25, 0.75], [0.1, 0.9]])
    assert M.kl_divergence(p, q) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-12)
    # zero terms of p contribute nothing; a zero of q under mass of p is infinite
    assert M.kl_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])) == pytest.approx(math.log(2))
    assert M.kl_divergence(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])) == math.inf
    with pytest.raises(ValueError, match="same shape"):
        M.kl_divergence(p, q[:1])


def test_kl_from_logits_matches_probabilities_and_is_zero_on_itself():
    torch.manual_seed(0)
    a, b = torch.randn(7, 5) * 3, torch.randn(7, 5) * 3
    expected = M.kl_divergence(torch.softmax(a.double(), 1), torch.softmax(b.double(), 1))
    assert M.kl_divergence(a, b, logits=True) == pytest.approx(expected, rel=1e-10)
    assert M.kl_divergence(a, a, logits=True) == pytest.approx(0.0, abs=1e-12)
    # logits far apart that softmax in float32 would round to exact zeros stay finite
    assert math.isfinite(M.kl_divergence(torch.tensor([[0.0, 200.0]]), torch.tensor([[200.0, 0.0]]), logits=True))


def test_js_hand_cases():
    assert M.js_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])) == pytest.approx(math.log(2))
    p, q = [0.5, 0.5], [0.25, 0.75]
    m = [0.375, 0.625]
    expected = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert M.js_divergence(torch.tensor([p]), torch.tensor([q])) == pytest.approx(expected, rel=1e-12)
    assert M.js_divergence(torch.tensor([q]), torch.tensor([p])) == pytest.approx(expected, rel=1e-12)


def _one_hot(n, c=10):
    return torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), c).double()


def _uniform(n, c=10):
    return torch.full((n, c), 1.0 / c, dtype=torch.float64)


def test_mia_efficacy_hand_case():
    # members are certain (entropy 0), non-members uniform (entropy ln 10): any sensible
    # classifier splits them; of 4 forget samples, 1 looks like a non-member -> 25 %
    members, non_members = _one_hot(40), _uniform(40)
    forget = torch.cat([_one_hot(3), _uniform(1)])
    assert M.mia_efficacy(members, non_members, forget) == pytest.approx(25.0)
    assert M.mia_efficacy(members, non_members, _uniform(5)) == pytest.approx(100.0)
    assert M.mia_efficacy(members, non_members, _one_hot(5)) == pytest.approx(0.0)


def test_mia_efficacy_balances_the_shadow_sets():
    # 500 members against 5 non-members: unbalanced, an RBF SVC would call everything a member
    members = torch.cat([_one_hot(495), _uniform(5)])
    non_members = _uniform(5)
    assert M.mia_efficacy(members, non_members, _uniform(3), balance=True) == pytest.approx(100.0)
    assert M.mia_efficacy(members, non_members, _uniform(3), balance=False) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="remain and test"):
        M.mia_efficacy(members[:0], non_members, _uniform(3))
    assert math.isnan(M.mia_efficacy(members, non_members, _uniform(0)))


def test_avg_gap_and_mean_std():
    model = {"FA": 90.0, "RA": 99.0, "TA": 80.0, "MIA": 30.0}
    rt = {"FA": 80.0, "RA": 100.0, "TA": 82.0, "MIA": 40.0}
    assert M.avg_gap(model, rt) == pytest.approx((10 + 1 + 2 + 10) / 4)
    with pytest.raises(KeyError, match="MIA"):
        M.avg_gap({"FA": 1.0, "RA": 1.0, "TA": 1.0}, rt)
    assert M.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert M.mean_std([4.0]) == (4.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std = M.mean_std([1.0, math.inf, 3.0])
        assert mean == math.inf and math.isnan(std)
        mean, std = M.mean_std([math.inf, -math.inf])
        assert math.isnan(mean) and math.isnan(std)


def test_evaluate_on_a_fixed_linear_model():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2) * 10)  # predicts the larger coordinate
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    forget = [(x[:2], torch.tensor([0, 0]))]   # one right, one wrong: FA 50
    remain = [(x, torch.tensor([0, 1, 0, 1]))]  # all right: RA 100
    test = [(x, torch.tensor([1, 1, 1, 1]))]   # half right: TA 50
    out = M.evaluate(model, forget, remain, test)
    assert (out["FA"], out["RA"], out["TA"]) == pytest.approx((50.0, 100.0, 50.0))
    assert 0.0 <= out["MIA"] <= 100.0
    ref = out["forget_logits"]
    again = M.evaluate(model, forget, remain, test, reference_forget_logits=ref)
    assert again["KL"] == pytest.approx(0.0, abs=1e-12) and again["JS"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="reference_forget_logits"):
        M.evaluate(model, forget, remain, test, reference_forget_logits=ref[:1])


def test_evaluate_marks_a_diverged_model():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    x = torch.randn(4, 2)
    y = torch.tensor([0, 1, 0, 1])
    out = M.evaluate(model, [(x, y)], [(x, y)], [(x, y)], reference_forget_logits=torch.zeros(4, 2))
    assert out["FA"] == 0.0 and out["nonfinite"] == 12
    assert out["KL"] == math.inf and out["JS"] == math.inf
