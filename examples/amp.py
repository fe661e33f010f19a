"""SFR-on with mixed precision: torch.amp.GradScaler through both phases, Fisher on unscaled gradients.

    python examples/amp.py    # fp16 autocast on a GPU; bf16 autocast with a CPU scaler otherwise

scaler.step(opt, phase=...) forwards the phase; a scaler allows one step per update(), so update()
follows each phase. accumulate_fisher(..., grad_scaler=scaler) unscales first (a scaled gradient
squared carries the scale squared) and leaves out a batch whose gradients overflowed.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.nn import functional as F
from toy import batches, pretrained, report, toy_task

import sfron_ops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    forget, retain = toy_task()
    model = pretrained(forget, retain).to(device)
    forget, retain = [t.to(device) for t in forget], [t.to(device) for t in retain]
    report("before", model, forget, retain)
    opt = sfron_ops.SFRon(model.named_parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4, forget_alpha=10.0,
                          max_grad_norm=5.0)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 14)

    for which, data in (("forget", forget), ("remain", retain)):
        stream = batches(data, 32, seed=7)
        for _ in range(4):
            x, y = next(stream)
            with torch.autocast(device, dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            opt.accumulate_fisher(which, scale=0.25, grad_scaler=scaler)
            scaler.update()
            opt.zero_grad()
    kept, total = opt.compute_mask(gamma=10.0)
    print(f"mask keeps {kept} of {total} weights")

    f_stream, r_stream = batches(forget, 32), batches(retain, 64)
    for i in range(args.iters):
        for g in opt.param_groups:
            g["forget_alpha"] = 10.0 * (1 + math.cos(math.pi * i / args.iters)) / 2
        phases = (("forget", sfron_ops.adaptive_cross_entropy, f_stream),) if i % 2 == 0 else ()
        for phase, loss_fn, stream in phases + (("remain", F.cross_entropy, r_stream),):
            x, y = next(stream)
            with torch.autocast(device, dtype=dtype):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt, phase=phase)
            scaler.update()
            opt.zero_grad()
    report("after", model, forget, retain)
    print(f"loss scale {scaler.get_scale():g}, steps skipped by SFRon {opt.skipped_steps}")


if __name__ == "__main__":
    main()
