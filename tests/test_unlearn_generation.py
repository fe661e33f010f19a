"""Class forgetting in diffusion models: every method through the runner, the official DDPM loop by hand, resume,
the feature FID, and the scenario end to end on tiny budgets."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from sfron_ops import SFRon, adaptive_weights, fisher_diagonal, saliency_mask
from sfron_ops.diffusion import EpsLoss
from sfron_ops.unlearn import adaptive_forget_loss, cli, generation, make_method, presets, run
from sfron_ops.unlearn.data import TensorLoader
from sfron_ops.unlearn.metrics import feature_stats, fid, frechet_distance
from sfron_ops.unlearn.models import DigitsDenoiser, build_denoiser

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _denoiser(seed=0):
    torch.manual_seed(seed)
    model = DigitsDenoiser((1, 4, 4), num_classes=3, width=24, depth=2, emb=8)
    with torch.no_grad():
        model.out[-1].weight.normal_(0, 0.1)
    return model


def _loaders(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(40, 1, 4, 4, generator=g) * 2 - 1
    y = torch.cat([torch.zeros(8, dtype=torch.long), torch.randint(1, 3, (32,), generator=g)])
    return TensorLoader(x[:8], y[:8], 4, shuffle=True, seed=1), TensorLoader(x[8:], y[8:], 8, shuffle=True, seed=2)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


ADAM = dict(base="adamw", weight_decay=0.0, lr_schedule="constant")
SALUN_DDPM = dict(labels="next", batch_order="paired", remain_weight=1e-3, **ADAM)  # SalUn's DDPM forgetting
SMALL = {
    "train": dict(iterations=6, lr=1e-3, **ADAM),
    "ft": dict(iterations=6, lr=1e-3, **ADAM),
    "ga": dict(iterations=6, lr=1e-3, max_grad_norm=1.0, **ADAM),
    "rl": dict(iterations=6, lr=1e-3, **SALUN_DDPM),
    "salun": dict(iterations=6, lr=1e-3, density=0.5, mask_guidance=2.0, **SALUN_DDPM),
    "sa": dict(iterations=6, lr=1e-3, replay_per_class=3, fisher_samples=4, sample_steps=3),
    "sfron": {k: v for k, v in presets.SFRON_PAPER_GENERATION["ddpm-cifar10-class"].items() if k != "method"}
    | dict(iterations=6, lr=1e-3),
}


def test_every_generative_method_has_a_small_config():
    from sfron_ops.unlearn import METHODS

    assert set(SMALL) == set(METHODS) - {"scrub"}
    with pytest.raises(ValueError, match="scrub distils a classifier"):
        run("scrub", _denoiser(), *_loaders(), loss_fn=EpsLoss(3), iterations=2, progress=False)
    with pytest.raises(ValueError, match="sa unlearns a class-conditional diffusion model"):
        run("sa", nn.Linear(2, 2), *_loaders(), iterations=2, progress=False)
    with pytest.raises(ValueError, match="mask_guidance=2.0 needs a diffusion loss"):
        run("sfron", nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), *_loaders(), iterations=2, mask_guidance=2.0,
            progress=False)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_method_changes_the_model_and_records(name):
    model = _denoiser()
    before = _flat(model).clone()
    res = run(name, model, *_loaders(), loss_fn=EpsLoss(3), progress=False, log_every=3, **SMALL[name])
    assert res.completed and res.iterations == 6
    assert not torch.equal(before, _flat(model)) and torch.isfinite(_flat(model)).all()
    assert [h["iteration"] for h in res.history] == [3, 6]
    assert all(math.isfinite(h["forget_loss" if name not in ("train", "ft") else "remain_loss"]) for h in res.history)


def test_rl_in_its_authors_order_on_a_diffusion_loss():
    """RL's default epoch (every forget batch with uniform random labels, then every remain batch) with an ε-loss."""
    model = _denoiser()
    before = _flat(model).clone()
    res = run("rl", model, *_loaders(), loss_fn=EpsLoss(3), progress=False, log_every=1, iterations=6, lr=1e-3, **ADAM)
    assert res.completed and res.info["epochs"] == 1
    assert [("forget_loss" in h, "remain_loss" in h) for h in res.history] == [(True, False)] * 2 + [(False, True)] * 4
    assert not torch.equal(before, _flat(model)) and torch.isfinite(_flat(model)).all()


def test_sfron_is_the_official_ddpm_loop():
    """The runner's "sfron" with the official DDPM preset against the loop of the authors' runner, written by hand
    with torch.optim.Adam: per iteration a forget step (adaptive weights 1/(loss^0.5 + 1e-8), ascent scaled by a
    cosine alpha from 10, gradient x mask, clip 1, step) and a remain step (clip 1, step); paired timesteps and
    10 % label dropout; the mask from the clipped Fisher of the guided prediction."""
    n, lr, alpha = 8, 1e-3, 10.0
    loss = EpsLoss(3, label_dropout=0.1)
    model = _denoiser()
    forget, remain = _loaders()
    torch.manual_seed(4)
    guided = loss.guided(2.0)
    ff = fisher_diagonal(model, forget, guided, clip_norm=1.0)
    fr = fisher_diagonal(model, remain, guided, clip_norm=1.0)
    masks = saliency_mask(ff, fr, gamma=1.0).masks
    kept = sum(int(m.sum()) for m in masks.values())
    assert 0 < kept < sum(m.numel() for m in masks.values())
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)

    def cycle(loader):
        while True:
            yield from loader

    fit, rit = cycle(forget), cycle(remain)
    for i in range(n):
        a = alpha * (1 + math.cos(math.pi * i / n)) / 2
        x, y = next(fit)
        losses = loss(model, x, y)
        c = 1.0 / (losses.detach().sqrt() + 1e-8)
        weighted = (losses.numel() * c / c.sum() * losses).mean()
        opt.zero_grad()
        (-a * weighted).backward()
        for name, p in model.named_parameters():
            p.grad.mul_(masks[name])
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        x, y = next(rit)
        opt.zero_grad()
        loss(model, x, y).mean().backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    twin = _denoiser()
    res = run("sfron", twin, *_loaders(), loss_fn=loss, seed=4, progress=False, **dict(SMALL["sfron"], iterations=n))
    assert res.info["mask_kept"] == kept
    torch.testing.assert_close(_flat(twin), _flat(model), rtol=1e-5, atol=1e-6)
    assert not torch.equal(_flat(twin), _flat(_denoiser()))


def test_sfron_optimizer_is_adam_when_decay_is_zero():
    """SFRon(base="adamw", weight_decay=0) is Adam: the remain steps of both agree."""
    model, twin = _denoiser(), _denoiser()
    ours = SFRon(model.parameters(), base="adamw", lr=1e-3, weight_decay=0.0)
    adam = torch.optim.Adam(twin.parameters(), lr=1e-3)
    x, y = next(iter(_loaders()[1]))
    for m, opt in ((model, ours), (twin, adam)):
        for step in range(3):
            torch.manual_seed(step)
            opt.zero_grad()
            EpsLoss(3)(m, x, y).mean().backward()
            opt.step()
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sfron", "salun", "sa", "ga"])
def test_resume_continues_bit_for_bit(tmp_path, name):
    ckpt = str(tmp_path / "run.pt")
    whole = _denoiser()
    run(name, whole, *_loaders(), loss_fn=EpsLoss(3), seed=3, progress=False, **SMALL[name])
    part = _denoiser()
    first = run(name, part, *_loaders(), loss_fn=EpsLoss(3), seed=3, progress=False, checkpoint=ckpt, stop_after=3,
                **SMALL[name])
    assert not first.completed
    torch.manual_seed(999)
    resumed = _denoiser(seed=5)
    second = run(name, resumed, *_loaders(), loss_fn=EpsLoss(3), progress=False, checkpoint=ckpt, resume=True,
                 **SMALL[name])
    assert second.completed and second.resumed_from == 3
    assert torch.equal(_flat(resumed), _flat(whole))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_diffusers_models_through_the_same_loop(kind, tmp_path):
    torch.manual_seed(0)
    kw = dict(channels=(8, 16), norm_num_groups=4) if kind == "unet" else dict(layers=1, heads=2, head_dim=8)
    model = build_denoiser(kind, (1, 8, 8), 3, **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1, torch.arange(24) % 3

    def loaders():
        return (TensorLoader(x[y == 0], y[y == 0], 4, shuffle=True, seed=1),
                TensorLoader(x[y != 0], y[y != 0], 8, shuffle=True, seed=2))

    before = _flat(model).clone()
    spec = dict(SMALL["sfron"], iterations=3)
    res = run("sfron", model, *loaders(), loss_fn=EpsLoss(3), seed=0, progress=False, **spec)
    assert res.completed and 0 < res.info["mask_kept"] < res.info["mask_total"]
    assert not torch.equal(before, _flat(model)) and torch.isfinite(_flat(model)).all()
    ckpt = str(tmp_path / "r.pt")
    torch.manual_seed(0)
    fresh = build_denoiser(kind, (1, 8, 8), 3, **kw)
    run("sfron", fresh, *loaders(), loss_fn=EpsLoss(3), seed=0, progress=False, checkpoint=ckpt, stop_after=1, **spec)
    resumed = build_denoiser(kind, (1, 8, 8), 3, **kw)
    run("sfron", resumed, *loaders(), loss_fn=EpsLoss(3), progress=False, checkpoint=ckpt, resume=True, **spec)
    assert torch.equal(_flat(resumed), _flat(model))


# ---------------------------------------------------------------------------------------------- FID
def test_frechet_distance_hand_computed():
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    want = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(want, abs=1e-10)
    # a full-covariance case against scipy's matrix square root
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(torch.from_numpy(m1), torch.from_numpy(s1), torch.from_numpy(m2),
                            torch.from_numpy(s2)) == pytest.approx(ref, rel=1e-9)


def test_fid_limits():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 16, generator=g)
    assert abs(fid(feats, feats)) < 1e-8
    assert abs(fid(feats, feats[torch.randperm(300, generator=g)])) < 1e-8
    shifted = fid(feats, feats + 3.0)
    assert shifted == pytest.approx(16 * 9.0, rel=1e-8)  # a pure shift: |delta mu|^2
    mu, cov = feature_stats(feats.double())
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(feats.double().numpy().T)))
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(feats[:1])
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(mu, cov, mu[:3], cov)


# ---------------------------------------------------------------------------------------------- scenario
_DDPM_SCENARIO = presets.digits_ddpm_scenario


def _tiny_scenario(classes=(0, 1), **kw):
    methods = {"SFR-on": dict(presets.DIGITS_DDPM["SFR-on"], iterations=4),
               "SalUn": dict(presets.DIGITS_DDPM["SalUn"], iterations=4),
               "SA": dict(presets.DIGITS_DDPM["SA"], iterations=4, replay_per_class=2, fisher_samples=3,
                          sample_steps=2)}
    return _DDPM_SCENARIO(
        methods=methods, classes=classes, train=dict(presets.DDPM_TRAIN, iterations=6), classifier_epochs=1,
        samples_forget=6, samples_kept=3, sample_steps=2, trace_points=2, trace_samples=4, rt_seeds=(0,),
        denoiser_kwargs=dict(width=32, depth=1, emb=16), **kw)


def test_scenario_end_to_end(tmp_path):
    scenario = _tiny_scenario()
    out = str(tmp_path / "out")
    lines = []
    results = generation.run_scenario(scenario, seeds=(0,), out=out, progress=False, echo=lines.append,
                                      checkpoint_dir=str(tmp_path / "ckpt"))
    generation.write_outputs(results, out)
    assert results["order"] == ["Original", "RT", "SFR-on", "SalUn", "SA"]
    assert set(results["per_case"]) == {"0/0", "0/1"} and results["rt"]["cases"] == ["0/0", "0/1"]
    row = results["per_case"]["0/1"]["SFR-on"]
    assert set(generation.GEN_KEYS) <= set(row) and row["iterations"] == 4 and row["RTE"] > 0
    assert 0 <= row["FA"] <= 100 and row["FID"] > 0 and row["FID ratio"] == pytest.approx(
        row["FID"] / results["per_case"]["0/1"]["Original"]["FID"])
    assert sorted(row["per_class_acc"]) == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [i for i, _ in row["fa_trace"]] == [2, 4]
    assert results["summary"]["SFR-on"]["cases"] == 2
    for name in ("results.png", "grids/seed0-class0.png", "grids/seed0-class1.png"):
        assert os.path.getsize(os.path.join(out, name)) > 5_000
    with open(os.path.join(out, "results.json")) as fh:
        assert json.load(fh)["summary"]["SFR-on"]["cases"] == 2
    table = open(os.path.join(out, "table.md")).read()
    assert "| SFR-on |" in table and "FA c1" in table
    checks = generation.quality_bar(results)
    assert len(checks) == 5 and all(isinstance(ok, bool) for ok, _ in checks)
    # a second call resumes every run from the checkpoints and gives the same numbers
    again = generation.run_scenario(scenario, seeds=(0,), progress=False, echo=lambda _: None,
                                    checkpoint_dir=str(tmp_path / "ckpt"))
    assert again["per_case"]["0/1"]["SFR-on"]["FID"] == row["FID"]


def test_quality_bar_reads_the_cases():
    def row(fa, acc, fid_, at, iters):
        every = None if math.isnan(iters) else iters // 10
        trace = [] if every is None else [(every * (k + 1), 0.0) for k in range(10)]
        return {"FA": fa, "kept acc": acc, "FID": fid_, "forget_at": at, "iterations": iters, "fa_trace": trace}

    results = {"per_case": {
        "0/0": {"Original": row(100, 100, 10, math.nan, math.nan), "SFR-on": row(0, 99, 11, 20, 50),
                "SalUn": row(50, 100, 10, math.nan, 500), "SA": row(0, 100, 30, 400, 500)},
        "0/1": {"Original": row(100, 100, 10, math.nan, math.nan), "SFR-on": row(7, 100, 12, 30, 50),
                "SalUn": row(60, 100, 10, math.nan, 500), "SA": row(0, 100, 30, 300, 500)}}}
    checks = generation.quality_bar(results)
    assert [ok for ok, _ in checks] == [False, True, True, True, True]
    assert "0/1" in checks[0][1] and "7.0 %" in checks[0][1]
    assert "does not reach it within its 500" in checks[3][1]
    assert "SFR-on 25, SA 350" in checks[4][1] and "FA measured every 5 and 50 iterations" in checks[4][1]


def test_cli_generation(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(presets, "digits_ddpm_scenario", lambda classes=(0, 1), **kw: _tiny_scenario(classes, **kw))
    out = str(tmp_path / "out")
    code = cli.main(["run", "--scenario", "digits-ddpm-class", "--forget", "class:2", "--seeds", "1", "--methods",
                     "SFR-on", "--set", "SFR-on.iterations=2", "--out", out, "--no-progress", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Quality bar" in printed and "FA c2" in printed and "SFR-on" in printed
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["order"] == ["Original", "SFR-on"] and results["classes"] == [2]
    assert results["methods"]["SFR-on"]["iterations"] == 2


def test_ddpm_presets_are_valid_and_keep_the_authors_settings():
    for spec in list(presets.DIGITS_DDPM.values()) + list(presets.SFRON_PAPER_GENERATION.values()) + \
            [c for g in presets.DDPM_TUNING_GRIDS.values() for c in g]:
        spec = dict(spec)
        make_method(spec.pop("method"), **spec)
    paper = presets.SFRON_PAPER_GENERATION["ddpm-cifar10-class"]
    assert (paper["base"], paper["lr"], paper["weight_decay"], paper["iterations"], paper["forget_freq"],
            paper["forget_alpha"], paper["max_grad_norm"], paper["remain_max_grad_norm"], paper["weight_eps"],
            paper["fisher_clip"], paper["mask_guidance"]) == ("adamw", 1e-4, 0.0, 50, 1, 10.0, 1.0, 1.0, 1e-8, 1.0, 2.0)
    assert presets.DIGITS_DDPM["SFR-on (paper)"] == paper
    assert not set(presets.DDPM_TUNING_SEEDS) & {0, 1, 2}
    # every tuned method's preset is one configuration of its grid
    assert all(presets.DIGITS_DDPM[label] in grid for label, grid in presets.DDPM_TUNING_GRIDS.items())
    sfron, salun, sa = (presets.DIGITS_DDPM[k]["iterations"] for k in ("SFR-on", "SalUn", "SA"))
    assert salun >= 10 * sfron and sa >= 10 * sfron
    assert adaptive_weights(torch.tensor([1.0, 4.0]), 0.5, eps=paper["weight_eps"]).sum() == pytest.approx(2.0)
    # the authors' DDPM weights 1/(loss^0.5 + 1e-8), without a floor, on losses below the classifiers' floor too
    assert paper["loss_floor"] is None and presets.DIGITS_DDPM["SFR-on"]["loss_floor"] is None
    losses = torch.tensor([3e-6, 5e-5, 0.02, 1.7, 40.0], requires_grad=True)
    c = 1.0 / (losses.detach().pow(0.5) + 1e-8)
    official = (losses.numel() * c / c.sum() * losses).mean()
    assert adaptive_forget_loss(losses, paper["lambd"], paper["loss_floor"], paper["weight_eps"]).item() == \
        official.item()


def test_tune_keeps_the_lowest_fid_among_configurations_that_forget(monkeypatch):
    """Selection only (the runs are replaced): FA <= 5 % on every case makes a configuration eligible, the lowest
    mean FID ratio wins, and with none eligible the lowest worst-case FA does."""
    table = {  # lr -> (FA on class 0, FA on class 1, FID)
        1e-4: (0.0, 40.0, 10.0), 3e-4: (0.0, 5.0, 13.0), 1e-3: (2.0, 0.0, 12.0), 3e-3: (0.0, 1.0, 30.0)}

    def fake_case(scenario, base, c, label, config, **kw):
        fa0, fa1, fid_ = table[config["lr"]]
        return {"FA": (fa0, fa1)[c], "FID": fid_, "kept acc": 100.0}, None

    monkeypatch.setattr(generation, "run_case", fake_case)
    monkeypatch.setattr(generation, "prepare_seed",
                        lambda scenario, s, **kw: type("B", (), {"seed": s, "original": None})())
    monkeypatch.setattr(generation, "evaluate_case", lambda scenario, b, model, c: ({"FID": 10.0}, None))
    scenario = _tiny_scenario()
    grids = {"SFR-on": [dict(method="sfron", lr=lr, iterations=5) for lr in table],
             "GA": [dict(method="ga", lr=lr, iterations=5) for lr in (1e-4,)]}
    out = generation.tune(scenario, grids, seeds=(100,), classes=(0, 1), echo=lambda _: None)
    assert out["best"]["SFR-on"]["lr"] == 1e-3  # eligible: 3e-4 (1.3), 1e-3 (1.2), 3e-3 (3.0)
    assert out["best"]["GA"]["lr"] == 1e-4     # none eligible: the lowest worst FA
    assert [t["eligible"] for t in out["trials"][:4]] == [False, True, True, True]
    assert out["trials"][1]["FID ratio"] == pytest.approx(1.3)
