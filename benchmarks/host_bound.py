"""Host cost of one optimizer ``step()``: ResNet-18's parameter list with 8 elements per tensor.

With tensors this small the kernels' work is negligible and a step costs what the host spends
around them: gathering lists, validation, bucketing, picking kernels, launching. That is what
bounds a GPU step of a real model once its bytes are few (on an H200 the bytes of ResNet-18's
forget step take about 70 µs), and what a CUDA graph removes.

Rows are ``SFRon`` configurations on each available backend and torch's own optimizers on the
same list (``SGD``/``AdamW`` with ``fused=True`` and ``foreach=True``). Every contender steps
the same parameters with the same gradients; gradients are made anew before every timed step,
as ``zero_grad()`` and a backward pass would, so nothing may rely on seeing the same gradient
tensors twice. Rounds interleave the contenders so that drift on a shared host hits them alike;
the figure is the median of every timed step of a contender, in microseconds.

Run: ``python -m benchmarks.host_bound [--device cpu] [--rounds 15] [--steps 40] [--out DIR]``; the
targets (ratios inside one run) are printed with the table, ``--out`` writes it with the environment
(device, versions, commit, load) to ``DIR/<device>-host-bound.{json,md}``, and ``benchmarks.run``
records the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from sfron_ops import SFRon, available_impls

from .measure import environment

#: ResNet-18's parameter tensors (``cases.resnet18_cifar``), a number so that the case runs without torchvision
TENSORS = 62
#: elements per tensor: small enough that only the host's work counts
ELEMENTS = 8
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
ADAMW = dict(lr=1e-3, weight_decay=0.05)
FORGET = dict(forget_alpha=25.0, max_grad_norm=7.0)

#: (row, baseline row, largest ratio) the step path is held to on CPU
TARGETS = (
    ("fused remain", "torch SGD fused", 0.8),
    ("fused forget clip", "torch SGD fused", 1.2),
    ("fused adamw remain", "torch AdamW fused", 0.8),
    ("foreach remain", "torch SGD foreach", 1.0),
)


def shapes() -> list[tuple[int, ...]]:
    """ResNet-18's tensor count, each tensor shrunk to ``ELEMENTS`` elements."""
    return [(ELEMENTS,)] * TENSORS


@dataclass
class Contender:
    name: str
    params: list[torch.Tensor]
    step: Callable[[], object]


def _params(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes()]


def contenders(device, dtype=torch.float32) -> list[Contender]:
    """Every row that can run on ``device``."""
    device = torch.device(device)
    impls = [name for name, why in available_impls(device).items() if why is None and name != "reference"]
    out = []

    def ours(name, impl, phase="remain", **kwargs):
        params = _params(device, dtype)
        g = torch.Generator().manual_seed(1)
        masks = [(torch.rand(p.shape, generator=g) < 0.5).to(device) for p in params]
        opt = SFRon(params, mask=masks, impl=impl, **kwargs)
        out.append(Contender(name, params, lambda: opt.step(phase=phase)))

    for impl in impls:
        ours(f"{impl} remain", impl, **SGD)
        ours(f"{impl} remain no check", impl, check_finite=False, **SGD)
        ours(f"{impl} forget clip", impl, phase="forget", **SGD, **FORGET)
        ours(f"{impl} adamw remain", impl, base="adamw", **ADAMW)
    for kind in ("fused", "foreach"):
        if kind == "fused" and device.type not in ("cpu", "cuda"):
            continue
        params = _params(device, dtype)
        sgd = torch.optim.SGD(params, **SGD, **{kind: True})
        out.append(Contender(f"torch SGD {kind}", params, sgd.step))
        params = _params(device, dtype)
        adamw = torch.optim.AdamW(params, **ADAMW, **{kind: True})
        out.append(Contender(f"torch AdamW {kind}", params, adamw.step))
    return out


def _new_grads(params, generator):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device=p.device, dtype=p.dtype)


def measure(device="cpu", rounds=15, steps=40, warmup=3, threads=1) -> dict[str, float]:
    """Median microseconds per ``step()`` for every contender."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    rows = contenders(device)
    g = torch.Generator().manual_seed(2)
    times = {c.name: [] for c in rows}
    for c in rows:  # first steps create state and plans; not timed
        for _ in range(warmup):
            _new_grads(c.params, g)
            c.step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for r in range(rounds):
        order = rows if r % 2 == 0 else rows[::-1]
        for c in order:
            for _ in range(steps):
                _new_grads(c.params, g)
                sync()
                start = time.perf_counter()
                c.step()
                times[c.name].append(time.perf_counter() - start)
            sync()
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def table(results: dict[str, float]) -> str:
    lines = ["| step | µs per step |", "|---|---:|"]
    lines += [f"| {name} | {us:,.0f} |" for name, us in results.items()]
    lines += ["", "| target | ratio | at most | met |", "|---|---:|---:|---|"]
    for row, base, limit in TARGETS:
        if row in results and base in results:
            ratio = results[row] / results[base]
            lines.append(f"| {row} / {base} | {ratio:.2f} | {limit:.1f} | {'yes' if ratio <= limit else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_bound", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write <device>-host-bound.json and .md here")
    args = p.parse_args(argv)
    env = environment(args.device)
    results = measure(args.device, args.rounds, args.steps, threads=args.threads)
    env["loadavg_end"] = os.getloadavg()
    text = table(results)
    print(text)
    if args.out:
        stem = os.path.join(args.out, f"{torch.device(args.device).type}-host-bound")
        with open(stem + ".json", "w") as f:
            json.dump({"environment": env, "rounds": args.rounds, "steps": args.steps, "threads": args.threads,
                       "us_per_step": results}, f, indent=1)
        load = ", ".join(f"{x:.2f}" for x in env["loadavg_start"]), ", ".join(f"{x:.2f}" for x in env["loadavg_end"])
        with open(stem + ".md", "w") as f:
            f.write(f"# Host cost of one step: {env['device_name']} ({env['device']})\n\n"
                    f"Measured {env['date_utc']} at commit `{(env['commit'] or 'unknown')[:10]}`"
                    f"{' with uncommitted changes' if env['commit_dirty'] else ''}; torch {env['torch']}, "
                    f"Python {env['python']}, {args.threads} torch thread(s), {args.rounds} rounds of {args.steps} "
                    f"steps per contender. Load average (1, 5, 15 min) at the start {load[0]}, at the end "
                    f"{load[1]}.\n\nMedian µs per `step()` over ResNet-18's 62 tensors with {ELEMENTS} elements "
                    f"each (`python -m benchmarks.host_bound`).\n\n{text}\n")
    return results


if __name__ == "__main__":
    main()
