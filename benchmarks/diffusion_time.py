"""Wall time of class forgetting in a CIFAR-10-size class-conditional DDPM: SFR-on against SalUn (and SA).

The paper's claim for its DDPM half is speed: SFR-on forgets a CIFAR-10 class in 50 iterations where
SalUn runs 1,000 and Selective Amnesia 20,000. This measures what those counts cost on one device,
with the package's own runs (``sfron_ops.unlearn.runner.run``) of the same settings as the
``digits-ddpm-class`` scenario at the published learning rates, on the layout of the DDPM CIFAR-10
denoiser: a ``diffusers.UNet2DModel`` of 35.75 M parameters (channels 128/256/256/256, two blocks per
level, attention at 16x16, class embeddings with a "no class" one), 32x32x3 images, batch 128, a
forget set of 5,000 images and a remain set of 45,000 (CIFAR-10's class sizes).

The images are random: what is timed is the work (the saliency passes, the forward and backward
passes, the optimizer, the sampling SA does), not what is learnt, which does not depend on it.
Each method runs twice with two iteration counts; the difference gives the time per iteration, the
rest is the one-off preparation (Fisher or gradient mask, SA's replay and Fisher), and the paper's
count is priced as preparation + count x per-iteration. Where a run was at the paper's count, its
measured time is reported as well.

Run: ``python -m benchmarks.diffusion_time [--device cuda] [--methods SFR-on,SalUn,SA] [--iterations
SFR-on=10,50 ...] [--out DIR] [--smoke]``. ``--out`` writes ``DIR/<device>-diffusion-time.{json,md}``
with the environment (device, versions, commit). ``--smoke`` runs a tiny UNet on 8x8 images in
seconds, to check the flow on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sfron_ops.diffusion import DiffusersDenoiser, EpsLoss
from sfron_ops.unlearn.data import TensorLoader
from sfron_ops.unlearn.presets import DIGITS_DDPM
from sfron_ops.unlearn.runner import run

from .measure import environment

#: the iteration counts the paper gives (SFR-on, SalUn, Selective Amnesia)
PAPER_ITERATIONS = {"SFR-on": 50, "SalUn": 1000, "SA": 20000}
#: the two counts each method runs at by default: the larger is the paper's where that fits a device call
ITERATIONS = {"SFR-on": (10, 50), "SalUn": (100, 1000), "SA": (20, 100)}
#: the digits scenario's settings at the published learning rates (SFR-on: the authors' DDPM preset)
SPECS = {"SFR-on": DIGITS_DDPM["SFR-on (paper)"], "SalUn": dict(DIGITS_DDPM["SalUn"], lr=1e-4),
         "SA": dict(DIGITS_DDPM["SA"], lr=1e-4)}
CIFAR = dict(image_shape=(3, 32, 32), channels=(128, 256, 256, 256), attention=1, forget=5000, remain=45000,
             batch=128)
SMOKE = dict(image_shape=(1, 8, 8), channels=(16, 32), attention=1, forget=16, remain=48, batch=8)


def denoiser(image_shape, channels, attention: int, num_classes: int = 10) -> DiffusersDenoiser:
    """A class-conditional ``UNet2DModel`` in the DDPM layout, with self-attention at level ``attention``."""
    from diffusers import UNet2DModel

    c, h, _ = image_shape
    down = tuple("AttnDownBlock2D" if i == attention else "DownBlock2D" for i in range(len(channels)))
    up = tuple("AttnUpBlock2D" if i == len(channels) - 1 - attention else "UpBlock2D" for i in range(len(channels)))
    net = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=tuple(channels),
                      layers_per_block=2, down_block_types=down, up_block_types=up, num_class_embeds=num_classes + 1,
                      dropout=0.1, norm_num_groups=min(32, channels[0]))
    return DiffusersDenoiser(net, num_classes)


def data(config: dict, device, seed: int = 0) -> tuple:
    """Random images in [-1, 1] on ``device``: ``(xf, yf, xr, yr)``, class 0 to forget, classes 1-9 to keep."""
    g = torch.Generator().manual_seed(seed)
    shape = config["image_shape"]
    xf = (torch.rand(config["forget"], *shape, generator=g) * 2 - 1).to(device)
    xr = (torch.rand(config["remain"], *shape, generator=g) * 2 - 1).to(device)
    yf = torch.zeros(config["forget"], dtype=torch.long, device=device)
    yr = (torch.arange(config["remain"]) % 9 + 1).to(device)
    return xf, yf, xr, yr


def loaders(tensors: tuple, batch: int, seed: int = 0) -> tuple[TensorLoader, TensorLoader]:
    """Fresh forget and remain loaders over ``data``'s tensors: every run sees the same batches."""
    xf, yf, xr, yr = tensors
    return (TensorLoader(xf, yf, batch, shuffle=True, seed=seed, drop_last=True),
            TensorLoader(xr, yr, batch, shuffle=True, seed=seed + 1, drop_last=True))


def time_run(label: str, iterations: int, config: dict, tensors: tuple, device) -> float:
    """Seconds of one run (preparation and loop, as the runner times them), on a fresh model."""
    torch.manual_seed(0)
    model = denoiser(config["image_shape"], config["channels"], config["attention"]).to(device)
    forget, remain = loaders(tensors, config["batch"])
    spec = dict(SPECS[label], iterations=iterations)
    name = spec.pop("method")
    result = run(name, model, forget, remain, loss_fn=EpsLoss(10), device=device, seed=0, progress=False,
                 forget_monitor=False, **spec)
    return result.seconds


def warm_up(config: dict, tensors: tuple, device) -> None:
    """One untimed forward and backward pass, so that the first timed run does not pay for the device's
    start (context, libraries' handles, kernel choice)."""
    model = denoiser(config["image_shape"], config["channels"], config["attention"]).to(device)
    x, y = next(iter(loaders(tensors, config["batch"])[0]))
    EpsLoss(10)(model, x, y).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device, methods, iterations: dict, config: dict, echo=print) -> dict:
    tensors = data(config, device)
    warm_up(config, tensors, device)
    rows = {}
    for label in methods:
        low, high = iterations[label]
        seconds = {}
        for n in (low, high):
            start = time.perf_counter()
            seconds[n] = time_run(label, n, config, tensors, device)
            echo(f"{label}: {n} iterations in {seconds[n]:.2f} s (run {time.perf_counter() - start:.1f} s in all)")
        per_iteration = (seconds[high] - seconds[low]) / (high - low)
        paper = PAPER_ITERATIONS[label]
        row = dict(seconds=seconds, per_iteration_s=None, preparation_s=None, paper_iterations=paper, paper_s=None,
                   measured_paper_s=seconds.get(paper))
        if per_iteration > 0:  # otherwise the two runs differ by less than their noise: nothing to price
            preparation = seconds[low] - low * per_iteration
            row.update(per_iteration_s=per_iteration, preparation_s=preparation,
                       paper_s=preparation + paper * per_iteration)
        rows[label] = row
    return rows


def table(rows: dict) -> str:
    lines = ["| method | iterations (paper) | preparation | per iteration | time at the paper's count "
             "| measured there |", "|---|---:|---:|---:|---:|---:|"]

    def s(value, scale=1.0, unit="s"):
        return "n/a" if value is None else f"{value * scale:.1f} {unit}"

    for label, r in rows.items():
        measured = "" if r["measured_paper_s"] is None else s(r["measured_paper_s"])
        lines.append(f"| {label} | {r['paper_iterations']:,} | {s(r['preparation_s'])} | "
                     f"{s(r['per_iteration_s'], 1e3, 'ms')} | {s(r['paper_s'])} | {measured} |")
    ours = rows.get("SFR-on", {}).get("paper_s")
    for label, r in rows.items():
        if label != "SFR-on" and ours and r["paper_s"]:
            lines.append(f"\n{label} at its count takes {r['paper_s'] / ours:.1f}x the time of SFR-on at its count.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.diffusion_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="SFR-on,SalUn", help="comma-separated, from " + ", ".join(SPECS))
    p.add_argument("--iterations", nargs="*", default=[], metavar="METHOD=LOW,HIGH",
                   help="the two iteration counts of a method (default: " +
                        "; ".join(f"{k}={a},{b}" for k, (a, b) in ITERATIONS.items()) + ")")
    p.add_argument("--smoke", action="store_true", help="a tiny UNet on 8x8 images, 1 and 2 iterations")
    p.add_argument("--out", help="write <device>-diffusion-time.json and .md here")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SPECS]
    if unknown:
        p.error(f"unknown methods {unknown}; expected some of {list(SPECS)}")
    iterations = {m: (1, 2) for m in SPECS} if args.smoke else dict(ITERATIONS)
    for item in args.iterations:
        label, _, counts = item.partition("=")
        low, high = (int(x) for x in counts.split(","))
        if label not in SPECS or not 1 <= low < high:
            p.error(f"--iterations {item!r}: expected METHOD=LOW,HIGH with 1 <= LOW < HIGH")
        iterations[label] = (low, high)
    config = SMOKE if args.smoke else CIFAR
    device = torch.device(args.device)
    env = environment(args.device)
    rows = measure(device, methods, iterations, config)
    text = table(rows)
    print(text)
    if args.out:
        stem = os.path.join(args.out, f"{device.type}-diffusion-time{'-smoke' if args.smoke else ''}")
        with open(stem + ".json", "w") as f:
            json.dump({"environment": env, "config": config, "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(f"# Class forgetting in a class-conditional DDPM: wall time on {env['device_name']} "
                    f"({env['device']})"
                    f"\n\nMeasured {env['date_utc']} at commit `{(env['commit'] or 'unknown')[:10]}`"
                    f"{' with uncommitted changes' if env['commit_dirty'] else ''}; torch {env['torch']}, Python "
                    f"{env['python']}; TF32 in matmuls {torch.backends.cuda.matmul.allow_tf32}, in convolutions "
                    f"{torch.backends.cudnn.allow_tf32}. UNet {config['channels']} on {config['image_shape']} "
                    f"images, batch {config['batch']}, forget set {config['forget']:,}, remain set "
                    f"{config['remain']:,} (`python -m benchmarks.diffusion_time`).\n\n{text}\n")
    return rows


if __name__ == "__main__":
    main()
