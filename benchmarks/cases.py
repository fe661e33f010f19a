"""Benchmark cases: parameter lists (shapes and memory layout) and the tensors an op needs.

A case is a list of parameter shapes, each with a storage offset in elements
(non-zero offsets make views that are not 16-byte aligned). The model cases
take their shapes from torchvision models built on the meta device, so no
memory is spent on the models themselves.

========================  ===========================================================  =========================
case                      tensors                                                      elements
========================  ===========================================================  =========================
``resnet18_cifar``        torchvision ResNet-18, 10 classes, 3x3 stem, no max-pool     62 tensors, 11,173,962
``vit_b16``               torchvision ViT-B/16, 10-class head                          152 tensors, 85,806,346
``flat``                  one tensor                                                   2^28 (CUDA), 2^24 (CPU)
``many_tiny``             10,000 tensors of 1,024 elements                             10,240,000
``ragged``                numels = 1 or 3 mod 8 (and 8/9/64/65), every other one a     21 tensors, 7,756,561
                          view at a storage offset of one element
========================  ===========================================================  =========================

Quick mode (``--quick``) leaves out ``vit_b16`` on CPU and shrinks ``flat`` and
``many_tiny`` there; smoke mode (the test suite) keeps only small cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sfron_ops.reference import pack_mask

#: in the order a run measures them (the most telling first, should a deadline cut a run short)
CASE_NAMES = ("resnet18_cifar", "flat", "vit_b16", "many_tiny", "ragged")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: (tensors, elements) the model cases must have; checked when they are built
EXPECTED = {"resnet18_cifar": (62, 11_173_962), "vit_b16": (152, 85_806_346)}

# numel = 1 or 3 (mod 8) exercises scalar tails; 8, 9, 64, 65 are the sizes of a torch CPU fused-SGD bug
RAGGED_SHAPES = (
    (1,), (3,), (8,), (9,), (64,), (65,), (105,), (1027,), (3, 5, 7), (4097,), (257, 129), (65537,),
    (131073, 3), (1_000_003,), (2049, 1001), (4_194_305,), (11,), (17, 19), (33, 33), (12_289,), (99,),
)


@dataclass(frozen=True)
class Case:
    """A parameter list: shapes and, per tensor, a storage offset in elements."""

    name: str
    description: str
    shapes: tuple
    offsets: tuple = field(default=())

    def __post_init__(self):
        if not self.offsets:
            object.__setattr__(self, "offsets", (0,) * len(self.shapes))

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def resnet18_cifar(device="meta") -> nn.Module:
    """ResNet-18 for 32x32 inputs: torchvision's, 10 classes, a 3x3 stride-1 stem and no max-pool."""
    import torchvision

    with torch.device(device):
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vit_b16(device="meta") -> nn.Module:
    import torchvision

    with torch.device(device):
        return torchvision.models.vit_b_16(num_classes=10)


def _model_case(name: str, model: nn.Module, description: str) -> Case:
    shapes = tuple(tuple(p.shape) for p in model.parameters())
    case = Case(name, description, shapes)
    expected = EXPECTED[name]
    if (case.n_tensors, case.numel) != expected:
        raise RuntimeError(f"{name}: built {case.n_tensors} tensors with {case.numel:,} elements, "
                           f"expected {expected[0]} with {expected[1]:,} (torchvision changed?)")
    return case


def build_case(name: str, device: str = "cpu", mode: str = "full") -> Case:
    """The case ``name`` for ``device`` in ``mode`` (``full``, ``quick`` or ``smoke``)."""
    cpu = torch.device(device).type == "cpu"
    if name == "resnet18_cifar":
        return _model_case(name, resnet18_cifar(), "ResNet-18 CIFAR-10 parameters")
    if name == "vit_b16":
        return _model_case(name, vit_b16(), "ViT-B/16 parameters, 10-class head")
    if name == "flat":
        log2 = {"full": 24 if cpu else 28, "quick": 22 if cpu else 28, "smoke": 16}[mode]
        return Case(name, f"one tensor of 2^{log2} elements", ((1 << log2,),))
    if name == "many_tiny":
        count = {"full": 10_000, "quick": 2_000 if cpu else 10_000, "smoke": 200}[mode]
        return Case(name, f"{count:,} tensors of 1,024 elements", ((1024,),) * count)
    if name == "ragged":
        shapes = RAGGED_SHAPES if mode != "smoke" else tuple(s for s in RAGGED_SHAPES if math.prod(s) < 100_000)
        return Case(name, "odd sizes, every other tensor misaligned by one element", shapes,
                    tuple(i % 2 for i in range(len(shapes))))
    raise ValueError(f"unknown case {name!r}; expected one of {CASE_NAMES}")


def cases_for(device: str, mode: str) -> tuple[str, ...]:
    """The cases a run measures by default."""
    if mode == "smoke":
        return ("ragged",)
    if mode == "quick" and torch.device(device).type == "cpu":
        return ("resnet18_cifar", "flat", "many_tiny", "ragged")
    return CASE_NAMES


# ------------------------------------------------------------------ tensors


def _alloc(shape, offset: int, dtype, device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` that starts ``offset`` elements into its storage."""
    if offset == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    return torch.empty(numel + offset, dtype=dtype, device=device)[offset:].view(shape)


def tensor_list(case: Case, dtype, device, fill, generator=None) -> list[torch.Tensor]:
    """One tensor per shape of ``case`` with its layout, filled by ``fill``.

    ``fill`` is ``"zeros"``, ``"normal:<std>"``, ``"bernoulli:<p>"`` (a bool mask when
    ``dtype`` is bool) or ``"square:<scale>"`` (``scale * u^2``, ``u`` uniform: Fisher-like).
    """
    kind, _, arg = fill.partition(":")
    out = []
    for shape, offset in zip(case.shapes, case.offsets):
        t = _alloc(shape, offset, dtype, device)
        make = dict(generator=generator, device=device, dtype=torch.float32)
        if kind == "zeros":
            t.zero_()
        elif kind == "normal":
            t.copy_(torch.randn(shape, **make).mul_(float(arg)))
        elif kind == "bernoulli":
            t.copy_(torch.rand(shape, **make) < float(arg))
        elif kind == "square":
            t.copy_(torch.rand(shape, **make).square_().mul_(float(arg)))
        else:
            raise ValueError(f"unknown fill {fill!r}")
        out.append(t)
    return out


#: state entry -> (dtype rule, fill); "param" means the parameter dtype
STATE_FILLS = {
    "params": ("param", "normal:0.1"),
    "grads": ("param", "normal:0.01"),
    "masks": (torch.bool, "bernoulli:0.5"),
    "momentum_buffers": ("param", "zeros"),
    "exp_avgs": ("param", "zeros"),
    "exp_avg_sqs": ("param", "zeros"),
    "fishers": (torch.float32, "zeros"),
    "forget_fishers": (torch.float32, "square:1e-4"),
    "remain_fishers": (torch.float32, "square:1e-4"),
    "saliency_masks": (torch.bool, "zeros"),
    "slow_params": ("param", "normal:0.1"),
}


@dataclass
class OpState:
    """The tensors an op works on, for one case, dtype and device.

    ``norm_state`` is the optimizer's ``[sum of squares, non-finite flag]``
    buffer; ``steps``, its float32 step counters (one 0-dim tensor per
    parameter), exist whenever ``params`` does.
    """

    case: Case
    dtype: torch.dtype
    device: torch.device
    tensors: dict

    def __getattr__(self, name):
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(name) from None

    def copy(self) -> OpState:
        """Fresh tensors with the same values and the same layout (storage offsets included)."""
        tensors = {}
        for key, value in self.tensors.items():
            if key in STATE_FILLS:
                tensors[key] = [_alloc(t.shape, off, t.dtype, t.device).copy_(t)
                                for t, off in zip(value, self.case.offsets)]
            elif isinstance(value, list):
                tensors[key] = [t.clone() for t in value]
            else:
                tensors[key] = value.clone()
        return OpState(self.case, self.dtype, self.device, tensors)


def make_state(case: Case, dtype, device, needs, seed: int = 0) -> OpState:
    """The tensors ``needs`` names, filled deterministically from ``seed``.

    ``packed_masks`` (which needs ``masks``) are the bit-packed form of ``masks``.
    """
    device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for key in needs:
        if key == "packed_masks":
            continue
        rule, fill = STATE_FILLS[key]
        tensors[key] = tensor_list(case, dtype if rule == "param" else rule, device, fill, generator)
    if "packed_masks" in needs:
        # the same masks, one bit per element (the layout of SFRon(mask_format="packed"))
        tensors["packed_masks"] = [pack_mask(m) for m in tensors["masks"]]
    # the optimizer's norm buffer and, with parameters, its per-parameter step counters
    tensors["norm_state"] = torch.zeros(2, dtype=torch.float32, device=device)
    if "params" in needs:
        tensors["steps"] = [torch.zeros((), dtype=torch.float32, device=device) for _ in case.shapes]
    return OpState(case, dtype, device, tensors)
