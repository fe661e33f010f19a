"""sfron_ops: saliency-based machine unlearning (SFR-on) as a PyTorch optimizer with fused kernels."""

from . import _ops, reference  # noqa: F401  (schemas first, then their default kernels)
from ._impl import IMPLS, available_impls, default_impl, extension_available, extension_error
from .fisher import fisher_diagonal
from .integrations import phase, set_phase, unwrap_optimizer  # phases through wrapped optimizers (Accelerate)
from .loss import LOSS_FLOOR, AdaptiveLoss, ZeroForgetLossWarning, adaptive_cross_entropy, adaptive_weights
from .mask import SaliencyMask, canonical_name, saliency_mask
from .monitor import ForgetMonitor, ForgettingStalledWarning
from .optim import SFRon

__version__ = "0.1.0"

__all__ = [
    "SFRon",
    "AdaptiveLoss",
    "adaptive_weights",
    "adaptive_cross_entropy",
    "LOSS_FLOOR",
    "ZeroForgetLossWarning",
    "ForgetMonitor",
    "ForgettingStalledWarning",
    "fisher_diagonal",
    "saliency_mask",
    "SaliencyMask",
    "canonical_name",
    "available_impls",
    "default_impl",
    "extension_available",
    "extension_error",
    "IMPLS",
    "phase",
    "set_phase",
    "unwrap_optimizer",
]
