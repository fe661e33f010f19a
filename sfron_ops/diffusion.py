r"""Class-conditional diffusion models for unlearning: the per-sample ε-prediction loss, paired
timesteps, classifier-free guidance and a sampler, on top of Hugging Face ``diffusers`` schedulers.

A denoiser here is any module called as ``model(x_t, t, labels)`` that returns the predicted noise
:math:`\hat\varepsilon` with the shape of ``x_t``; label ``num_classes`` is the "no class" label of
classifier-free guidance. :class:`DiffusersDenoiser` gives ``diffusers``' ``UNet2DModel`` (with
``num_class_embeds``) and ``DiTTransformer2DModel`` that call signature.

.. math::
   x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon, \qquad
   \ell_i = \textstyle\sum_{\text{pixels}} (\varepsilon_i - \hat\varepsilon_\theta(x_{t,i}, t_i, c_i))^2, \qquad
   \tilde\varepsilon = (1 + w)\,\hat\varepsilon_\theta(x_t, t, c) - w\,\hat\varepsilon_\theta(x_t, t, \varnothing)

Timesteps are drawn in antithetic pairs :math:`(t, T-1-t)`; with probability ``label_dropout`` a
label is replaced by :math:`\varnothing` (the training of classifier-free guidance).
"""

from __future__ import annotations

import torch
from torch import nn


def _default_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def paired_timesteps(n: int, num_timesteps: int, *, device=None, generator: torch.Generator | None = None):
    r"""``n`` timesteps drawn in antithetic pairs: ``ceil(n / 2)`` uniform draws :math:`t` in
    ``[0, num_timesteps)``, followed by :math:`T - 1 - t` for as many as are needed.

    The pairs lower the variance of the loss estimate (every batch covers both ends of the
    schedule) without changing its expectation."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"Invalid n: {n!r}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"Invalid num_timesteps: {num_timesteps!r}")
    half = torch.randint(0, num_timesteps, ((n + 1) // 2,), generator=generator)
    return torch.cat([half, num_timesteps - 1 - half])[:n].to(device)


def guided_eps(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float,
               null_label: int) -> torch.Tensor:
    r"""The classifier-free guided prediction
    :math:`(1 + w)\hat\varepsilon(x_t, t, c) - w\hat\varepsilon(x_t, t, \varnothing)`, with both terms from one
    forward pass over the doubled batch. ``guidance=0`` is the conditional prediction."""
    if guidance == 0:
        return model(x_t, t, labels)
    n = x_t.shape[0]
    eps = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
    return (1 + guidance) * eps[:n] - guidance * eps[n:]


class EpsLoss(nn.Module):
    r"""The per-sample ε-prediction loss of a class-conditional denoiser.

    ``loss(model, x0, labels)`` draws timesteps (in pairs :math:`(t, T-1-t)` when ``paired``), the
    noise and the label dropout from the global torch generator (so that a checkpointed run
    resumes exactly), and returns one loss per sample: the sum over pixels of the squared error
    of the predicted noise. It runs the model itself (``takes_model``), which is how
    :func:`sfron_ops.fisher_diagonal` and the unlearning runner recognise it.

    Args:
        num_classes: the number of real classes; label ``num_classes`` means "no class".
        scheduler: the noise schedule, e.g. ``diffusers.DDPMScheduler`` (default: 1,000 linear steps);
            anything with ``add_noise`` and ``config.num_train_timesteps``.
        label_dropout: probability of replacing a label by "no class" (classifier-free guidance training).
        paired: draw timesteps in antithetic pairs.
        guidance: when set, the loss is that of the guided prediction with this weight ``w``
            (and no label dropout): what the saliency passes of SFR-on and SalUn differentiate.
    """

    reduction = "none"
    takes_model = True

    def __init__(self, num_classes: int, scheduler=None, *, label_dropout: float = 0.1, paired: bool = True,
                 guidance: float | None = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Invalid num_classes: {num_classes!r}")
        if isinstance(label_dropout, bool) or not isinstance(label_dropout, (int, float)) or not 0 <= label_dropout < 1:
            raise ValueError(f"Invalid label_dropout: {label_dropout!r}; expected a number in [0, 1)")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                     or guidance < 0):
            raise ValueError(f"Invalid guidance: {guidance!r}")
        self.num_classes = num_classes
        self.scheduler = _default_scheduler() if scheduler is None else scheduler
        self.label_dropout = float(label_dropout)
        self.paired = paired
        self.guidance = guidance

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def with_options(self, **changes) -> EpsLoss:
        """A copy with some of ``label_dropout``, ``paired`` and ``guidance`` changed (same scheduler)."""
        unknown = sorted(set(changes) - {"label_dropout", "paired", "guidance"})
        if unknown:
            raise ValueError(f"Invalid option: {unknown[0]!r}")
        options = {"label_dropout": self.label_dropout, "paired": self.paired, "guidance": self.guidance, **changes}
        return type(self)(self.num_classes, self.scheduler, **options)

    def guided(self, guidance: float) -> EpsLoss:
        """The loss of the guided prediction with weight ``guidance`` (label dropout off)."""
        return self.with_options(guidance=guidance)

    def noised(self, x0: torch.Tensor):
        """``(x_t, t, noise)`` for a batch of clean images: timesteps and noise from the global generator."""
        n = x0.shape[0]
        if self.paired:
            t = paired_timesteps(n, self.num_timesteps, device=x0.device)
        else:
            t = torch.randint(0, self.num_timesteps, (n,)).to(x0.device)
        noise = torch.randn_like(x0)
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.label_dropout == 0 or self.guidance is not None:
            return labels
        drop = torch.rand(labels.shape[0]).to(labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def predict(self, model, x_t, t, labels):
        """The prediction the loss is taken on: conditional, or guided when ``guidance`` is set."""
        if self.guidance is None:
            return model(x_t, t, labels)
        return guided_eps(model, x_t, t, labels, self.guidance, self.null_label)

    def forward(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(x0, labels)
        x_t, t, noise = self.noised(x0)
        eps = self.predict(model, x_t, t, self.drop_labels(labels))
        return (noise - eps).float().square().flatten(1).sum(dim=1)

    def relabel_losses(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                       new_labels: torch.Tensor) -> torch.Tensor:
        r"""Per-sample :math:`\sum (\hat\varepsilon(x_t, t, c) - \operatorname{sg}\hat\varepsilon(x_t, t, c'))^2`:
        the prediction for ``labels`` pulled toward the (detached) prediction for ``new_labels`` on the
        same noisy images (SalUn's forgetting term for diffusion models). No label dropout."""
        self._check(x0, labels)
        x_t, t, _ = self.noised(x0)
        with torch.no_grad():
            target = model(x_t, t, new_labels)
        return (model(x_t, t, labels) - target).float().square().flatten(1).sum(dim=1)

    def _check(self, x0, labels):
        if labels.dim() != 1 or labels.shape[0] != x0.shape[0]:
            raise ValueError(f"labels must have shape ({x0.shape[0]},), got {tuple(labels.shape)}")

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, timesteps={self.num_timesteps}, label_dropout={self.label_dropout}, "
                f"paired={self.paired}, guidance={self.guidance}")


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, image_shape: tuple, *, scheduler=None, steps: int = 50,
           guidance: float = 2.0, null_label: int | None = None, generator: torch.Generator | None = None,
           batch_size: int | None = None) -> torch.Tensor:
    r"""Class-conditional ancestral sampling with classifier-free guidance.

    Starts from :math:`x_T \sim \mathcal N(0, I)` drawn from ``generator`` (a CPU generator gives
    the same images on any device; the scheduler draws its step noise from it too) and runs ``scheduler.step`` (a
    ``diffusers`` scheduler, by default ``DDPMScheduler`` with 1,000 training steps) over ``steps``
    timesteps with the guided prediction of weight ``guidance``; ``null_label`` is the model's
    "no class" label. Returns images in the model's range
    (``[-1, 1]`` for the built-in scenarios), in eval mode, batched by ``batch_size``.
    """
    if null_label is None:
        raise ValueError("sample needs null_label (the model's 'no class' label)")
    base = _default_scheduler() if scheduler is None else scheduler
    sched = type(base).from_config(base.config)
    sched.set_timesteps(steps)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    out = []
    try:
        chunks = labels.split(batch_size or max(1, labels.shape[0]))
        for chunk in chunks:
            chunk = chunk.to(device)
            x = torch.randn((chunk.shape[0], *image_shape), generator=generator).to(device)
            for t in sched.timesteps:
                tt = torch.full((chunk.shape[0],), int(t), device=device, dtype=torch.long)
                eps = guided_eps(model, x, tt, chunk, guidance, null_label)
                x = sched.step(eps, int(t), x, generator=generator, return_dict=False)[0]
            out.append(x.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty((0, *image_shape))


class DiffusersDenoiser(nn.Module):
    r"""A ``diffusers`` model behind the ``model(x_t, t, labels) -> ε̂`` call of this module.

    ``UNet2DModel`` needs ``num_class_embeds = num_classes + 1`` (the last one is "no class");
    ``DiTTransformer2DModel`` has the extra embedding already (``num_embeds_ada_norm = num_classes``),
    and its own label dropout is switched off here so that :class:`EpsLoss` controls it for every
    model alike. A learned-variance output (twice the input channels) is cut to the ε half.
    """

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        kind = type(net).__name__
        if kind == "UNet2DModel":
            embeds = net.config.num_class_embeds
            if embeds is None or embeds < num_classes + 1:
                raise ValueError(f"UNet2DModel needs num_class_embeds >= num_classes + 1 = {num_classes + 1} "
                                 f"(the last is 'no class'), got {embeds!r}")
        elif kind == "DiTTransformer2DModel":
            if net.config.num_embeds_ada_norm != num_classes:
                raise ValueError(f"DiTTransformer2DModel needs num_embeds_ada_norm = num_classes = {num_classes}, "
                                 f"got {net.config.num_embeds_ada_norm!r}")
            for module in net.modules():
                if type(module).__name__ == "LabelEmbedding":
                    if module.embedding_table.num_embeddings < num_classes + 1:
                        raise ValueError("DiTTransformer2DModel has no 'no class' embedding: build it with a class "
                                         "dropout probability > 0 (the diffusers default)")
                    module.dropout_prob = 0.0
        self.in_channels = net.config.in_channels

    def forward(self, x, t, labels):
        out = self.net(x, t, class_labels=labels, return_dict=False)[0]
        return out[:, : self.in_channels] if out.shape[1] != self.in_channels else out
