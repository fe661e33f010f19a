"""SFR-on under DDP and FSDP2 on two gloo ranks (CPU) against one process stepping on the global batches.

One ``torchrun --nproc_per_node=2`` launch of this file (see ``worker``) runs every scenario and
saves what each rank holds; the tests compare it with the same run in this process, where the two
ranks' halves of each batch form one batch. A scenario is a dozen SFR-on iterations: a Fisher
pass, a ratio mask, a forget step every other iteration (adaptive loss, masked, cosine-decayed α,
clipped), a remain step every iteration (clipped), slow weights that sync every third remain step,
a cosine learning rate, SGD with momentum or AdamW. Each rank's copy is then checked against the
single process, the ranks against each other, and a run resumed from a ``torch.distributed.checkpoint``
taken halfway against the uninterrupted run. The README's stand-alone helpers (``fisher_diagonal``,
``saliency_mask``, ``AdaptiveLoss``) run unchanged on DDP and FSDP2 models and are checked the same way.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sfron_ops
from sfron_ops import distributed as sdist
from sfron_ops.packing import mask_bytes

WORLD = 2
ITERS = 12
RESUME_AT = 6
BATCH = 8  # global batch; each rank takes BATCH // WORLD rows
FORGET_ALPHA = 4.0
CONFIGS = {
    "sgd": dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adamw": dict(base="adamw", lr=0.01, weight_decay=0.05),
}
COMMON = dict(forget_alpha=FORGET_ALPHA, max_grad_norm=0.5, remain_max_grad_norm=1.0, slow_alpha=0.5,
              sync_period=3, impl="foreach")
SCENARIOS = [(mode, base) for mode in ("ddp", "fsdp2") for base in CONFIGS] + [("fsdp2_packed", "adamw")]


# --------------------------------------------------------------------------- the run, shared by both sides
def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 10 and 5 output rows: FSDP2 shards the second layer unevenly (3 + 2 rows); tanh keeps rounding
    # differences from flipping branches
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5))


def make_data():
    g = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(BATCH, 6, generator=g), torch.randint(0, 5, (BATCH,), generator=g)

    return {"forget": [batch() for _ in range(ITERS)], "remain": [batch() for _ in range(ITERS)],
            "fisher_forget": [batch() for _ in range(2)], "fisher_remain": [batch() for _ in range(2)]}


def rows(batch, part):
    x, y = batch
    return (x, y) if part is None else (x[part], y[part])


def make_optimizer(model, base, mask_format="dense"):
    opt = sfron_ops.SFRon(model.named_parameters(), **CONFIGS[base], **COMMON, mask_format=mask_format)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=ITERS)
    return opt, sched


def fisher_pass(model, opt, data, part):
    """Fisher on synchronised (global-batch) gradients; masks by density first (kept for the test), then ratio."""
    for which in ("forget", "remain"):
        batches = data[f"fisher_{which}"]
        for b in batches:
            x, y = rows(b, part)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.accumulate_fisher(which, scale=1.0 / len(batches))
            opt.zero_grad()
    density = opt.compute_mask(density=0.3)
    density_masks = [m.clone() for m in opt.masks()]
    ratio = opt.compute_mask(gamma=1.0)
    return density, density_masks, ratio


def train(model, opt, sched, data, part, start, stop):
    norms = []
    for i in range(start, stop):
        if i % 2 == 0:
            for g in opt.param_groups:
                g["forget_alpha"] = FORGET_ALPHA * (1 + math.cos(math.pi * i / ITERS)) / 2
            x, y = rows(data["forget"][i], part)
            sfron_ops.adaptive_cross_entropy(model(x), y).backward()  # normalised over the global batch
            norms.append(forget_norm(opt))
            opt.step(phase="forget")
            opt.zero_grad()
        x, y = rows(data["remain"][i], part)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return norms


def forget_norm(opt):
    """‖α m g‖ over every parameter, as the optimizer clips it (single process only)."""
    total = 0.0
    for g in opt.param_groups:
        for p in g["params"]:
            m = opt.state[p].get("mask")
            u = g["forget_alpha"] * p.grad * (1 if m is None else m)
            total += float((u * u).sum())
    return math.sqrt(total)


def readme_run(model, data, part):
    """The README's usage, unchanged, on ``model`` (plain, DDP or FSDP2): ``fisher_diagonal`` on the forget
    and remain batches, ``saliency_mask`` by ratio and by density, ``SFRon(mask=...)``, then forget steps on
    ``AdaptiveLoss`` and remain steps on cross-entropy."""
    ce = nn.functional.cross_entropy
    fishers = [sfron_ops.fisher_diagonal(model, [rows(b, part) for b in data[f"fisher_{which}"]], ce)
               for which in ("forget", "remain")]
    ratio = sfron_ops.saliency_mask(*fishers, gamma=1.0)
    density = sfron_ops.saliency_mask(*fishers, density=0.3)
    opt = sfron_ops.SFRon(model.named_parameters(), mask=ratio.masks, lr=0.05, momentum=0.9,
                          forget_alpha=FORGET_ALPHA, max_grad_norm=0.5, impl="foreach")
    forget_loss = sfron_ops.AdaptiveLoss(lambd=0.5)
    for i in range(4):
        x, y = rows(data["forget"][i], part)
        forget_loss(model(x), y).backward()
        opt.step(phase="forget")
        opt.zero_grad()
        x, y = rows(data["remain"][i], part)
        ce(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    def by_name(tensors):
        return {sfron_ops.canonical_name(n): _full(t) for n, t in tensors.items()}

    return dict(fishers=[by_name(f) for f in fishers], ratio=(ratio.kept, ratio.total), masks=by_name(ratio.masks),
                density=(density.kept, density.total), density_masks=by_name(density.masks),
                placed=[sdist.is_dtensor(m) for m in ratio.masks.values()],
                params=[_full(p) for p in model.parameters()])


# --------------------------------------------------------------------------- single process
def single_process(base):
    data = make_data()
    model = make_model()
    opt, sched = make_optimizer(model, base)
    density, density_masks, ratio = fisher_pass(model, opt, data, None)
    norms = train(model, opt, sched, data, None, 0, ITERS)
    return dict(params=[p.detach().clone() for p in model.parameters()], masks=opt.masks(),
                slow=[s.clone() for s in opt.slow_weights()], density=density, density_masks=density_masks,
                ratio=ratio, norms=norms, skipped=opt.skipped_steps)


# --------------------------------------------------------------------------- the ranks
def _full(t):
    return t.full_tensor().detach() if sdist.is_dtensor(t) else t.detach().clone()


def _wrap(mode, model, mesh):
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _rank_run(mode, base, data, part, mesh, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    fmt = "packed" if mode.endswith("_packed") else "dense"
    model = _wrap(mode, make_model(), mesh)
    opt, sched = make_optimizer(model, base, fmt)
    density, density_masks, ratio = fisher_pass(model, opt, data, part)
    out = dict(density=density, density_masks=[_full(m) for m in density_masks], ratio=ratio)
    out["local_types"] = sorted({type(opt.state[p][k]).__name__ for p in opt.state for k in opt.state[p]
                                 if k in ("mask", "packed_mask", "fisher_forget", "momentum_buffer", "exp_avg",
                                          "slow_param")})
    out["mask_bytes"] = mask_bytes(opt.state[p].get("packed_mask", opt.state[p].get("mask")) for p in opt.state)
    train(model, opt, sched, data, part, 0, RESUME_AT)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "sched": sched.state_dict()}, checkpoint_id=ckpt_dir)
    train(model, opt, sched, data, part, RESUME_AT, ITERS)
    out.update(params=[_full(p) for p in model.parameters()], masks=[_full(m) for m in opt.masks()],
               slow=[_full(s) for s in opt.slow_weights()], skipped=opt.skipped_steps,
               local_params=[(p.to_local() if sdist.is_dtensor(p) else p).detach().clone()
                             for p in model.parameters()])

    # resume from the checkpoint in a fresh model and optimizer
    model2 = _wrap(mode, make_model(), mesh)
    opt2, sched2 = make_optimizer(model2, base, fmt)
    out["allocated"] = sdist.prepare_checkpoint_load(model2, opt2, ckpt_dir)
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2),
             "sched": sched2.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    sched2.load_state_dict(state["sched"])
    train(model2, opt2, sched2, data, part, RESUME_AT, ITERS)
    out["resumed"] = [_full(p) for p in model2.parameters()]
    out["resumed_slow"] = [_full(s) for s in opt2.slow_weights()]

    # a full mask given to set_masks is cut like its parameter
    named = dict(model.named_parameters())
    name = next(n for n in named if n.endswith("2.weight"))
    full_mask = torch.arange(named[name].numel()).reshape(named[name].shape) % 3 == 0
    opt.set_masks({name: full_mask})
    stored = opt.masks()[list(named).index(name)]
    out["set_mask_local"] = (stored.to_local() if sdist.is_dtensor(stored) else stored).clone()
    out["set_mask_full"] = _full(stored)

    # one more remain step (the slow weights sync every third; the cosine lr has reached 0), then evaluate
    # with the slow weights
    for g in opt.param_groups:
        g["lr"] = 0.01
    x, y = rows(data["remain"][0], part)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    out["fast"], out["slow_now"] = [_full(p) for p in model.parameters()], [_full(s) for s in opt.slow_weights()]
    with opt.use_slow_weights():  # swapped in, shard by shard under FSDP2
        out["evaluated"] = [_full(p) for p in model.parameters()]
    out["after_evaluation"] = [_full(p) for p in model.parameters()]
    return out


def _fisher_no_sync(data, part):
    """DDP Fisher on per-rank gradients under no_sync, then averaged over the ranks."""
    model = nn.parallel.DistributedDataParallel(make_model())
    opt, _ = make_optimizer(model, "sgd")
    for which in ("forget", "remain"):
        with model.no_sync():
            for b in data[f"fisher_{which}"]:
                x, y = rows(b, part)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.accumulate_fisher(which, scale=0.5)
                opt.zero_grad()
    reduced = sdist.all_reduce_fisher(opt)
    return dict(reduced=reduced, forget=[f.clone() for f in opt.fisher("forget")],
                remain=[f.clone() for f in opt.fisher("remain")])


TIE_DENSITIES = (0.3, 0.5, 0.8, 0.9)


def tie_fishers():
    """Fisher diagonals for make_model()'s parameters and one extra plain tensor, where about 60 % of the
    elements have zero forget and remain Fisher, so that their ratios tie exactly at 1."""
    g = torch.Generator().manual_seed(2)
    shapes = [tuple(p.shape) for p in make_model().parameters()] + [(7,)]
    forget, remain = [], []
    for shape in shapes:
        zero = torch.rand(shape, generator=g) < 0.6
        forget.append(torch.rand(shape, generator=g).masked_fill(zero, 0.0))
        remain.append(torch.rand(shape, generator=g).masked_fill(zero, 0.0))
    return forget, remain


def _density_ties(mesh):
    """saliency_mask by density on Fisher diagonals placed like FSDP2 parameters (uneven shards) plus one plain
    tensor."""
    from torch.distributed.tensor import distribute_tensor

    model = _wrap("fsdp2", make_model(), mesh)
    forget, remain = tie_fishers()
    params = list(model.parameters()) + [torch.zeros(7)]

    def place(full, p):
        return distribute_tensor(full, p.device_mesh, p.placements) if sdist.is_dtensor(p) else full

    forget = [place(f, p) for f, p in zip(forget, params)]
    remain = [place(r, p) for r, p in zip(remain, params)]
    out = {}
    for density in TIE_DENSITIES:
        res = sfron_ops.saliency_mask(forget, remain, density=density, dtype=torch.uint8)
        out[density] = dict(kept=res.kept, total=res.total, masks=[_full(m) for m in res.masks],
                            placed=[sdist.is_dtensor(m) for m in res.masks])
    return out


def worker(out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    data = make_data()
    results = {}
    for mode, base in SCENARIOS:
        ckpt = os.path.join(out_dir, f"ckpt_{mode}_{base}")
        results[(mode, base)] = _rank_run(mode, base, data, part, mesh, ckpt)
    for mode in ("ddp", "fsdp2"):
        try:
            results[("readme", mode)] = readme_run(_wrap(mode, make_model(), mesh), data, part)
        except Exception as e:  # both ranks fail alike; the tests show what broke
            results[("readme", mode)] = dict(error=f"{type(e).__name__}: {e}")
    results["fisher_no_sync"] = _fisher_no_sync(data, part)
    results["density_ties"] = _density_ties(mesh)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
    cmd += ["--standalone", f"--nproc_per_node={WORLD}", __file__, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return {base: single_process(base) for base in CONFIGS}


@pytest.fixture(scope="module")
def readme_single():
    return readme_run(make_model(), make_data(), None)


def _close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or dict(rtol=1e-5, atol=1e-6)))


@pytest.mark.slow
@pytest.mark.parametrize("mode,base", SCENARIOS)
def test_matches_single_process(ranks, single, mode, base):
    ref = single[base]
    # the run is only a test of the global norm if clipping was active on some forget steps
    assert any(n > COMMON["max_grad_norm"] for n in ref["norms"])
    for rank in range(WORLD):
        got = ranks[rank][(mode, base)]
        assert got["ratio"] == ref["ratio"] and got["density"] == ref["density"]
        for a, e in zip(got["masks"], ref["masks"]):
            assert torch.equal(a, e)
        for a, e in zip(got["density_masks"], ref["density_masks"]):
            assert torch.equal(a, e)
        _close(got["params"], ref["params"])
        _close(got["slow"], ref["slow"])
        assert got["skipped"] == ref["skipped"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode,base", SCENARIOS)
def test_slow_weights_swap_in_and_back(ranks, mode, base):
    got = ranks[0][(mode, base)]
    assert any(not torch.equal(a, b) for a, b in zip(got["slow_now"], got["fast"]))
    for a, b in zip(got["evaluated"], got["slow_now"]):
        assert torch.equal(a, b)
    for a, b in zip(got["after_evaluation"], got["fast"]):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("mode,base", SCENARIOS)
def test_ranks_hold_the_same_parameters(ranks, mode, base):
    first, second = ranks[0][(mode, base)], ranks[1][(mode, base)]
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)
    if mode != "ddp":
        # each rank holds its own shard: rows [0, 3) and [3, 5) of the 5-row layer
        shapes = [[tuple(t.shape) for t in r[(mode, base)]["local_params"]] for r in ranks]
        assert shapes[0] == [(5, 6), (5,), (3, 10), (3,)] and shapes[1] == [(5, 6), (5,), (2, 10), (2,)]


@pytest.mark.slow
@pytest.mark.parametrize("mode,base", SCENARIOS)
def test_state_is_placed_like_the_parameters(ranks, mode, base):
    kinds = ranks[0][(mode, base)]["local_types"]
    assert kinds == (["Tensor"] if mode == "ddp" else ["DTensor"])


@pytest.mark.slow
@pytest.mark.parametrize("mode,base", SCENARIOS)
def test_checkpoint_resume_is_bitwise(ranks, mode, base):
    for rank in range(WORLD):
        got = ranks[rank][(mode, base)]
        assert got["allocated"] == 4 * 3  # a mask and two Fisher diagonals per parameter
        for a, b in zip(got["resumed"], got["params"]):
            assert torch.equal(a, b)
        for a, b in zip(got["resumed_slow"], got["slow"]):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_packed_masks_are_sharded_bits(ranks):
    # local elements: layer 0 weight 5x6 and bias 5 on each rank; layer 2 weight 3x10 / 2x10 and bias 3 / 2.
    # Packed, each is padded to its largest shard: ceil(30/8) + ceil(5/8) + ceil(30/8) + ceil(3/8) = 10 bytes
    for rank, dense_bytes in zip(range(WORLD), (30 + 5 + 30 + 3, 30 + 5 + 20 + 2)):
        assert ranks[rank][("fsdp2", "adamw")]["mask_bytes"] == dense_bytes
        assert ranks[rank][("fsdp2_packed", "adamw")]["mask_bytes"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_set_masks_cuts_a_full_mask_like_its_parameter(ranks, mode):
    full = torch.arange(50).reshape(5, 10) % 3 == 0
    for rank in range(WORLD):
        got = ranks[rank][(mode, "sgd")]
        assert torch.equal(got["set_mask_full"], full)
        expected_local = full if mode == "ddp" else full[[slice(0, 3), slice(3, 5)][rank]]
        assert torch.equal(got["set_mask_local"], expected_local)


@pytest.mark.slow
def test_all_reduce_fisher_averages_per_rank_fishers(ranks):
    data = make_data()
    per_rank = []
    for r in range(WORLD):
        model = make_model()
        opt, _ = make_optimizer(model, "sgd")
        part = slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD)
        for which in ("forget", "remain"):
            for b in data[f"fisher_{which}"]:
                x, y = rows(b, part)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.accumulate_fisher(which, scale=0.5)
                opt.zero_grad()
        per_rank.append({w: opt.fisher(w) for w in ("forget", "remain")})
    for rank in range(WORLD):
        got = ranks[rank]["fisher_no_sync"]
        assert got["reduced"] == 8
        for which in ("forget", "remain"):
            expected = [(a + b) / 2 for a, b in zip(per_rank[0][which], per_rank[1][which])]
            _close(got[which], expected)
    for which in ("forget", "remain"):
        for a, b in zip(ranks[0]["fisher_no_sync"][which], ranks[1]["fisher_no_sync"][which]):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_density_masks_with_ties_match_one_process(ranks):
    """Under FSDP2 the density rule keeps exactly ceil(density * N) elements, with the ties at the cut-off
    broken by global flat index, so every rank's shards put together are the one-process masks."""
    forget, remain = tie_fishers()
    ratios = torch.cat([((f + 1e-15) / (r + 1e-15)).flatten() for f, r in zip(forget, remain)])
    assert (ratios == 1.0).float().mean() > 0.5
    for density in TIE_DENSITIES:
        ref = sfron_ops.saliency_mask(forget, remain, density=density, dtype=torch.uint8)
        assert ref.kept == math.ceil(density * ratios.numel() - 1e-9)
        for rank in range(WORLD):
            got = ranks[rank]["density_ties"][density]
            assert (got["kept"], got["total"]) == (ref.kept, ref.total)
            assert got["placed"] == [True] * 4 + [False]
            for a, e in zip(got["masks"], ref.masks):
                assert torch.equal(a, e)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_readme_fisher_diagonal_and_saliency_mask_match_one_process(ranks, readme_single, mode):
    """fisher_diagonal of a DDP or FSDP2 model is the global batches' Fisher (DTensors under FSDP2), and
    saliency_mask takes it as it comes: the masks, by ratio and by density, are one process's."""
    ref = readme_single
    for rank in range(WORLD):
        got = ranks[rank][("readme", mode)]
        assert "error" not in got, got.get("error")
        for fishers, expected in zip(got["fishers"], ref["fishers"]):
            assert fishers.keys() == expected.keys()
            _close(list(fishers.values()), list(expected.values()))
        assert got["placed"] == [mode == "fsdp2"] * 4
        for key in ("ratio", "density"):
            assert got[key] == ref[key] and 0 < ref[key][0] < ref[key][1]
        for key in ("masks", "density_masks"):
            assert got[key].keys() == ref[key].keys()
            for name, m in ref[key].items():
                assert torch.equal(got[key][name], m), (key, name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_readme_adaptive_loss_matches_one_process(ranks, readme_single, mode):
    """AdaptiveLoss normalises its weights over the global batch, so the forget steps of every rank are the
    single process's on the global batches."""
    for rank in range(WORLD):
        got = ranks[rank][("readme", mode)]
        assert "error" not in got, got.get("error")
        _close(got["params"], readme_single["params"])


def test_single_process_helpers_need_no_process_group():
    losses = torch.rand(7) + 0.1
    torch.testing.assert_close(sdist.adaptive_weights(losses, 0.5), sfron_ops.adaptive_weights(losses, 0.5))
    fitted = torch.tensor([0.0, 1e-6, 0.5, 2.0])  # the same floor, by default and when given
    for floor in (1e-4, 0.1):
        torch.testing.assert_close(sdist.adaptive_weights(fitted, 0.5, floor),
                                   sfron_ops.adaptive_weights(fitted, 0.5, floor))
    torch.testing.assert_close(sdist.adaptive_weights(fitted), sfron_ops.adaptive_weights(fitted))
    logits, target = torch.randn(4, 3), torch.randint(0, 3, (4,))
    torch.testing.assert_close(sdist.AdaptiveLoss(loss_floor=0.1)(logits, target),
                               sfron_ops.AdaptiveLoss(loss_floor=0.1)(logits, target))
    torch.testing.assert_close(sdist.adaptive_cross_entropy(logits, target),
                               sfron_ops.adaptive_cross_entropy(logits, target))
    with pytest.raises(ValueError, match="Invalid loss_floor"):
        sdist.AdaptiveLoss(loss_floor=-1.0)
    assert sdist.norm_reduce_group([[torch.zeros(3)]]) is None
    assert not sdist.is_dtensor(torch.zeros(3)) and not sdist.is_sharded(torch.zeros(3))
    with pytest.raises(ValueError, match="expected one loss per sample"):
        sdist.AdaptiveLoss()(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    # the distributed module's names for the forget loss are the package's, which normalise over ranks themselves
    assert sdist.adaptive_weights is sfron_ops.adaptive_weights and sdist.AdaptiveLoss is sfron_ops.AdaptiveLoss
    assert sdist.adaptive_cross_entropy is sfron_ops.adaptive_cross_entropy


if __name__ == "__main__":
    worker(sys.argv[1])
