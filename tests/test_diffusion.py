"""Diffusion helpers: paired timesteps, the per-sample ε-loss, guidance, the sampler, the Fisher pass with
per-batch clipping, and diffusers' models behind the same call."""

import pytest
import torch

import sfron_ops.loss
from sfron_ops import adaptive_weights, fisher_diagonal
from sfron_ops.diffusion import DiffusersDenoiser, EpsLoss, guided_eps, paired_timesteps, sample
from sfron_ops.unlearn.models import DigitsDenoiser, build_denoiser

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_denoiser(seed=0):
    torch.manual_seed(seed)
    model = DigitsDenoiser((1, 4, 4), num_classes=3, width=16, depth=2, emb=8)
    with torch.no_grad():  # the output layer starts at zero; give it weights so gradients reach every layer
        model.out[-1].weight.normal_(0, 0.1)
    return model


def _batch(n=6, seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, classes, (n,), generator=g)


def test_paired_timesteps_are_antithetic():
    torch.manual_seed(3)
    t = paired_timesteps(10, 1000)
    assert t.shape == (10,) and t.dtype == torch.long
    assert torch.equal(t[5:], 999 - t[:5])
    odd = paired_timesteps(7, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(odd[4:], 49 - odd[:3]) and int(odd.min()) >= 0 and int(odd.max()) <= 49
    assert paired_timesteps(0, 10).numel() == 0
    with pytest.raises(ValueError, match="num_timesteps"):
        paired_timesteps(4, 0)


def test_eps_loss_is_the_per_sample_sum_of_squared_noise_errors():
    from diffusers import DDPMScheduler

    model, (x, y) = _tiny_denoiser(), _batch()
    sched = DDPMScheduler(num_train_timesteps=100)
    loss = EpsLoss(3, sched, label_dropout=0.5)
    torch.manual_seed(11)
    got = loss(model, x, y)
    # by hand, drawing the same random numbers in the same order
    torch.manual_seed(11)
    half = torch.randint(0, 100, (3,))
    t = torch.cat([half, 99 - half])
    noise = torch.randn_like(x)
    drop = torch.rand(6) < 0.5
    labels = torch.where(drop, torch.full_like(y, 3), y)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    want = (noise - model(x_t, t, labels)).square().sum(dim=(1, 2, 3))
    assert 0 < int(drop.sum()) < 6  # the seed drops some labels and keeps others
    torch.testing.assert_close(got, want)
    assert got.shape == (6,) and loss.reduction == "none" and loss.takes_model


def test_guided_loss_and_relabel_losses():
    model, (x, y) = _tiny_denoiser(), _batch()
    loss = EpsLoss(3, label_dropout=0.1).guided(2.0)
    assert loss.guidance == 2.0 and loss.label_dropout == 0.1 and loss.null_label == 3
    torch.manual_seed(5)
    got = loss(model, x, y)
    torch.manual_seed(5)
    x_t, t, noise = loss.noised(x)
    eps = 3 * model(x_t, t, y) - 2 * model(x_t, t, torch.full_like(y, 3))  # no dropout under guidance
    torch.testing.assert_close(got, (noise - eps).square().sum(dim=(1, 2, 3)))
    torch.testing.assert_close(guided_eps(model, x_t, t, y, 0.0, 3), model(x_t, t, y))

    plain = EpsLoss(3)
    torch.manual_seed(6)
    model.zero_grad()
    rel = plain.relabel_losses(model, x, y, (y + 1) % 3)
    rel.sum().backward()
    got_grad = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(6)
    x_t, t, _ = plain.noised(x)
    target = model(x_t, t, (y + 1) % 3).detach()  # the new label's prediction is a fixed target
    want = (model(x_t, t, y) - target).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(rel, want)
    model.zero_grad()
    want.sum().backward()
    for a, b in zip(got_grad, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b)


def test_eps_loss_bad_input():
    with pytest.raises(ValueError, match="label_dropout"):
        EpsLoss(10, label_dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        EpsLoss(0)
    with pytest.raises(ValueError, match="Invalid option: 'scheduler'"):
        EpsLoss(3).with_options(scheduler=None)
    with pytest.raises(ValueError, match="labels must have shape"):
        EpsLoss(3)(_tiny_denoiser(), *_batch()[:1], torch.zeros(2, dtype=torch.long))


@pytest.mark.filterwarnings("ignore::sfron_ops.ZeroForgetLossWarning")
def test_adaptive_weights_eps(monkeypatch):
    monkeypatch.setattr(sfron_ops.loss, "_zero_loss_warned", False)  # leaves the once-per-process warning to others
    losses = torch.tensor([4.0, 1.0, 0.0, 0.25])
    c = 1 / (losses.sqrt() + 1e-8)  # the official DDPM weights: no floor
    torch.testing.assert_close(adaptive_weights(losses, 0.5, None, eps=1e-8), 4 * c / c.sum())
    c = 1 / (losses.clamp_min(1e-4).sqrt() + 1e-8)  # the default floor with the same eps
    torch.testing.assert_close(adaptive_weights(losses, 0.5, eps=1e-8), 4 * c / c.sum())
    assert adaptive_weights(losses, 0.5).tolist() == adaptive_weights(losses, 0.5, eps=1e-15).tolist()
    with pytest.raises(ValueError, match="Invalid eps"):
        adaptive_weights(losses, 0.5, eps=-1.0)


def test_fisher_with_per_batch_clipping_matches_a_hand_loop():
    """Per batch: the gradient of the batch-mean guided loss, clipped to a total norm over all parameters, squared;
    averaged over batches. The clip norm lies between the batches' gradient norms: some are clipped, some not."""
    model = _tiny_denoiser()
    loss = EpsLoss(3).guided(2.0)
    batches = [_batch(4, seed=s) for s in range(3)]

    torch.manual_seed(9)
    grads, norms = [], []
    model.eval()
    for x, y in batches:
        model.zero_grad()
        loss(model, x, y).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        norms.append(float(torch.sqrt(sum(g.square().sum() for g in grads[-1].values()))))
    model.zero_grad(set_to_none=True)
    clip = (sorted(norms)[0] + sorted(norms)[1]) / 2
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for g, norm in zip(grads, norms):
        c = min(1.0, clip / (norm + 1e-6))
        for n in want:
            want[n] += (c * g[n]).square() / 3

    torch.manual_seed(9)
    got = fisher_diagonal(model, batches, loss, clip_norm=clip)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-12)
    torch.manual_seed(9)
    unclipped = fisher_diagonal(model, batches, loss)
    assert sum(float(v.sum()) for v in unclipped.values()) > sum(float(v.sum()) for v in got.values())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="Invalid clip_norm: 0"):
        fisher_diagonal(model, batches, loss, clip_norm=0)


def test_sampler_is_reproducible_and_guided():
    model = _tiny_denoiser()
    labels = torch.tensor([0, 1, 2, 0])
    kw = dict(steps=5, guidance=2.0, null_label=3)
    a = sample(model, labels, (1, 4, 4), generator=torch.Generator().manual_seed(1), **kw)
    b = sample(model, labels, (1, 4, 4), generator=torch.Generator().manual_seed(1), **kw)
    chunked = sample(model, labels, (1, 4, 4), generator=torch.Generator().manual_seed(1), batch_size=3, **kw)
    c = sample(model, labels, (1, 4, 4), generator=torch.Generator().manual_seed(1), steps=5, guidance=0.0,
               null_label=3)
    assert a.shape == (4, 1, 4, 4) and torch.isfinite(a).all() and a.abs().max() <= 1.0 + 1e-6
    assert torch.equal(a, b) and chunked.shape == a.shape and torch.isfinite(chunked).all()
    assert not torch.equal(a, c)
    assert model.training  # the sampler restores the mode
    with pytest.raises(ValueError, match="null_label"):
        sample(model, labels, (1, 4, 4), steps=2)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_diffusers_models_behind_the_same_call(kind):
    torch.manual_seed(0)
    model = build_denoiser(kind, (1, 8, 8), 10)
    assert isinstance(model, DiffusersDenoiser)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 9, 10])  # 10: no class
    out = model(x, torch.tensor([1, 500, 999]), y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    model.train()
    torch.manual_seed(1)
    first = model(x, torch.tensor([1, 2, 3]), y)
    torch.manual_seed(2)
    assert torch.equal(first, model(x, torch.tensor([1, 2, 3]), y))  # no label dropout of the model's own


def test_diffusers_denoiser_needs_a_no_class_embedding():
    from diffusers import UNet2DModel

    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, num_class_embeds=10,
                      norm_num_groups=4)
    with pytest.raises(ValueError, match="num_class_embeds >= num_classes \\+ 1 = 11"):
        DiffusersDenoiser(net, 10)


def test_digits_denoiser_shapes_and_bad_sizes():
    model = DigitsDenoiser()
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 1_600_000
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="Invalid DigitsDenoiser size"):
        DigitsDenoiser(emb=7)
    with pytest.raises(ValueError, match="Invalid denoiser"):
        build_denoiser("nope", (1, 8, 8), 10)
