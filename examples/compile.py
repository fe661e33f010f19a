"""SFR-on steps under torch.compile(fullgraph=True), with tensor lr and alpha and bit-packed masks.

    python examples/compile.py [--iters 60] [--eager]

lr and forget_alpha are 0-dim tensors: the scheduler and the alpha schedule update them in place, and
the compiled steps read them at run time, so they compile once (per slow-weight counter value) and
never again. The LR scheduler wraps ``opt.step`` in a function Dynamo does not trace, so the compiled
functions call the class's step. Masks are stored with one bit per weight (mask_format="packed").
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import warnings

import torch
from torch._dynamo.utils import counters
from torch.nn import functional as F
from toy import batches, fisher_and_mask, pretrained, report, toy_task

import sfron_ops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--eager", action="store_true", help="do not compile (for comparison)")
    args = parser.parse_args(argv)

    forget, retain = toy_task()
    model = pretrained(forget, retain)
    report("before", model, forget, retain)
    opt = sfron_ops.SFRon(model.named_parameters(), lr=torch.tensor(0.02), momentum=0.9, weight_decay=5e-4,
                          forget_alpha=torch.tensor(10.0), max_grad_norm=5.0, impl="foreach", mask_format="packed")
    kept, total = fisher_and_mask(model, opt, forget, retain)
    packed = sum(opt.state[p]["packed_mask"].numel() for p in model.parameters())
    print(f"mask keeps {kept} of {total} weights, stored in {packed} bytes (bool masks: {total} bytes)")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.iters)

    step = type(opt).step
    # calling the class's step bypasses the scheduler's call tracking, which would warn on its first step
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
    # torch.optim wraps every step in a profiler range; compile it into the graph instead of dropping it with a warning
    torch._dynamo.config.capture_profiler_record_function = True
    if not torch.cuda.is_available():
        # Inductor's CPU code generation imports torch.utils.cpp_extension, which warns that no CUDA runtime is
        # found whenever a CUDA toolkit is installed but no GPU is visible: nothing this run needs
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    def forget_step():
        step(opt, phase="forget")

    def remain_step():
        step(opt)

    if not args.eager:
        forget_step = torch.compile(forget_step, fullgraph=True)
        remain_step = torch.compile(remain_step, fullgraph=True)
    f_stream, r_stream = batches(forget, 32), batches(retain, 64)
    for i in range(args.iters):
        opt.param_groups[0]["forget_alpha"].fill_(10.0 * (1 + math.cos(math.pi * i / args.iters)) / 2)
        if i % 2 == 0:
            x, y = next(f_stream)
            sfron_ops.adaptive_cross_entropy(model(x), y).backward()
            forget_step()
            opt.zero_grad()
        x, y = next(r_stream)
        F.cross_entropy(model(x), y).backward()
        remain_step()
        opt.zero_grad()
        sched.step()
    report("after", model, forget, retain)
    print(f"compiled graphs: {counters['stats']['unique_graphs']} for {args.iters} iterations")


if __name__ == "__main__":
    main()
