"""SFRon against a literal re-implementation of the official SFR-on training loop.

The official loop (Classification/unlearn/sfron.py of the paper's code) scales the adaptive forget
loss by -alpha_i, multiplies each p.grad by its mask in place, clips with clip_grad_norm_, and steps
one torch.optim optimizer that the remain steps share; alpha follows a cosine, the learning rate
CosineAnnealingLR, and the forget step comes every forget_freq-th iteration.
"""

import math

import pytest
import torch
from models import batches, random_masks, small_cnn
from torch.nn import functional as F

from sfron_ops import SFRon, adaptive_cross_entropy

N_ITERS, FORGET_FREQ, FORGET_ALPHA, MAX_NORM = 30, 5, 5.0, 2.0
BASES = {
    "sgd": (dict(lr=0.01, momentum=0.9, weight_decay=5e-4),
            lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=False)),
    "adamw": (dict(lr=2e-3, weight_decay=0.05),
              lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05, foreach=False)),
}

#: the largest parameter difference seen per (base, impl); printed with `pytest -s`
LARGEST_DIFF = {}


def alpha_at(i):
    return FORGET_ALPHA * (1 + math.cos(math.pi * i / N_ITERS)) / 2


def run(base, forget, remain, masks, impl=None):
    """``impl=None``: the official loop (one torch.optim optimizer; -alpha_i, the masks and the clipping
    applied by hand); otherwise SFRon with that backend. The iterations around the forget step are the same."""
    model = small_cnn()
    if impl is None:
        opt = BASES[base][1](model.parameters())
    else:
        opt = SFRon(model.named_parameters(), mask=masks, base=base, forget_alpha=FORGET_ALPHA,
                    max_grad_norm=MAX_NORM, impl=impl, **BASES[base][0])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=N_ITERS)
    for i in range(N_ITERS):
        if i % FORGET_FREQ == 0:
            x, y = forget[i // FORGET_FREQ]
            opt.zero_grad()
            loss = adaptive_cross_entropy(model(x), y, 0.5, loss_floor=None)  # official weights
            if impl is None:
                (-alpha_at(i) * loss).backward()
                for name, p in model.named_parameters():
                    p.grad *= masks[name]
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_NORM)
                opt.step()
            else:
                for group in opt.param_groups:
                    group["forget_alpha"] = alpha_at(i)
                loss.backward()
                opt.step(phase="forget")
        x, y = remain[i]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return model, opt


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_matches_official_loop(base, impl_any):
    forget, remain = batches(N_ITERS // FORGET_FREQ, seed=11), batches(N_ITERS, seed=12)
    masks = random_masks(small_cnn())
    ref_model, ref_opt = run(base, forget, remain, masks)
    model, opt = run(base, forget, remain, masks, impl_any)
    largest = 0.0
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        largest = max(largest, (p - q).abs().max().item())
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")
        ours, theirs = opt.state[p], ref_opt.state[q]
        if base == "sgd":
            torch.testing.assert_close(ours["momentum_buffer"], theirs["momentum_buffer"])
            assert ours["step"].item() == N_ITERS + N_ITERS // FORGET_FREQ
        else:
            torch.testing.assert_close(ours["exp_avg"], theirs["exp_avg"])
            torch.testing.assert_close(ours["exp_avg_sq"], theirs["exp_avg_sq"])
            assert ours["step"].item() == theirs["step"].item()
    for b_ours, b_ref in zip(model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(b_ours, b_ref)
    LARGEST_DIFF[(base, impl_any)] = largest
    print(f"\nlargest parameter difference vs the official loop ({base}, {impl_any}): {largest:.3e}")
    # the run moved far from the start: the comparison is not trivially between two untouched models
    start = small_cnn()
    assert max((p - s).abs().max().item() for p, s in zip(model.parameters(), start.parameters())) > 1e-2
