"""SFR-on with DDP or FSDP2 (fully_shard) on torch.distributed, with a torch.distributed.checkpoint.

    torchrun --standalone --nproc_per_node=2 examples/distributed.py --mode fsdp2   # or --mode ddp

Every rank takes its slice of each global batch. The gradients are averaged over the ranks (DDP
all-reduces them, FSDP2 reduce-scatters them into each rank's shard), the adaptive forget loss
normalises its weights over the global batch (sfron_ops.adaptive_cross_entropy does so by itself), and
SFRon sums the forget step's norm over the shards, so every rank computes what one process would on
the global batch. Under FSDP2 the masks, Fisher, momentum and slow weights are DTensors sharded like
their parameters. Runs on CPU with gloo, or on GPUs with nccl.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.nn import functional as F
from toy import accuracy, batches, mlp, pretrained, toy_task

import sfron_ops
from sfron_ops import distributed as sdist


def wrap(model, mode, mesh):
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def build(mode, mesh, forget, retain):
    model = wrap(pretrained(forget, retain), mode, mesh)  # same seed on every rank: the same start
    opt = sfron_ops.SFRon(model.named_parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4, forget_alpha=10.0,
                          max_grad_norm=5.0, slow_alpha=0.8, sync_period=2)
    return model, opt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp2"), default="fsdp2")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--checkpoint", default=None, help="directory for the DCP checkpoint (default: a temp dir)")
    args = parser.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (world,))
    forget, retain = toy_task()
    model, opt = build(args.mode, mesh, forget, retain)

    def local(batch):  # this rank's slice of a global batch
        x, y = batch
        n = len(y) // world
        return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]

    # Fisher on synchronised gradients: identical (DDP) or sharded (FSDP2) on every rank, so every rank
    # builds the same mask
    for which, data in (("forget", forget), ("remain", retain)):
        stream = batches(data, 32, seed=7)
        for _ in range(4):
            x, y = local(next(stream))
            F.cross_entropy(model(x), y).backward()
            opt.accumulate_fisher(which, scale=0.25)
            opt.zero_grad()
    kept, total = opt.compute_mask(gamma=10.0)

    f_stream, r_stream = batches(forget, 32), batches(retain, 64)
    for i in range(args.iters):
        for g in opt.param_groups:
            g["forget_alpha"] = 10.0 * (1 + math.cos(math.pi * i / args.iters)) / 2
        if i % 2 == 0:
            x, y = local(next(f_stream))
            sfron_ops.adaptive_cross_entropy(model(x), y).backward()  # weights normalised over the global batch
            opt.step(phase="forget")
            opt.zero_grad()
        x, y = local(next(r_stream))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    # checkpoint, then resume into a fresh model and optimizer
    path = args.checkpoint or tempfile.mkdtemp(prefix="sfron_dcp_") if rank == 0 else None
    shared = [path]
    dist.broadcast_object_list(shared, src=0)
    path = shared[0]
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    model2, opt2 = build(args.mode, mesh, forget, retain)
    sdist.prepare_checkpoint_load(model2, opt2, path)  # a fresh optimizer has no masks yet: allocate them
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])

    # every rank takes part in gathering the full parameters; rank 0 evaluates a plain copy
    def full_state(m):
        return {sfron_ops.canonical_name(n): (p.full_tensor() if sdist.is_dtensor(p) else p.detach()).cpu()
                for n, p in m.named_parameters()}

    before, after = full_state(model), full_state(model2)
    if rank == 0:
        same = all(torch.equal(before[n], after[n]) for n in before)
        plain = mlp(forget[0].shape[1], int(retain[1].max()) + 1)
        plain.load_state_dict(before)
        kinds = sorted({type(s["mask"]).__name__ for s in opt.state.values() if "mask" in s})
        print(f"{args.mode} on {world} ranks ({backend}): mask keeps {kept} of {total} weights, held as {kinds}")
        print(f"   after: forget accuracy {accuracy(plain, forget):.3f}  retain accuracy {accuracy(plain, retain):.3f}")
        print(f"checkpoint {path} reloaded into a fresh model and optimizer: parameters equal = {same}")
    dist.barrier()
    if rank == 0 and args.checkpoint is None:
        shutil.rmtree(path, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
