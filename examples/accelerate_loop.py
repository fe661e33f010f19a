"""SFR-on with Hugging Face Accelerate: accelerator.prepare(model, optimizer), the phase set through the wrapper.

    python examples/accelerate_loop.py            # or: accelerate launch examples/accelerate_loop.py

AcceleratedOptimizer.step() takes no phase argument: sfron_ops.phase(opt, "forget") sets it on the
SFRon inside, and Accelerate's own step (gradient sync, fp16 scaler, accumulation) runs unchanged.
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from toy import batches, pretrained, report, toy_task  # noqa: E402

import sfron_ops  # noqa: E402
from sfron_ops.integrations import accelerate as sfron_accelerate  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    forget, retain = toy_task()
    model = pretrained(forget, retain)
    report("before", model, forget, retain)
    opt = sfron_ops.SFRon(model.named_parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4, forget_alpha=10.0,
                          max_grad_norm=5.0)
    model, opt = accelerator.prepare(model, opt)
    device = accelerator.device

    # Fisher through the wrapper (unscaled first under fp16), then masks on the SFRon inside
    for which, data in (("forget", forget), ("remain", retain)):
        stream = batches(data, 32, seed=7)
        for _ in range(4):
            x, y = (t.to(device) for t in next(stream))
            sfron_accelerate.accumulate_fisher(accelerator, opt, F.cross_entropy(model(x), y), which, scale=0.25)
    kept, total = sfron_ops.unwrap_optimizer(opt).compute_mask(gamma=10.0)
    print(f"mask keeps {kept} of {total} weights")

    f_stream, r_stream = batches(forget, 32), batches(retain, 64)
    for i in range(args.iters):
        for g in sfron_ops.unwrap_optimizer(opt).param_groups:
            g["forget_alpha"] = 10.0 * (1 + math.cos(math.pi * i / args.iters)) / 2
        if i % 2 == 0:
            x, y = (t.to(device) for t in next(f_stream))
            with sfron_ops.phase(opt, "forget"):  # the next opt.step() of the wrapper is a forget step
                accelerator.backward(sfron_ops.adaptive_cross_entropy(model(x), y))
                opt.step()
            opt.zero_grad()
        x, y = (t.to(device) for t in next(r_stream))
        accelerator.backward(F.cross_entropy(model(x), y))
        opt.step()
        opt.zero_grad()
    report("after", accelerator.unwrap_model(model).cpu(), forget, retain)


if __name__ == "__main__":
    main()
