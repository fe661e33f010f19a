"""``python -m sfron_ops.report``: versions, devices, and which backend runs where (and why not)."""

from __future__ import annotations

import platform
import sys

import torch

import sfron_ops
from sfron_ops import _impl


def lines() -> list[str]:
    out = [
        f"sfron_ops {sfron_ops.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        out.append(f"triton {triton.__version__}")
    except Exception as exc:
        out.append(f"triton: not importable ({type(exc).__name__}: {exc})")
    err = _impl.extension_error()
    out.append("compiled extension: loaded" if err is None else f"compiled extension: not loaded ({err})")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        for i in range(torch.cuda.device_count()):
            out.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        out.append("CUDA: not available")
    for device in devices:
        out.append(f"[{device}] impl=None picks: {_impl.default_impl(device)}")
        for impl, reason in _impl.available_impls(device).items():
            out.append(f"  {impl:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return out


def main() -> int:
    print("\n".join(lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
