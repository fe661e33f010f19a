"""Small models and data shared by the optimizer tests."""

import torch
from torch import nn


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-SiLU-pool twice and a linear head.

    Smooth activations and average pooling keep two runs that differ by float32 rounding from
    flipping a ReLU or max-pool branch, which Adam would amplify into a lr-sized difference.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 10),
    )


def batches(n: int, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def random_masks(model: nn.Module, seed: int = 2, density: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}


#: the framework-integration tests' optimizer: a clipped forget step and slow weights, on the foreach backend
INTEGRATION_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, forget_alpha=3.0, max_grad_norm=0.5, slow_alpha=0.5,
                      sync_period=2, impl="foreach")


def tiny_mlp() -> nn.Module:
    """10 features, 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
