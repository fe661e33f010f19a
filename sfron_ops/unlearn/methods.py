"""Unlearning methods under one runner: SFR-on and the usual baselines.

Every method is a small class with hyperparameters (``defaults``), a one-off ``prepare``
(saliency masks, a teacher copy), and a ``step(i, data)`` that does iteration ``i`` of ``iterations``.
The runner (:func:`sfron_ops.unlearn.run`) owns the loop, the timing, logging and checkpoints.

- ``train``: plain training on the remain loader (the original model on all data, RT on D_r).
- ``ft``: fine-tuning on D_r only.
- ``ga``: gradient ascent on D_f only.
- ``rl``: random labels: D_f with a random wrong label and D_r with its label, in one batch.
- ``salun``: ``rl`` with the gradient restricted to the weights of largest forget-gradient magnitude
  (``density`` of them, 50 % by default), as in SalUn.
- ``scrub``: SCRUB: a student starting from the original moves away from the frozen original
  (the teacher) on D_f and stays close to it, and to the labels, on D_r.
- ``sfron``: SFR-on, the official loop (SPEC): masked adaptive ascent every ``forget_freq``
  iterations with a cosine-decayed ``forget_alpha``, a remain step every iteration, CosineAnnealingLR.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..fisher import fisher_diagonal
from ..loss import LOSS_FLOOR, WEIGHT_EPS, adaptive_weights, check_weight_args
from ..mask import saliency_mask
from ..monitor import SFRON_ADVICE
from ..optim import SFRon, _check_number

BASES = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {low}")


def _accuracy(output, target):
    """Batch accuracy in percent as a tensor (no host sync), or None when it does not apply."""
    if output.dim() != 2 or target.dim() != 1 or target.is_floating_point():
        return None
    return (output.argmax(dim=1) == target).float().mean() * 100.0


def _record(prefix, loss, output, target, out=None):
    out = {} if out is None else out
    out[f"{prefix}_loss"] = loss.detach().float()
    acc = _accuracy(output.detach(), target)
    if acc is not None:
        out[f"{prefix}_acc"] = acc
    return out


def adaptive_forget_loss(losses: torch.Tensor, lambd: float = 0.5, floor: float | None = LOSS_FLOOR,
                         eps: float = WEIGHT_EPS) -> torch.Tensor:
    r"""SFR-on's forget loss :math:`\operatorname{mean}_i(w_i \ell_i)` from per-sample losses, with the weights
    of :func:`sfron_ops.adaptive_weights` (``floor`` is its ``loss_floor``, ``None``: the official formula;
    ``eps`` the constant of the weights' denominator)."""
    return (adaptive_weights(losses, lambd, floor, eps=eps) * losses).mean()


class Method:
    """Base class: hyperparameters, the base optimizer and its learning-rate schedule, checkpoint state."""

    name = "method"
    needs: tuple = ("remain",)
    defaults = dict(iterations=100, base="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999),
                    eps=1e-8, lr_schedule="cosine", max_grad_norm=None)

    #: what to change when the forget loss does not rise (:class:`~sfron_ops.monitor.ForgetMonitor` warns with it);
    #: None: the runner records the forget loss of this method but does not warn
    forget_advice: str | None = None

    def __init__(self, **hparams):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameter {unknown[0]!r}; expected one of "
                             f"{sorted(self.defaults)}")
        self.hparams = {**self.defaults, **hparams}
        if isinstance(self.hparams.get("betas"), list):
            self.hparams["betas"] = tuple(self.hparams["betas"])
        self.validate()
        self.model = self.loss_fn = self.optimizer = self.scheduler = None

    def validate(self):
        hp = self.hparams
        _check_int("iterations", hp["iterations"], 1)
        if hp["base"] not in BASES:
            raise ValueError(f"Invalid base: {hp['base']!r}; expected one of {BASES}")
        if hp["lr_schedule"] not in SCHEDULES:
            raise ValueError(f"Invalid lr_schedule: {hp['lr_schedule']!r}; expected one of {SCHEDULES}")
        _check_number("lr", hp["lr"], low=0.0)
        _check_number("momentum", hp["momentum"], low=0.0)
        _check_number("weight_decay", hp["weight_decay"], low=0.0)
        if hp["max_grad_norm"] is not None:
            _check_number("max_grad_norm", hp["max_grad_norm"], low=0.0, low_open=True)

    @property
    def iterations(self) -> int:
        return self.hparams["iterations"]

    def hparams_for_checkpoint(self) -> dict:
        return dict(self.hparams)

    # ---------------------------------------------------------------- lifecycle
    def setup(self, model: nn.Module, loss_fn, data, *, fresh: bool) -> None:
        """Build the optimizer and schedule; on a fresh start also run :meth:`prepare`."""
        self.model, self.loss_fn = model, loss_fn
        self.optimizer = self.make_optimizer(model)
        self.scheduler = self.make_scheduler(self.optimizer)
        if fresh:
            self.prepare(data)

    def make_optimizer(self, model):
        hp = self.hparams
        params = [p for p in model.parameters() if p.requires_grad]
        if hp["base"] == "sgd":
            return torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        return torch.optim.AdamW(params, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                                 weight_decay=hp["weight_decay"])

    def make_scheduler(self, optimizer):
        if self.hparams["lr_schedule"] == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.iterations)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def prepare(self, data) -> None:
        """One-off work before the loop (counted in the run time)."""

    def step(self, i: int, data) -> dict:
        raise NotImplementedError

    def finish(self, model) -> None:
        """After the last iteration (counted in the run time)."""

    def info(self) -> dict:
        return {}

    def schedule_state(self) -> dict:
        return {"lr": float(self.optimizer.param_groups[0]["lr"])}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    # ---------------------------------------------------------------- helpers
    def loss(self, output, target):
        losses = self.loss_fn(output, target)
        return losses.mean() if losses.dim() > 0 else losses

    def descend(self, loss, optimizer=None, mask=None):
        """One base-optimizer step on ``loss`` (optionally with the gradient multiplied by ``mask``)."""
        optimizer = self.optimizer if optimizer is None else optimizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if mask is not None:
            for p, m in mask:
                if p.grad is not None:
                    p.grad.mul_(m)
        if self.hparams["max_grad_norm"] is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.hparams["max_grad_norm"])
        optimizer.step()


class Train(Method):
    """Plain training on the remain loader (the original model, and RT: retraining on D_r from scratch)."""

    name = "train"
    needs = ("remain",)

    def step(self, i, data):
        x, y = data.next("remain")
        out = self.model(x)
        loss = self.loss(out, y)
        self.descend(loss)
        self.scheduler.step()
        return _record("remain", loss, out, y)


class FineTune(Train):
    """FT: continue training on D_r only; forgetting comes from catastrophic forgetting."""

    name = "ft"


class GradientAscent(Method):
    """GA: ascend the loss on D_f only."""

    name = "ga"
    needs = ("forget",)

    def step(self, i, data):
        x, y = data.next("forget")
        out = self.model(x)
        loss = self.loss(out, y)
        self.descend(-loss)
        self.scheduler.step()
        return _record("forget", loss, out, y)


def _random_wrong_labels(target, num_classes):
    """A uniformly random label different from ``target`` for each sample (global torch RNG)."""
    shift = torch.randint(1, num_classes, target.shape, device="cpu").to(target.device)
    return (target + shift) % num_classes


class RandomLabel(Method):
    """RL: train on D_f with random wrong labels together with D_r (one forget and one remain batch per step)."""

    name = "rl"
    needs = ("forget", "remain")

    def _mask(self):
        return None

    def step(self, i, data):
        xf, yf = data.next("forget")
        xr, yr = data.next("remain")
        out = self.model(torch.cat([xf, xr]))
        out_f, out_r = out[: xf.shape[0]], out[xf.shape[0]:]
        relabel = _random_wrong_labels(yf, out.shape[1])
        losses = torch.cat([self.loss_fn(out_f, relabel), self.loss_fn(out_r, yr)])
        self.descend(losses.mean(), mask=self._mask())
        self.scheduler.step()
        rec = _record("remain", self.loss(out_r.detach(), yr), out_r, yr)
        return _record("forget", self.loss(out_f.detach(), yf), out_f, yf, rec)


@torch.no_grad()
def magnitude_mask(model: nn.Module, loader, loss_fn, density: float, device=None) -> dict:
    """SalUn's saliency: keep the ``ceil(density * N)`` weights of largest ``|grad|`` of the forget loss.

    The gradient is summed over the batches of ``loader`` (batch-mean loss) at the current model,
    in eval mode; every weight whose magnitude equals the cut-off is kept too.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    device = named[0][1].device if device is None else device
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    saved = [p.grad for _, p in named]
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            for _, p in named:
                p.grad = None
            with torch.enable_grad():
                losses = loss_fn(model(x), y)
                (losses.mean() if losses.dim() else losses).backward()
            for n, p in named:
                if p.grad is not None:
                    grads[n] += p.grad.float()
    finally:
        model.train(was_training)
        for (_, p), g in zip(named, saved):
            p.grad = g
    flat = torch.cat([g.abs().flatten().cpu() for g in grads.values()])
    k = math.ceil(density * flat.numel())
    if k == 0:
        return {n: torch.zeros_like(g, dtype=torch.bool) for n, g in grads.items()}
    cutoff = torch.kthvalue(flat, flat.numel() - k + 1).values.item()
    return {n: g.abs() >= cutoff for n, g in grads.items()}


class SalUn(RandomLabel):
    """SalUn: RL restricted to the weights most salient for D_f (gradient magnitude, ``density`` of them)."""

    name = "salun"
    defaults = dict(RandomLabel.defaults, density=0.5)

    def validate(self):
        super().validate()
        _check_number("density", self.hparams["density"], low=0.0, high=1.0)
        self.masks = None
        self._pairs = None

    def prepare(self, data):
        self.masks = magnitude_mask(self.model, data.loader("forget"), self.loss_fn, self.hparams["density"])

    def _mask(self):
        if self._pairs is None:
            params = dict(self.model.named_parameters())
            self._pairs = [(params[n], m.to(params[n].device, params[n].dtype)) for n, m in self.masks.items()]
        return self._pairs

    def info(self):
        kept = sum(int(m.sum()) for m in self.masks.values())
        return {"mask_kept": kept, "mask_total": sum(m.numel() for m in self.masks.values())}

    def state_dict(self):
        return {**super().state_dict(), "masks": self.masks}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.masks = state["masks"]
        self._pairs = None


def distill_kl(student_logits, teacher_logits, temperature):
    r""":math:`T^2 \, \mathrm{KL}(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T))`, averaged over the batch."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2


class SCRUB(Method):
    """SCRUB (Kurmanji et al., 2023): max-steps push the student's outputs on D_f away from the teacher's
    (the original model), min-steps keep the labels and the teacher's outputs on D_r.

    A max-step runs every ``forget_freq`` iterations during the first ``max_fraction`` of the run;
    the min-step loss is ``ce_weight * CE + kd_weight * KL`` at temperature ``temperature``.
    """

    name = "scrub"
    needs = ("forget", "remain")
    defaults = dict(Method.defaults, temperature=4.0, kd_weight=1.0, ce_weight=1.0, forget_freq=1, max_fraction=0.5)

    def validate(self):
        super().validate()
        hp = self.hparams
        _check_number("temperature", hp["temperature"], low=0.0, low_open=True)
        _check_number("kd_weight", hp["kd_weight"], low=0.0)
        _check_number("ce_weight", hp["ce_weight"], low=0.0)
        _check_int("forget_freq", hp["forget_freq"], 1)
        _check_number("max_fraction", hp["max_fraction"], low=0.0, high=1.0)
        self.teacher = None

    def setup(self, model, loss_fn, data, *, fresh):
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        super().setup(model, loss_fn, data, fresh=fresh)

    def step(self, i, data):
        hp = self.hparams
        rec = {}
        if i < hp["max_fraction"] * self.iterations and i % hp["forget_freq"] == 0:
            xf, yf = data.next("forget")
            out = self.model(xf)
            with torch.no_grad():
                target = self.teacher(xf)
            kl = distill_kl(out, target, hp["temperature"])
            self.descend(-kl)
            rec["forget_kl"] = kl.detach()
            _record("forget", self.loss(out.detach(), yf), out, yf, rec)
        xr, yr = data.next("remain")
        out = self.model(xr)
        with torch.no_grad():
            target = self.teacher(xr)
        ce = self.loss(out, yr)
        self.descend(hp["ce_weight"] * ce + hp["kd_weight"] * distill_kl(out, target, hp["temperature"]))
        self.scheduler.step()
        return _record("remain", ce, out, yr, rec)

    def state_dict(self):
        return {**super().state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])


class SFRonMethod(Method):
    """SFR-on through :class:`sfron_ops.SFRon` (the official loop of the SPEC).

    Per iteration ``i`` of ``n``: if ``i % forget_freq == 0``, a forget step on one forget batch
    with the adaptive loss and ``forget_alpha * (1 + cos(pi i / n)) / 2``; then a remain step on one
    remain batch; the learning rate follows CosineAnnealingLR(T_max = n). The mask comes from the
    Fisher ratio of the original model on D_f and D_r (``gamma``, or ``density``).

    ``loss_floor`` (default ``sfron_ops.loss.LOSS_FLOOR``, 1e-4, as in :class:`sfron_ops.AdaptiveLoss`) guards
    the adaptive weights against exact-zero forget losses; ``loss_floor=None`` is the official formula bit for bit.
    """

    name = "sfron"
    needs = ("forget", "remain")
    forget_advice = SFRON_ADVICE
    defaults = dict(Method.defaults, iterations=1500, forget_freq=5, forget_alpha=25.0, alpha_schedule="cosine",
                    max_grad_norm=7.0, remain_max_grad_norm=None, lambd=0.5, loss_floor=LOSS_FLOOR, mask=True,
                    gamma=1.0, density=None, fisher_batches=None, slow_alpha=1.0, sync_period=1, reset_fast=True,
                    check_finite=True, impl=None)

    def validate(self):
        super().validate()
        hp = self.hparams
        _check_int("forget_freq", hp["forget_freq"], 1)
        _check_number("forget_alpha", hp["forget_alpha"], low=0.0)
        if hp["alpha_schedule"] not in SCHEDULES:
            raise ValueError(f"Invalid alpha_schedule: {hp['alpha_schedule']!r}; expected one of {SCHEDULES}")
        check_weight_args(hp["lambd"], hp["loss_floor"])
        if not isinstance(hp["mask"], bool):
            raise ValueError(f"Invalid mask: {hp['mask']!r}; expected True or False")
        if hp["density"] is not None:
            _check_number("density", hp["density"], low=0.0, high=1.0)
        else:
            _check_number("gamma", hp["gamma"])
        if hp["fisher_batches"] is not None:
            _check_int("fisher_batches", hp["fisher_batches"], 1)
        self.mask_counts = None
        self._zero_total = 0

    def make_optimizer(self, model):
        hp = self.hparams
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return SFRon(named, lr=hp["lr"], base=hp["base"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                     betas=hp["betas"], eps=hp["eps"], forget_alpha=hp["forget_alpha"],
                     max_grad_norm=hp["max_grad_norm"], remain_max_grad_norm=hp["remain_max_grad_norm"],
                     slow_alpha=hp["slow_alpha"], sync_period=hp["sync_period"], reset_fast=hp["reset_fast"],
                     check_finite=hp["check_finite"], impl=hp["impl"])

    def prepare(self, data):
        hp = self.hparams
        if not hp["mask"]:
            return
        kw = dict(max_batches=hp["fisher_batches"], impl=hp["impl"])
        forget = fisher_diagonal(self.model, data.loader("forget"), self.loss_fn, **kw)
        remain = fisher_diagonal(self.model, data.loader("remain"), self.loss_fn, **kw)
        result = saliency_mask(forget, remain, gamma=hp["gamma"], density=hp["density"], impl=hp["impl"])
        self.optimizer.set_masks(result.masks)
        self.mask_counts = (result.kept, result.total)

    def alpha_at(self, i):
        hp = self.hparams
        if hp["alpha_schedule"] == "constant":
            return float(hp["forget_alpha"])
        return hp["forget_alpha"] * (1 + math.cos(math.pi * i / self.iterations)) / 2

    def step(self, i, data):
        hp = self.hparams
        opt = self.optimizer
        rec = {}
        if i % hp["forget_freq"] == 0:
            alpha = self.alpha_at(i)
            for group in opt.param_groups:
                group["forget_alpha"] = alpha
            xf, yf = data.next("forget")
            out = self.model(xf)
            losses = self.loss_fn(out, yf)
            loss = adaptive_forget_loss(losses, hp["lambd"], hp["loss_floor"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(phase="forget")
            _record("forget", losses.detach().mean(), out, yf, rec)
            zeros = (losses.detach() == 0).sum()
            rec["forget_zero"] = zeros.float()
            self._zero_total = self._zero_total + zeros
        xr, yr = data.next("remain")
        out = self.model(xr)
        loss = self.loss(out, yr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.scheduler.step()
        return _record("remain", loss, out, yr, rec)

    def finish(self, model):
        # with reset_fast=False the slow weights are an average the user evaluates: make them the result
        if not self.hparams["reset_fast"]:
            with torch.no_grad():
                for p, s in zip([p for p in model.parameters() if p.requires_grad], self.optimizer.slow_weights()):
                    p.copy_(s)

    def schedule_state(self):
        return {"lr": float(self.optimizer.param_groups[0]["lr"]),
                "forget_alpha": float(self.optimizer.param_groups[0]["forget_alpha"])}

    def info(self):
        out = {"forget_zero_losses_seen": int(self._zero_total), "skipped_steps": self.optimizer.skipped_steps}
        if self.mask_counts is not None:
            out.update(mask_kept=self.mask_counts[0], mask_total=self.mask_counts[1])
        return out

    def state_dict(self):
        return {**super().state_dict(), "mask_counts": self.mask_counts, "zero_total": int(self._zero_total)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.mask_counts = state["mask_counts"]
        self._zero_total = state["zero_total"]


METHODS = {cls.name: cls for cls in (Train, FineTune, GradientAscent, RandomLabel, SalUn, SCRUB, SFRonMethod)}


def make_method(name: str, **hparams) -> Method:
    """A method by name with hyperparameters (the others keep their defaults)."""
    if name not in METHODS:
        raise ValueError(f"Invalid method: {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**hparams)
