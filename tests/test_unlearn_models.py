"""Models of the unlearning scenarios."""

import pytest
import torch
from torch import nn

from sfron_ops.unlearn.models import MLP, SmallCNN, build_model, resnet18_32

pytest.importorskip("torchvision")


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_mlp_and_cnn_shapes(shape):
    x = torch.randn(2, *shape)
    assert build_model("mlp", shape, 7)(x).shape == (2, 7)
    assert build_model("cnn", shape, 7, width=8)(x).shape == (2, 7)
    assert isinstance(build_model("cnn", shape, 3), SmallCNN) and isinstance(build_model("mlp", shape, 3), MLP)


def test_resnet18_for_32x32():
    model = resnet18_32(10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert seen["shape"][-2:] == (4, 4)  # 32 -> 32 -> 16 -> 8 -> 4: no stem downsampling
    assert build_model("resnet18", (1, 32, 32), 5).conv1.in_channels == 1


def test_bad_model():
    with pytest.raises(ValueError, match="Invalid model: 'vit'"):
        build_model("vit", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="depth=0"):
        MLP(4, 2, depth=0)
