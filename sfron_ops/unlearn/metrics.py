"""Evaluation of an unlearned classifier against the retrained oracle (RT).

Vocabulary (docs/unlearning.md, "Evaluation"): FA, RA, TA are accuracies in percent on the forget,
remain and test sets; MIA is MIA-efficacy in percent; Avg.D is the mean absolute gap to RT over
FA, RA, TA and MIA; KL and JS compare output distributions with RT's on the forget set (nats);
RTE is the wall time of the unlearning run in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

GAP_KEYS = ("FA", "RA", "TA", "MIA")
# The membership classifier of the reference evaluation (SalUn, SFR-on): RBF SVC, C = 3, gamma = "auto".
SVC_C = 3.0


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of ``model`` over ``loader`` (eval mode, float32, on the CPU)."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            logits.append(model(x.to(device)).float().cpu())
            targets.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent (``nan`` for an empty set)."""
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits has {logits.shape[0]} rows but targets has {targets.shape[0]}")
    if targets.numel() == 0:
        return math.nan
    # a row with a NaN or infinite logit has no prediction: it counts as wrong
    correct = (logits.argmax(dim=1) == targets) & torch.isfinite(logits).all(dim=1)
    return float(correct.float().mean()) * 100.0


def entropy(probs: torch.Tensor) -> torch.Tensor:
    r"""Row-wise Shannon entropy :math:`H(p) = -\sum_c p_c \log p_c` in nats, with :math:`0 \log 0 = 0`."""
    probs = probs.double()
    return -torch.where(probs > 0, probs * probs.clamp_min(1e-300).log(), torch.zeros_like(probs)).sum(dim=1)


def _as_probs(x: torch.Tensor, logits: bool) -> torch.Tensor:
    return F.softmax(x.double(), dim=1) if logits else x.double()


def kl_divergence(p: torch.Tensor, q: torch.Tensor, *, logits: bool = False) -> float:
    r"""Mean over rows of :math:`\mathrm{KL}(p \,\|\, q) = \sum_c p_c \log(p_c / q_c)` in nats.

    ``p`` is the reference (RT) distribution. Terms with :math:`p_c = 0` are zero; a
    :math:`q_c = 0` where :math:`p_c > 0` gives ``inf``. With ``logits=True`` both are
    softmaxed first (in float64, so nothing underflows that the logits can express).
    """
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    if logits:
        lp, lq = F.log_softmax(p.double(), dim=1), F.log_softmax(q.double(), dim=1)
        return float((lp.exp() * (lp - lq)).sum(dim=1).mean())
    p, q = p.double(), q.double()
    ratio = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p))
    return float(ratio.sum(dim=1).mean())


def js_divergence(p: torch.Tensor, q: torch.Tensor, *, logits: bool = False) -> float:
    r"""Mean over rows of the Jensen-Shannon divergence
    :math:`\tfrac12 \mathrm{KL}(p \| m) + \tfrac12 \mathrm{KL}(q \| m)`, :math:`m = (p + q)/2`, in nats
    (between 0 and :math:`\log 2`)."""
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    p, q = _as_probs(p, logits), _as_probs(q, logits)
    m = (p + q) / 2
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def mia_efficacy(remain_probs: torch.Tensor, test_probs: torch.Tensor, forget_probs: torch.Tensor, *,
                 balance: bool = True, seed: int = 0) -> float:
    """MIA-efficacy in percent: the share of forget samples a membership classifier calls non-members.

    The classifier is an RBF SVC (C = 3, gamma = "auto") fitted on the prediction entropy of
    remain samples (members, label 1) and test samples (non-members, label 0). With ``balance``
    the larger of the two shadow sets is subsampled (with ``seed``) to the size of the smaller,
    so that the classifier has no prior towards either answer.
    """
    from sklearn.svm import SVC  # scikit-learn is an optional dependency (extra "eval")

    members = entropy(remain_probs).numpy()
    non_members = entropy(test_probs).numpy()
    target = entropy(forget_probs).numpy()
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError(f"mia_efficacy needs remain and test samples (got {len(members)} and {len(non_members)})")
    if len(target) == 0:
        return math.nan
    if balance:
        rng = np.random.default_rng(seed)
        k = min(len(members), len(non_members))
        if len(members) > k:
            members = members[np.sort(rng.choice(len(members), k, replace=False))]
        if len(non_members) > k:
            non_members = non_members[np.sort(rng.choice(len(non_members), k, replace=False))]
    x = np.concatenate([members, non_members])[:, None]
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    if len(np.unique(y)) < 2:
        raise ValueError("mia_efficacy needs both members and non-members")
    clf = SVC(C=SVC_C, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    return float((clf.predict(target[:, None]) == 0).mean()) * 100.0


def avg_gap(metrics: Mapping[str, float], reference: Mapping[str, float], keys: Sequence[str] = GAP_KEYS) -> float:
    """Avg.D: mean of ``|metrics[k] - reference[k]|`` over ``keys`` (FA, RA, TA, MIA)."""
    missing = [k for k in keys if k not in metrics or k not in reference]
    if missing:
        raise KeyError(f"avg_gap needs {list(keys)}; missing {missing}")
    return float(sum(abs(metrics[k] - reference[k]) for k in keys) / len(keys))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value). With a non-finite value
    among them (a diverged run) the mean is that of the values as they are and the std is NaN."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    with np.errstate(invalid="ignore"):
        mean = float(arr.mean())
    if not np.isfinite(arr).all():
        return mean, math.nan
    return mean, float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _probs_or_uniform(logits):
    """Softmax in float64; a row with a non-finite logit (a diverged model) becomes the uniform distribution."""
    probs = F.softmax(logits.double(), dim=1)
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        probs[bad] = 1.0 / logits.shape[1]
    return probs


@torch.no_grad()
def evaluate(model: torch.nn.Module, forget_loader, remain_loader, test_loader, *, reference_forget_logits=None,
             device=None, mia_seed: int = 0) -> dict:
    """FA, RA, TA and MIA of ``model``; KL and JS to the reference when its forget-set logits are given.

    The forget loader must list the forget samples in the same order as when the reference
    logits were computed (use an unshuffled loader).
    """
    f_logits, f_targets = predict(model, forget_loader, device)
    r_logits, r_targets = predict(model, remain_loader, device)
    t_logits, t_targets = predict(model, test_loader, device)
    nonfinite = sum(int((~torch.isfinite(z).all(dim=1)).sum()) for z in (f_logits, r_logits, t_logits))
    out = {
        "FA": accuracy(f_logits, f_targets),
        "RA": accuracy(r_logits, r_targets),
        "TA": accuracy(t_logits, t_targets),
        "MIA": mia_efficacy(_probs_or_uniform(r_logits), _probs_or_uniform(t_logits), _probs_or_uniform(f_logits),
                            seed=mia_seed),
    }
    if nonfinite:
        out["nonfinite"] = nonfinite
    if reference_forget_logits is not None:
        if reference_forget_logits.shape != f_logits.shape:
            raise ValueError(f"reference_forget_logits has shape {tuple(reference_forget_logits.shape)}, expected "
                             f"{tuple(f_logits.shape)}")
        if nonfinite:  # a diverged model is infinitely far from RT, whatever NaN arithmetic would say
            out["KL"], out["JS"] = math.inf, math.inf
        else:
            out["KL"] = kl_divergence(reference_forget_logits, f_logits, logits=True)
            out["JS"] = js_divergence(reference_forget_logits, f_logits, logits=True)
    out["forget_logits"] = f_logits
    return out


# ---------------------------------------------------------------------------------------------- generation
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    r"""Fréchet distance between two Gaussians, in float64:

    .. math::
       d^2 = \lVert \mu_1 - \mu_2 \rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
             - 2 \operatorname{tr}\big((\Sigma_1 \Sigma_2)^{1/2}\big)

    :math:`\operatorname{tr}((\Sigma_1\Sigma_2)^{1/2})` is the sum of the square roots of the
    eigenvalues of :math:`\Sigma_1\Sigma_2` (real and non-negative for covariance matrices; the tiny
    negative or imaginary parts that rounding leaves are dropped).
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or mu1.dim() != 1 or s1.shape != (mu1.numel(),) * 2 or s2.shape != s1.shape:
        raise ValueError(f"frechet_distance needs means of shape (d,) and covariances (d, d), got {tuple(mu1.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    eig = torch.linalg.eigvals(s1 @ s2)
    covmean_trace = eig.real.clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * covmean_trace)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (ddof = 1) of a set of feature vectors, in float64."""
    f = torch.as_tensor(features, dtype=torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs at least 2 feature vectors of shape (n, d), got {tuple(f.shape)}")
    return f.mean(dim=0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two sets of feature vectors: the Fréchet distance of their Gaussian fits."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# ---------------------------------------------------------------------------------------------- language models
# TOFU-style yardsticks (sfron_ops.unlearn.language). An answer's probability is per token:
# P = exp(-avg_nll), avg_nll the mean next-token loss over its labelled tokens (answer and final EOS).
TRUTH_RATIO_EPS = 1e-10


def truth_ratios(true_nll, perturbed_nll) -> np.ndarray:
    r"""Per question :math:`TR = P_{false} / (P_{true} + 10^{-10})` with :math:`P_{true} = e^{-\text{avg\_nll}}`
    of the true answer (``true_nll``, shape ``[N]``) and :math:`P_{false} = e^{-\operatorname{mean}_j
    \text{avg\_nll}_j}` over the perturbed answers (``perturbed_nll``, ``[N, J]``): a mean in log space."""
    true_nll = np.asarray(true_nll, dtype=np.float64)
    perturbed_nll = np.asarray(perturbed_nll, dtype=np.float64)
    if perturbed_nll.ndim != 2 or perturbed_nll.shape[0] != true_nll.shape[0]:
        raise ValueError(f"perturbed_nll must be [N, J] with N = {true_nll.shape[0]}, got {perturbed_nll.shape}")
    return np.exp(-perturbed_nll.mean(axis=1)) / (np.exp(-true_nll) + TRUTH_RATIO_EPS)


def truth_ratio_score(ratios, kind: str) -> float:
    """The truth ratio of a set: ``"forget"``, mean of min(TR, 1/TR) (1: true and false answers equally likely);
    ``"true_better"``, mean of max(0, 1 - TR) (1: the true answer far more likely), for the sets a model keeps."""
    tr = np.asarray(ratios, dtype=np.float64)
    if kind == "forget":
        return float(np.minimum(tr, 1.0 / (tr + TRUTH_RATIO_EPS)).mean())
    if kind == "true_better":
        return float(np.maximum(0.0, 1.0 - tr).mean())
    raise ValueError(f"Invalid kind: {kind!r}; expected 'forget' or 'true_better'")


def forget_quality(ratios, reference_ratios) -> float:
    """Forget quality: the p-value of the two-sided two-sample Kolmogorov-Smirnov test between the per-question
    truth ratios of a model and of RT on the same forget questions (1: indistinguishable; TOFU reads
    p >= 0.05 as within RT's band)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(ratios, dtype=np.float64), np.asarray(reference_ratios, dtype=np.float64)).pvalue)


def model_utility(values) -> float:
    """The harmonic mean of the utility numbers (each in [0, 1]); 0 as soon as one of them is 0."""
    from scipy.stats import hmean

    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)) or (v < 0).any():
        raise ValueError(f"model utility needs finite values >= 0, got {v.tolist()}")
    return 0.0 if (v == 0).any() else float(hmean(v))


def min_k_score(token_logprobs: Sequence[torch.Tensor], k: float = 0.4) -> np.ndarray:
    """Min-K % prob, loss-like (high: a non-member): per sequence, minus the mean of its ``max(1, int(k n))``
    lowest token log-probabilities (``n`` tokens, the final EOS already dropped)."""
    out = []
    for lp in token_logprobs:
        lp = torch.as_tensor(lp, dtype=torch.float64).flatten()
        if lp.numel() == 0:
            raise ValueError("min_k_score needs at least one token per sequence")
        m = max(1, int(k * lp.numel()))
        out.append(-float(torch.sort(lp).values[:m].mean()))
    return np.asarray(out)


def mia_auc(member_scores, nonmember_scores) -> float:
    """AUC of a loss-like membership score (high: a non-member) that separates the forget set (label 0) from
    never-trained holdout data (label 1): about 1 while the forget set is still memorised, 0.5 when it looks
    like data the model never saw (RT's level), below 0.5 when it looks less familiar than that."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L recall (longest common subsequence / reference length, in words, lowercased, punctuation
    dropped; no stemming) of generated answers against the reference answers, from ``torchmetrics``."""
    from torchmetrics.functional.text.rouge import rouge_score

    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (and some), got {len(predictions)} and "
                         f"{len(references)}")
    return float(rouge_score(list(predictions), list(references), rouge_keys="rougeL",
                             accumulate="avg")["rougeL_recall"])
