"""End-to-end machine unlearning: the runner, SFR-on and baselines, evaluation against retraining.

>>> from sfron_ops.unlearn import run
>>> result = run("sfron", model, forget_loader, remain_loader, iterations=1500, forget_freq=5,
...              forget_alpha=25.0, lr=0.01, checkpoint="sfron.pt", resume=True)   # doctest: +SKIP

Command line: ``sfron-unlearn run --scenario digits-random`` (or ``python -m sfron_ops.unlearn``);
class forgetting in a diffusion model: ``sfron-unlearn run --scenario digits-ddpm-class`` (``generation.py``).
"""

from .methods import METHODS, Method, adaptive_forget_loss, make_method
from .metrics import (
                      accuracy,
                      avg_gap,
                      evaluate,
                      fid,
                      frechet_distance,
                      js_divergence,
                      kl_divergence,
                      mean_std,
                      mia_efficacy,
)
from .runner import RunResult, run

__all__ = [
    "run",
    "RunResult",
    "Method",
    "METHODS",
    "make_method",
    "adaptive_forget_loss",
    "evaluate",
    "accuracy",
    "mia_efficacy",
    "kl_divergence",
    "js_divergence",
    "avg_gap",
    "mean_std",
    "fid",
    "frechet_distance",
]
