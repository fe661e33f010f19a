"""Compile every kernel variant the backend launches for a GPU target, without a GPU.

``python tests/triton_compile_check.py [--arch 90]`` runs each family on
small CPU tensors with launches recorded but not executed, compiles each
recorded variant with Triton's own compiler and ``ptxas`` for ``sm_<arch>``,
and prints what the PTX does: global loads and stores (``v4`` = 16-byte
vectors), IEEE division and square root, atomics. It fails if a variant does
not compile, spills registers, or has no 16-byte vector access. It then lets
torch.compile record one SFR-on step and prints, for every recorded kernel
launch, the arguments torch's analysis of the kernel finds written (what
Inductor copies back). The interpreter (``TRITON_INTERPRET=1``) checks
semantics on CPU; this checks that the same source is valid, vectorised GPU
code, and traceable.
"""

import argparse
import contextlib
import io
import os
import re
import sys

import torch

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


def _variants():
    """Launch records covering direct and table mode, every mask kind and both storage widths."""
    from sfron_ops.reference import pack_mask
    from sfron_ops.triton import KERNELS
    from sfron_ops.triton._common import record_launches

    with record_launches(execute=False) as records:
        for shapes in ([(1 << 16,)], [(4097,), (3, 5)]):
            for dtype in (torch.float32, torch.bfloat16):
                p = [torch.zeros(s, dtype=dtype) for s in shapes]
                g = [torch.zeros(s, dtype=dtype) for s in shapes]
                st = [torch.zeros(()) for _ in shapes]
                masks = {"element": ([torch.zeros(s, dtype=torch.bool) for s in shapes], False),
                         "packed": ([pack_mask(torch.zeros(s, dtype=torch.bool)) for s in shapes], True),
                         "float": ([torch.zeros(s, dtype=dtype) for s in shapes], False)}
                ns = torch.zeros(2)
                for m, packed in masks.values():
                    KERNELS["masked_norm"](g, m, ns, alpha=1.0, packed_masks=packed)
                for (m, packed), momentum in zip(masks.values(), (0.9, 0.0, 0.9)):
                    KERNELS["sgd_update"](p, g, m, [x.clone() for x in p], st, ns, lr=0.1, scale=1.0,
                                          momentum=momentum, dampening=0.0, weight_decay=0.0, nesterov=False,
                                          max_norm=1.0, packed_masks=packed)
                KERNELS["sgd_update"](p, g, [], [], st, None, lr=0.1, scale=1.0, momentum=0.0, dampening=0.0,
                                      weight_decay=0.0, nesterov=False, max_norm=0.0)
                for m, packed in masks.values():
                    KERNELS["adamw_update"](p, g, m, [x.clone() for x in p], [x.clone() for x in p], st, ns,
                                            lr=0.1, scale=1.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                                            max_norm=1.0, packed_masks=packed)
                KERNELS["fisher_accumulate"]([torch.zeros(s) for s in shapes], g, scale=1.0)
                KERNELS["slow_sync"]([x.clone() for x in p], p, alpha=0.5, reset_fast=True)
            f = [torch.zeros(s) for s in shapes]
            KERNELS["saliency_mask"](f, f, [torch.zeros(s, dtype=torch.bool) for s in shapes],
                                     torch.zeros((), dtype=torch.int64), gamma=1.0)
    return records


def compile_record(record, arch: int):
    """Compile one recorded launch for ``sm_<arch>``: (name, mode, ptx, compiled kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = record.kernel
    signature, attrs, constexprs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(kernel.arg_names, record.args)):
        if torch.is_tensor(arg):
            signature[name] = "*" + _TYPES[arg.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned, as at run time
        elif isinstance(arg, int):
            signature[name] = "i32" if -2**31 <= arg < 2**31 else "i64"
            if arg % 16 == 0 and arg != 0 and name not in kernel.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    for name in kernel.arg_names[len(record.args):]:
        signature[name] = "constexpr"
        constexprs[name] = record.constexprs[name]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    # ptxas -v reports registers and spills; Triton prints its log when asked to
    log = io.StringIO()
    with _knob(triton.knobs.nvidia, "dump_ptxas_log", True), _knob(triton.knobs.compilation, "always_compile", True), \
            contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    mode = "table" if constexprs.get("TABLE") else "direct"
    return kernel.__name__, mode, compiled.asm["ptx"], log.getvalue()


@contextlib.contextmanager
def _knob(obj, name, value):
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


def summarize(ptx: str, ptxas_log: str) -> dict:
    registers = re.findall(r"Used (\d+) registers", ptxas_log)
    spills = re.findall(r"(\d+) bytes spill stores", ptxas_log)
    return {
        "registers": int(registers[-1]) if registers else None,
        "spill_bytes": int(spills[-1]) if spills else None,
        "loads": sorted(set(re.findall(r"ld\.global(?:\.\w+)*", ptx))),
        "stores": sorted(set(re.findall(r"st\.global(?:\.\w+)*", ptx))),
        "math": sorted(set(re.findall(r"(?:div|sqrt)\.(?:rn|approx|full)(?:\.ftz)?\.f32", ptx))),
        "atomics": sorted(set(re.findall(r"atom\.[\w.]+", ptx))),
    }


def traced_writes() -> list[tuple[str, list[str]]]:
    """(kernel, arguments it writes) for every kernel launch that torch.compile records for one SFR-on step.

    AOTAutograd functionalizes the step; torch analyses each recorded kernel's TTIR to find the arguments
    it writes, which decides what Inductor copies back. Nothing runs: the compiled function is replaced by
    a stub. Without a GPU, a stand-in driver tells the analysis which target to compile for.
    """
    import triton
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

    from sfron_ops.triton import KERNELS

    try:
        triton.runtime.driver.active.get_current_target()
    except RuntimeError:  # no GPU driver here

        class TargetOnly:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        triton.runtime.driver.set_active(TargetOnly())

    graphs = []

    class Captured(Exception):
        pass

    def capture(gm, example_inputs):
        graphs.append(gm)

        def stub(*args):
            raise Captured()

        return stub

    def step(grads, masks, params, bufs, steps, norm_state, slow, exp_avgs, exp_avg_sqs, fishers, kept):
        KERNELS["masked_norm"](grads, masks, norm_state, alpha=2.0)
        KERNELS["sgd_update"](params, grads, masks, bufs, steps, norm_state, lr=0.1, scale=-2.0, momentum=0.9,
                              dampening=0.0, weight_decay=1e-2, nesterov=True, max_norm=0.5)
        KERNELS["adamw_update"](params, grads, [], exp_avgs, exp_avg_sqs, steps, None, lr=0.1, scale=1.0, beta1=0.9,
                                beta2=0.99, eps=1e-8, weight_decay=0.0, max_norm=0.0)
        KERNELS["slow_sync"](slow, params, alpha=0.5, reset_fast=True)
        KERNELS["fisher_accumulate"](fishers, grads, scale=0.5)
        KERNELS["saliency_mask"](fishers, slow, masks, kept, gamma=1.0)

    shapes = [(7,), (3, 5)]
    params = [torch.rand(s) for s in shapes]
    args = ([torch.rand(s) for s in shapes], [torch.rand(s) < 0.5 for s in shapes], params,
            [torch.zeros(s) for s in shapes], [torch.zeros(()) for _ in shapes], torch.zeros(2),
            [p.clone() for p in params], [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes],
            [torch.zeros(s) for s in shapes], torch.zeros((), dtype=torch.int64))
    try:
        torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=capture))(*args)
    except Captured:
        pass
    out = []
    for node in graphs[0].graph.nodes:
        if node.op == "call_function" and "kernel_idx" in node.kwargs:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            out.append((kernel.__name__, list(node.kwargs["tensors_to_clone"])))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    failures = 0
    seen = set()
    for record in _variants():
        key = (record.kernel.__name__, tuple(sorted((k, str(v)) for k, v in record.constexprs.items())),
               tuple(str(a.dtype) if torch.is_tensor(a) else type(a).__name__ for a in record.args))
        if key in seen:
            continue
        seen.add(key)
        name, mode, ptx, ptxas_log = compile_record(record, args.arch)
        info = summarize(ptx, ptxas_log)
        vector = any(".v4." in op for op in info["loads"] + info["stores"])
        ok = vector and info["spill_bytes"] == 0
        failures += not ok
        consts = ",".join(f"{k}={v}" for k, v in record.constexprs.items() if k not in ("BLOCK", "CHUNK"))
        print(f"{'ok ' if ok else 'BAD'} {name:27s} {mode:6s} {consts}\n    {info}")
    print(f"{len(seen)} variants compiled for sm_{args.arch}, {failures} without vector loads or with spills")
    for name, writes in traced_writes():
        print(f"graph {name} writes={','.join(sorted(writes))}")
    from torch._library.triton import get_triton_kernels_for_op

    from sfron_ops.triton import TRITON_OPS

    for op in TRITON_OPS.values():
        name = op._opoverload._schema.name
        print(f"registry {name} {','.join(k.__name__ for k in get_triton_kernels_for_op(name))}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
