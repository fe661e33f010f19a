"""Backends: which exist, which can run on a device, and which one ``impl=None`` picks.

Every backend provides the same table ``{family stem: kernel}`` with the
signatures of :mod:`sfron_ops._ops`:

=============  =====================================================  ==========================
``impl``       kernels                                                devices
=============  =====================================================  ==========================
reference      :mod:`sfron_ops.reference` (per tensor, ground truth)  any
foreach        :mod:`sfron_ops.foreach` (``torch._foreach_*``)         any
fused          ``torch.ops.sfron_ops.*`` from the compiled ``_C``     CPU (C++), CUDA
triton         :mod:`sfron_ops.triton`                                CUDA; CPU with TRITON_INTERPRET=1
=============  =====================================================  ==========================

``impl=None`` resolves per device: CUDA prefers fused, then triton, then
foreach; CPU prefers fused, then foreach. The environment variable
``SFRON_OPS_IMPL`` replaces ``None`` (useful to force a backend in CI). An
explicit choice that cannot run raises.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import _ops, foreach, reference

IMPLS = ("reference", "foreach", "fused", "triton")
ENV_VAR = "SFRON_OPS_IMPL"

_PREFERENCE = {"cuda": ("fused", "triton", "foreach"), "cpu": ("fused", "foreach")}


_EXTENSION = None


def _load_extension() -> str | None:
    """Import the compiled kernels (they register with the dispatcher); the reason if that fails."""
    global _EXTENSION
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return "not built: no sfron_ops._C module (pip install --no-build-isolation -e . builds it)"
    try:
        _EXTENSION = importlib.import_module(f"{__package__}._C")
    except Exception as exc:  # ImportError, or OSError on an ABI mismatch with the installed torch
        return f"{type(exc).__name__}: {exc}"
    return None


_EXTENSION_ERROR = _load_extension()

_TRITON = None
_TRITON_ERROR = None


def extension_available() -> bool:
    """Whether the compiled extension ``sfron_ops._C`` loaded."""
    return _EXTENSION_ERROR is None


def grad_signature():
    """The compiled extension's ``grad_signature`` (each gradient's dtype and layout as bytes), or ``None``."""
    return getattr(_EXTENSION, "grad_signature", None)


def extension_error() -> str | None:
    """Why the compiled extension did not load, or ``None``."""
    return _EXTENSION_ERROR


def _dispatch_key(device_type: str) -> str | None:
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)


def _load_triton():
    global _TRITON, _TRITON_ERROR
    if _TRITON is None and _TRITON_ERROR is None:
        try:
            from . import triton as triton_backend

            _TRITON = triton_backend
        except Exception as exc:
            _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
    return _TRITON


def why_unavailable(impl: str, device: torch.device | str) -> str | None:
    """``None`` if ``impl`` can run on ``device``, else the reason it cannot."""
    device_type = torch.device(device).type
    if impl not in IMPLS:
        return f"unknown impl {impl!r}; expected one of {IMPLS}"
    if impl in ("reference", "foreach"):
        return None
    if impl == "fused":
        if _EXTENSION_ERROR is not None:
            return f"the compiled extension did not load ({_EXTENSION_ERROR})"
        key = _dispatch_key(device_type)
        missing = [
            stem for stem in _ops.SCHEMAS
            if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualname(stem), key)
        ]
        if missing:
            return f"the compiled extension has no {device_type} kernel for {', '.join(missing)}"
        return None
    # triton
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels are not built for {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if _load_triton() is None:
        return f"the Triton backend did not import ({_TRITON_ERROR})"
    return None


def available_impls(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """``{impl: None if it can run on device else the reason}`` for every backend."""
    return {impl: why_unavailable(impl, device) for impl in IMPLS}


def default_impl(device: torch.device | str) -> str:
    """The backend ``impl=None`` picks on ``device`` (``SFRON_OPS_IMPL`` aside)."""
    device_type = torch.device(device).type
    for impl in _PREFERENCE.get(device_type, ("foreach",)):
        if why_unavailable(impl, device) is None:
            return impl
    return "reference"


def validate_impl(impl: str | None) -> None:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r}; expected None or one of {IMPLS}")


def resolve_impl(impl: str | None, device: torch.device | str) -> str:
    """The backend to run on ``device``: explicit choices are checked, ``None`` is resolved."""
    if impl is None:
        impl = os.environ.get(ENV_VAR) or None
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"{ENV_VAR}={impl!r} is not a backend; expected one of {IMPLS}")
    if impl is None:
        return default_impl(device)
    validate_impl(impl)
    reason = why_unavailable(impl, device)
    if reason is not None:
        raise RuntimeError(f"impl={impl!r} cannot run on {torch.device(device)}: {reason}")
    return impl


def _fused_kernel(stem: str):
    """A compiled op: the extension's direct entry in eager code, the dispatcher op (``torch.ops``) while
    torch.compile traces. Both run the same kernels; the direct entry skips the boxed calling convention
    that ``torch.ops`` goes through (csrc/python.cpp)."""
    op = _ops.op(stem)
    direct = getattr(_EXTENSION, _ops.OP_NAMES[stem], None)
    if direct is None:  # an extension built before the direct entries
        return op

    def kernel(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        return direct(*args, **kwargs)

    kernel.__name__ = kernel.__qualname__ = _ops.OP_NAMES[stem]
    kernel.op = op
    return kernel


class PerDevice:
    """An optimizer's backend choice: ``impl`` (a name, or ``None`` for the default or ``$SFRON_OPS_IMPL``)
    resolved once per device and then kept, so a run cannot change backend halfway. A call with a device
    returns the backend's name there."""

    def __init__(self, impl: str | None, devices=()):
        validate_impl(impl)
        self.impl, self.names = impl, {}
        for device in devices:
            self(device)

    def __call__(self, device: torch.device) -> str:
        name = self.names.get(device)
        if name is None:
            name = self.names[device] = resolve_impl(self.impl, device)
        return name


def resolve_for(impl, device) -> str:
    """:func:`resolve_impl` for an ``impl`` that may also be a callable ``device -> name`` (an optimizer's choice)."""
    return impl(device) if callable(impl) else resolve_impl(impl, device)


_TABLES: dict[str, dict] = {}


def kernels(impl: str) -> dict:
    """The kernel table ``{family stem: kernel}`` of a backend, built once from the op list."""
    table = _TABLES.get(impl)
    if table is None:
        if impl == "fused":
            table = {stem: _fused_kernel(stem) for stem in _ops.SCHEMAS}
        elif impl == "triton":
            backend = _load_triton()
            if backend is None:
                raise RuntimeError(f"the Triton backend did not import ({_TRITON_ERROR})")
            table = backend.KERNELS
        elif impl in ("reference", "foreach"):
            table = _ops.kernel_table(reference if impl == "reference" else foreach)
        else:
            raise ValueError(f"Invalid impl: {impl!r}; expected one of {IMPLS}")
        _TABLES[impl] = table
    return table
