"""Models for the unlearning scenarios: an MLP, a small CNN and ResNet-18 adapted to 32x32 inputs."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ReLU layers of width ``hidden``, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ValueError(f"Invalid MLP size: depth={depth!r}, hidden={hidden!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU, conv-BN-ReLU, 2x2 max-pool), global average pool, linear head.

    Works for any input of at least 4x4 pixels (8x8 digits, 32x32 CIFAR).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def resnet18_32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem convolution and no max-pool.

    No pretrained weights (nothing is downloaded).
    """
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


MODELS = ("mlp", "cnn", "resnet18")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """A model by name (``"mlp"``, ``"cnn"``, ``"resnet18"``) for inputs of ``input_shape`` (C, H, W)."""
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, **kwargs)
    if name == "cnn":
        return SmallCNN(input_shape[0], num_classes, **kwargs)
    if name == "resnet18":
        return resnet18_32(num_classes, in_channels=input_shape[0], **kwargs)
    raise ValueError(f"Invalid model: {name!r}; expected one of {MODELS}")


# ---------------------------------------------------------------------------------------------- denoisers
def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding of integer timesteps (half sines, half cosines), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _CondBlock(nn.Module):
    """Pre-norm residual MLP block; the [time, class] embedding is projected into it and added."""

    def __init__(self, width: int, cond: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.cond = nn.Linear(cond, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h, c):
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.cond(c)))


class DigitsDenoiser(nn.Module):
    r"""A class-conditional ε-prediction MLP for small images (the built-in 8×8 digits denoiser).

    Called as ``model(x_t, t, labels)``; label ``num_classes`` is "no class" (classifier-free guidance).
    The class embedding goes through its own two-layer MLP, the sinusoidal time embedding through
    another, and their concatenation is projected into every residual block. (Adding the class
    embedding to the time embedding instead gave a model that no unlearning method could make
    forget one class without breaking the others.)
    """

    def __init__(self, image_shape=(1, 8, 8), num_classes: int = 10, width: int = 384, depth: int = 3,
                 emb: int = 128):
        super().__init__()
        if min(width, depth, emb) < 1 or emb % 2:
            raise ValueError(f"Invalid DigitsDenoiser size: width={width!r}, depth={depth!r}, emb={emb!r}")
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.emb = emb
        pixels = math.prod(self.image_shape)
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_embed = nn.Embedding(num_classes + 1, emb)
        self.class_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Linear(pixels, width)
        self.blocks = nn.ModuleList(_CondBlock(width, 2 * emb) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, pixels))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, labels):
        c = torch.cat([self.time_mlp(timestep_embedding(t, self.emb)), self.class_mlp(self.class_embed(labels))], 1)
        c = F.silu(c)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).view(x.shape)


def diffusers_unet(image_shape=(1, 8, 8), num_classes: int = 10, channels=(32, 64), layers_per_block: int = 1,
                   norm_num_groups: int = 8):
    """A class-conditional ``diffusers.UNet2DModel`` (plain down/up blocks) as a denoiser."""
    from diffusers import UNet2DModel

    from ..diffusion import DiffusersDenoiser

    c, h, _ = image_shape
    n = len(channels)
    net = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=tuple(channels),
                      layers_per_block=layers_per_block, down_block_types=("DownBlock2D",) * n,
                      up_block_types=("UpBlock2D",) * n, num_class_embeds=num_classes + 1,
                      norm_num_groups=norm_num_groups)
    return DiffusersDenoiser(net, num_classes)


def diffusers_dit(image_shape=(1, 8, 8), num_classes: int = 10, layers: int = 2, heads: int = 2, head_dim: int = 16,
                  patch_size: int = 2):
    """A ``diffusers.DiTTransformer2DModel`` (adaLN-zero, class labels) as a denoiser."""
    from diffusers import DiTTransformer2DModel

    from ..diffusion import DiffusersDenoiser

    c, h, _ = image_shape
    net = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=c,
                                out_channels=c, num_layers=layers, sample_size=h, patch_size=patch_size,
                                num_embeds_ada_norm=num_classes)
    return DiffusersDenoiser(net, num_classes)


DENOISERS = {"mlp": DigitsDenoiser, "unet": diffusers_unet, "dit": diffusers_dit}


def build_denoiser(name: str, image_shape, num_classes: int, **kwargs) -> nn.Module:
    """A class-conditional denoiser by name: ``"mlp"`` (built in), ``"unet"`` or ``"dit"`` (``diffusers``)."""
    if name not in DENOISERS:
        raise ValueError(f"Invalid denoiser: {name!r}; expected one of {tuple(DENOISERS)}")
    return DENOISERS[name](image_shape, num_classes, **kwargs)
