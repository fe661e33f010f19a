"""The CUDA kernels of ``csrc/cuda``, compiled for the CPU and run under an emulation of CUDA's execution model.

Without a GPU the CUDA sources are only compiled, never run. Here each source is rewritten in two
places and compiled as C++:

- every ``kernel<<<grid, block, shared, stream>>>(args)`` becomes
  ``cuda_emulation::launch(grid, block, shared, stream, kernel, args)`` (``cuda_emulation.h``:
  blocks in turn, the threads of a block as fibers that meet at real barriers and warp shuffles);
- ``TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m)`` registers the same functions as CPU kernels of the
  ops ``sfron_ops_cuda_emulated::*``, defined here like ``sfron_ops::*``: the schemas of
  :data:`sfron_ops._ops.SCHEMAS` with the reference as the default kernel.

Everything else is the shipped code: argument checks, the multi-tensor tables and launch split,
the alignment decisions, the per-thread index arithmetic, the vector and scalar paths, the block
reductions. ``include/`` stands in for the CUDA runtime and c10's CUDA headers. The build uses
``-fsanitize=alignment`` without recovery, so a vector load from an address its width does not
divide ends the process, as it would fault on a GPU.

``kernels()`` returns the op table in the layout of :func:`sfron_ops._impl.kernels`;
``why_unavailable(device)`` says why it cannot run (the emulation works on CPU tensors).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import torch

from sfron_ops import _ops, reference

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
BUILD_DIR = ROOT / "build" / "cuda_emulation"
NAMESPACE = "sfron_ops_cuda_emulated"

# `name<...><<<config>>>(` -> `::cuda_emulation::launch(config, name<...>, `
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<([^;]*?)>>>\(")
_REGISTRATION = "TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m)"

_state: dict = {}


def rewrite(text: str, name: str) -> str:
    """A CUDA source as emulation C++: launches through cuda_emulation::launch, kernels registered for CPU."""
    text = _LAUNCH.sub(r"::cuda_emulation::launch(\2, \1, ", text)
    text = text.replace(_REGISTRATION, f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")
    if "<<<" in text or "TORCH_LIBRARY_IMPL(sfron_ops," in text:
        raise RuntimeError(f"{name}: a launch or a registration the emulation does not know how to rewrite")
    return text


def _write_if_changed(path: Path, text: str) -> None:
    # an unchanged file keeps its time stamp, so ninja rebuilds only what changed
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _sources() -> list[str]:
    out = BUILD_DIR / "src"
    out.mkdir(parents=True, exist_ok=True)
    sources = []
    for source in sorted(CUDA_SOURCES.iterdir()):
        if source.suffix not in (".cu", ".cuh"):
            continue
        target = out / (source.stem + (".cpp" if source.suffix == ".cu" else ".cuh"))
        _write_if_changed(target, rewrite(source.read_text(), source.name))
        if source.suffix == ".cu":
            sources.append(str(target))
    return sources + [str(HERE / "support.cpp")]


def _build() -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the build runs ninja; a virtual environment has it next to python
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    # the schemas and the default kernel of sfron_ops, so a call without tensors behaves alike
    library = torch.library.Library(NAMESPACE, "DEF")
    for stem, schema in _ops.SCHEMAS.items():
        library.define(schema)
        library.impl(_ops.OP_NAMES[stem], getattr(reference, _ops.OP_NAMES[stem]), "CompositeExplicitAutograd")
    sanitize = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
    cpp_extension.load(
        name=NAMESPACE,
        sources=_sources(),
        extra_cflags=["-O1", "-include", str(HERE / "cuda_emulation.h"), *sanitize],
        extra_ldflags=["-fsanitize=alignment"],
        extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc" / "include"), str(BUILD_DIR / "src")],
        build_directory=str(BUILD_DIR),
        is_python_module=False,
        verbose=False,
    )
    _state["library"] = library  # keeps the schemas defined


def why_unavailable(device="cpu") -> str | None:
    """``None`` when the emulated kernels can run on ``device``, else the reason."""
    if torch.device(device).type != "cpu":
        return "the CUDA emulation runs on CPU tensors"
    if "error" not in _state:
        try:
            _build()
            _state["error"] = None
        except Exception as exc:  # no compiler, a failed build
            _state["error"] = f"the CUDA emulation did not build: {type(exc).__name__}: {exc}"
    return _state["error"]


def kernels() -> dict:
    """``{family stem: op}`` running csrc/cuda under the emulation."""
    namespace = ops()
    return {stem: getattr(namespace, _ops.OP_NAMES[stem]).default for stem in _ops.SCHEMAS}


def ops():
    """``torch.ops.sfron_ops_cuda_emulated``: the kernels, plus the checks of the emulation itself
    (``block_sum``, ``barrier_after_return``, ``vector_load``; see support.cpp)."""
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    return getattr(torch.ops, NAMESPACE)


def set_reverse_order(reverse: bool) -> None:
    """Run blocks and the threads of each block last to first (``True``) or first to last."""
    ops().set_reverse_order(reverse)


def take_launch_count() -> int:
    """Kernel launches made by emulated kernels since the last call."""
    return int(ops().take_launch_count())

