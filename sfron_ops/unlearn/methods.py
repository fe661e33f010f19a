"""Unlearning methods under one runner: SFR-on and the usual baselines.

Every method is a small class with hyperparameters (``defaults``), a one-off ``prepare``
(saliency masks, a teacher copy), and a ``step(i, data)`` that does iteration ``i`` of ``iterations``.
The runner (:func:`sfron_ops.unlearn.run`) owns the loop, the timing, logging and checkpoints.

- ``train``: plain training on the remain loader (the original model on all data, RT on D_r).
- ``ft``: fine-tuning on D_r only.
- ``ga``: gradient ascent on D_f only.
- ``rl``: random labels: every epoch, the forget batches with fresh random labels, then the remain batches.
- ``salun``: ``rl`` restricted to the ``density`` share of weights with the largest forget gradient,
  the others held at their starting values, as in SalUn.
- ``scrub``: SCRUB: a student starting from the original moves away from the frozen original
  (the teacher) on D_f and stays close to it, and to the labels, on D_r.
- ``sfron``: SFR-on, the official loop (SPEC): masked adaptive ascent every ``forget_freq``
  iterations with a cosine-decayed ``forget_alpha``, a remain step every iteration, CosineAnnealingLR.
- ``sa``: Selective Amnesia (generative models only): the forget class learns to produce noise,
  generated images of the other classes are replayed, and an EWC term holds the weights near the original's.

GA, RL, SalUn and SCRUB follow their authors' code step for step (docs/unlearning.md says which
repository, file and commit): epochs made of whole passes over the loaders in the authors' order,
the authors' labels, loss weights and multi-step learning-rate schedule. They keep one choice of
this package: a run is ``iterations`` optimizer steps (the authors' epochs, cut where the budget
ends), so that every method of a comparison gets the same compute ceiling; ``epochs=E`` runs ``E``
whole epochs instead, as the authors do.

The same methods unlearn classifiers and class-conditional diffusion models: with a loss that runs
the model itself (``loss_fn.takes_model``, the ε-prediction loss of :mod:`sfron_ops.diffusion`)
every method calls ``loss_fn(model, x, y)`` where a classifier's loss is ``loss_fn(model(x), y)``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from .._groups import check_number as _check_number
from ..fisher import batch_losses, fisher_diagonal
from ..loss import LOSS_FLOOR, WEIGHT_EPS, adaptive_weights, check_weight_args
from ..mask import density_mask, saliency_mask
from ..monitor import SFRON_ADVICE
from ..optim import SFRon

BASES = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
BASELINE_SCHEDULES = SCHEDULES + ("multistep",)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {low}")


def _accuracy(output, target):
    """Batch accuracy in percent as a tensor (no host sync), or None when it does not apply."""
    if output is None or output.dim() != 2 or target.dim() != 1 or target.is_floating_point():
        return None
    return (output.argmax(dim=1) == target).float().mean() * 100.0


def _mean(losses):
    return losses.mean() if losses.dim() > 0 else losses


def _record(prefix, loss, output, target, out=None):
    out = {} if out is None else out
    out[f"{prefix}_loss"] = loss.detach().float()
    acc = _accuracy(None if output is None else output.detach(), target)
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
    schedules: tuple = SCHEDULES
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
        if hp["lr_schedule"] not in self.schedules:
            raise ValueError(f"Invalid lr_schedule: {hp['lr_schedule']!r}; expected one of {self.schedules}")
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

    def plan(self, loaders: dict) -> None:
        """Fix the run from the loaders (``{"forget": ..., "remain": ...}``) before the loop: the
        runner calls it first, on a fresh start and on resume."""

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
    @property
    def generative(self) -> bool:
        """Whether the loss runs the model itself (a diffusion model's ε-prediction loss)."""
        return bool(getattr(self.loss_fn, "takes_model", False))

    def loss(self, output, target):
        return _mean(self.loss_fn(output, target))

    def losses(self, x, y):
        """``(per-sample losses, output)`` of the model on a batch (the output is ``None`` for a generative loss)."""
        return batch_losses(self.model, self.loss_fn, x, y)

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
        self.after_step(optimizer)

    def after_step(self, optimizer) -> None:
        """After every base-optimizer step of :meth:`descend`."""


class Train(Method):
    """Plain training on the remain loader (the original model, and RT: retraining on D_r from scratch)."""

    name = "train"
    needs = ("remain",)

    def step(self, i, data):
        x, y = data.next("remain")
        losses, out = self.losses(x, y)
        loss = _mean(losses)
        self.descend(loss)
        self.scheduler.step()
        return _record("remain", loss, out, y)


class FineTune(Train):
    """FT: continue training on D_r only; forgetting comes from catastrophic forgetting."""

    name = "ft"


def _loader_length(loader, which: str, method: str) -> int:
    try:
        n = len(loader)
    except TypeError:
        raise ValueError(f"{method}: the {which} loader has no len(); an epoch is one pass over it, so it needs "
                         "one") from None
    if n < 1:
        raise ValueError(f"{method}: the {which} loader is empty")
    return n


class Baseline(Method):
    """A method that runs in epochs, as its authors' code does.

    An epoch is the list of step kinds that :meth:`epoch_steps` gives for the loaders' lengths
    (``"forget"``, ``"remain"``, ...), one optimizer step each; the forget and remain loaders are
    read in order and start a new pass exactly when an epoch needs one.

    - Length: ``iterations`` steps, through as many epochs as they reach (the last one cut short);
      with ``epochs=E``, exactly ``E`` whole epochs and ``iterations`` is not used.
    - ``lr_schedule="multistep"`` (the authors'): the rate is ``lr * lr_decay**j`` in epoch ``e``
      (0-based), ``j`` the number of ``lr_milestones`` ``<= e``: ``MultiStepLR`` stepped once per
      epoch. ``"cosine"`` anneals it over the iterations instead, ``"constant"`` keeps it.
    """

    schedules = BASELINE_SCHEDULES
    defaults = dict(Method.defaults, epochs=None, lr_schedule="multistep", lr_milestones=(91, 136), lr_decay=0.1)

    def validate(self):
        super().validate()
        hp = self.hparams
        if hp["epochs"] is not None:
            _check_int("epochs", hp["epochs"], 1)
        if isinstance(hp["lr_milestones"], list):
            hp["lr_milestones"] = tuple(hp["lr_milestones"])
        if not isinstance(hp["lr_milestones"], tuple):
            raise ValueError(f"Invalid lr_milestones: {hp['lr_milestones']!r}; expected a tuple of epochs")
        for m in hp["lr_milestones"]:
            _check_int("lr_milestones entry", m, 0)
        _check_number("lr_decay", hp["lr_decay"], low=0.0)
        self._steps = self._epoch_of = None
        self._epoch_lengths = []

    def epoch_steps(self, epoch: int, lengths: dict) -> list:
        """The step kinds of epoch ``epoch`` (0-based) for loaders of ``lengths[name]`` batches."""
        raise NotImplementedError

    def plan(self, loaders):
        hp = self.hparams
        lengths = {k: _loader_length(loaders[k], k, self.name) for k in self.needs}
        steps, epoch_of, sizes = [], [], []
        while len(sizes) < hp["epochs"] if hp["epochs"] is not None else len(steps) < hp["iterations"]:
            kinds = self.epoch_steps(len(sizes), lengths)
            steps += kinds
            epoch_of += [len(sizes)] * len(kinds)
            sizes.append(len(kinds))
        if hp["epochs"] is None:
            steps, epoch_of = steps[: hp["iterations"]], epoch_of[: hp["iterations"]]
        self._steps, self._epoch_of, self._epoch_lengths = steps, epoch_of, sizes

    @property
    def iterations(self) -> int:
        return self.hparams["iterations"] if self._steps is None else len(self._steps)

    def make_scheduler(self, optimizer):
        hp = self.hparams
        if hp["lr_schedule"] != "multistep":
            return super().make_scheduler(optimizer)
        epoch_of = self._epoch_of

        def factor(i):  # LambdaLR asks once more after the last step
            e = epoch_of[min(i, len(epoch_of) - 1)]
            return hp["lr_decay"] ** sum(1 for m in hp["lr_milestones"] if m <= e)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def step(self, i, data):
        if self._steps is None:
            raise RuntimeError(f"{self.name}: plan(loaders) must run before the first step (the runner calls it)")
        record = self.take(self._steps[i], data)
        self.scheduler.step()
        return record

    def take(self, kind: str, data) -> dict:
        """One optimizer step of kind ``kind``; returns the step's record."""
        raise NotImplementedError

    def info(self):
        if not self._steps:
            return {}
        last = self._epoch_of[-1]
        done = sum(1 for e in self._epoch_of if e == last)
        return {"epochs": round(last + done / self._epoch_lengths[last], 4)}


class GradientAscent(Baseline):
    """GA: gradient ascent on the cross-entropy of D_f.

    The authors' procedure (SalUn's code, OPTML-Group/Unlearn-Saliency, ``Classification/unlearn/GA.py``
    and ``unlearn/impl.py`` at a6e89fd): an epoch is one pass over the forget loader, each batch one
    SGD step on ``-CE``; ``MultiStepLR`` at epochs 91 and 136, stepped per epoch, so the rate is
    constant in any unlearning run shorter than 91 epochs.
    """

    name = "ga"
    needs = ("forget",)

    def epoch_steps(self, epoch, lengths):
        return ["forget"] * lengths["forget"]

    def take(self, kind, data):
        x, y = data.next("forget")
        losses, out = self.losses(x, y)
        loss = _mean(losses)
        self.descend(-loss)
        return _record("forget", loss, out, y)


LABELS = ("uniform", "wrong", "next")
BATCH_ORDERS = ("sequential", "paired")


def random_labels(target: torch.Tensor, num_classes: int, mode: str = "uniform") -> torch.Tensor:
    """New labels for ``target``: ``"uniform"`` over all ``num_classes`` classes, the true one included,
    as SalUn's RL draws them; ``"wrong"``: uniform over the ``num_classes - 1`` others; ``"next"``: the
    fixed label ``(y + 1) mod num_classes`` (SalUn's choice for diffusion models). The random ones come
    from the global torch generator, drawn on the CPU so that every device gets the same ones."""
    if mode == "next":
        return (target + 1) % num_classes
    if mode == "uniform":
        labels = torch.randint(0, num_classes, target.shape)
    else:
        labels = (target.cpu() + torch.randint(1, num_classes, target.shape)) % num_classes
    return labels.to(target.device)


class RandomLabel(Baseline):
    """RL: train on D_f with random labels and on D_r with the true ones.

    The authors' procedure (SalUn's code, OPTML-Group/Unlearn-Saliency, ``Classification/unlearn/RL.py``,
    CIFAR-10/SVHN branch, and ``unlearn/impl.py``, at a6e89fd; ``main_random.py`` runs it), the default:

    - an epoch is one pass over the forget loader, then one pass over the remain loader
      (``batch_order="sequential"``), each batch one SGD step on the mean cross-entropy;
    - every forget batch gets fresh labels drawn uniformly from all classes, the true one included
      (``labels="uniform"``);
    - ``MultiStepLR`` at epochs 91 and 136, stepped per epoch (constant over an unlearning run).

    ``batch_order="paired"`` puts one forget and one remain batch into every step instead (an epoch
    is then one pass over the remain loader), ``labels="wrong"`` never draws the true label. The
    authors' CIFAR-100/TinyImageNet branch, which shuffles the relabelled forget samples into the
    remain samples, is not offered.

    ``remain_weight`` weighs the remain loss: a paired step descends the forget mean plus
    ``remain_weight`` times the remain mean (instead of the mean over the joined batch), a remain
    step ``remain_weight`` times its mean. For a diffusion model (SalUn's DDPM setting:
    ``labels="next"``, ``batch_order="paired"``, ``remain_weight=1e-3``) the forget loss pulls the
    prediction for the true label toward the model's own (detached) prediction for the new label
    (:meth:`sfron_ops.diffusion.EpsLoss.relabel_losses`).
    """

    name = "rl"
    needs = ("forget", "remain")
    defaults = dict(Baseline.defaults, labels="uniform", batch_order="sequential", remain_weight=None)

    def validate(self):
        super().validate()
        hp = self.hparams
        if hp["labels"] not in LABELS:
            raise ValueError(f"Invalid labels: {hp['labels']!r}; expected one of {LABELS}")
        if hp["batch_order"] not in BATCH_ORDERS:
            raise ValueError(f"Invalid batch_order: {hp['batch_order']!r}; expected one of {BATCH_ORDERS}")
        if hp["remain_weight"] is not None:
            _check_number("remain_weight", hp["remain_weight"], low=0.0)

    def epoch_steps(self, epoch, lengths):
        if self.hparams["batch_order"] == "paired":
            return ["paired"] * lengths["remain"]
        return ["forget"] * lengths["forget"] + ["remain"] * lengths["remain"]

    def _mask(self):
        return None

    def _relabelled(self, x, y):
        """``(per-sample losses under new labels, output)`` of a forget batch (no output for a generative loss)."""
        mode = self.hparams["labels"]
        if self.generative:
            return self.loss_fn.relabel_losses(self.model, x, y, random_labels(y, self.loss_fn.num_classes, mode)), None
        out = self.model(x)
        return self.loss_fn(out, random_labels(y, out.shape[1], mode)), out

    def _forget_record(self, forget, out_f, yf, rec=None):
        # a classifier's forget loss is recorded against the true labels; a generative loss has no output to score
        loss = _mean(forget) if out_f is None else self.loss(out_f.detach(), yf)
        return _record("forget", loss, out_f, yf, rec)

    def take(self, kind, data):
        weight = self.hparams["remain_weight"]
        if kind == "remain":
            x, y = data.next("remain")
            losses, out = self.losses(x, y)
            loss = _mean(losses)
            self.descend(loss if weight is None else weight * loss, mask=self._mask())
            return _record("remain", loss, out, y)
        xf, yf = data.next("forget")
        if kind == "forget":
            forget, out_f = self._relabelled(xf, yf)
            self.descend(_mean(forget), mask=self._mask())
            return self._forget_record(forget, out_f, yf)
        xr, yr = data.next("remain")
        if self.generative or weight is not None:  # the two batches through the model separately
            forget, out_f = self._relabelled(xf, yf)
            remain, out_r = self.losses(xr, yr)
            loss = torch.cat([forget, remain]).mean() if weight is None else forget.mean() + weight * remain.mean()
        else:  # one joined batch, as batch-norm statistics then see it
            out = self.model(torch.cat([xf, xr]))
            out_f, out_r = out[: xf.shape[0]], out[xf.shape[0]:]
            forget = self.loss_fn(out_f, random_labels(yf, out.shape[1], self.hparams["labels"]))
            remain = self.loss_fn(out_r, yr)
            loss = torch.cat([forget, remain]).mean()
        self.descend(loss, mask=self._mask())
        rec = _record("remain", _mean(remain) if out_r is None else self.loss(out_r.detach(), yr), out_r, yr)
        return self._forget_record(forget, out_f, yf, rec)


@torch.no_grad()
def magnitude_mask(model: nn.Module, loader, loss_fn, density: float, device=None) -> dict:
    """SalUn's saliency: keep exactly ``ceil(density * N)`` weights, those of largest ``|grad|`` of the
    forget loss (ties at the cut-off broken by the flat index over the parameters in order).

    The gradient is summed over the batches of ``loader`` (batch-mean loss) at the current model,
    in eval mode, as ``Classification/generate_mask.py`` of SalUn's code computes it. ``loss_fn`` is a
    per-sample loss of the output, or one that runs the model (:func:`sfron_ops.fisher.batch_losses`).
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
                _mean(batch_losses(model, loss_fn, x, y)[0]).backward()
            for n, p in named:
                if p.grad is not None:
                    grads[n] += p.grad.float()
    finally:
        model.train(was_training)
        for (_, p), g in zip(named, saved):
            p.grad = g
    return density_mask({n: g.abs() for n, g in grads.items()}, density).masks


class SalUn(RandomLabel):
    """SalUn: RL on the ``density`` share of weights most salient for D_f; the others stay put.

    The authors' procedure (OPTML-Group/Unlearn-Saliency, ``Classification/``, at a6e89fd):
    ``generate_mask.py`` keeps the weights of largest ``|grad|`` of the forget loss (summed over the
    forget batches, model in eval mode); ``main_random.py --unlearn RL --mask_path ...`` then runs
    :class:`RandomLabel`'s procedure with the gradient multiplied by the mask and, after every step,
    each masked-out weight put back to its starting value and its momentum zeroed
    (``restore_masked=True``; the weight-decay fix, #33). With ``restore_masked=False``, as before that
    fix (ac880a2), weight decay and momentum still move masked-out weights.

    The mask keeps exactly ``ceil(density * N)`` weights, ties broken by flat index (the authors'
    ``int(density * N)`` differs by at most one weight; their tie order is ``argsort``'s).

    For a diffusion model (SalUn's DDPM setting: ``labels="next"``, ``batch_order="paired"``,
    ``remain_weight=1e-3``) the saliency is taken on the loss of the guided prediction with weight
    ``mask_guidance``.
    """

    name = "salun"
    defaults = dict(RandomLabel.defaults, density=0.5, restore_masked=True, mask_guidance=None)

    def validate(self):
        super().validate()
        _check_number("density", self.hparams["density"], low=0.0, high=1.0)
        if not isinstance(self.hparams["restore_masked"], bool):
            raise ValueError(f"Invalid restore_masked: {self.hparams['restore_masked']!r}; expected True or False")
        _check_guidance(self.hparams["mask_guidance"])
        self.masks = None
        self._pairs = None
        self._start = None

    def setup(self, model, loss_fn, data, *, fresh):
        # masked-out weights never move, so on resume too the current values are their starting values
        self._start = {n: p.detach().clone() for n, p in model.named_parameters()} if self.hparams[
            "restore_masked"] else None
        super().setup(model, loss_fn, data, fresh=fresh)

    def prepare(self, data):
        self.masks = magnitude_mask(self.model, data.loader("forget"), _saliency_loss(self),
                                    self.hparams["density"])

    def _mask(self):
        if self._pairs is None:
            params = dict(self.model.named_parameters())
            self._pairs = [(params[n], m.to(params[n].device), n) for n, m in self.masks.items()]
        return [(p, m) for p, m, _ in self._pairs]

    @torch.no_grad()
    def after_step(self, optimizer):
        if self._start is None:
            return
        self._mask()
        for p, m, n in self._pairs:
            p.copy_(torch.where(m, p, self._start[n]))
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_(m)

    def info(self):
        kept = sum(int(m.sum()) for m in self.masks.values())
        return {**super().info(), "mask_kept": kept, "mask_total": sum(m.numel() for m in self.masks.values())}

    def state_dict(self):
        return {**super().state_dict(), "masks": self.masks}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.masks = state["masks"]
        self._pairs = None


def _check_guidance(value):
    if value is not None:
        _check_number("mask_guidance", value, low=0.0)


def _saliency_loss(method):
    """The loss a saliency pass differentiates: the training loss, or for a diffusion model with
    ``mask_guidance`` set, the loss of the guided prediction."""
    w = method.hparams["mask_guidance"]
    if w is None:
        return method.loss_fn
    if not method.generative:
        raise ValueError(f"{method.name}: mask_guidance={w!r} needs a diffusion loss (sfron_ops.diffusion.EpsLoss)")
    return method.loss_fn.guided(w)


def distill_kl(student_logits, teacher_logits, temperature):
    r""":math:`T^2 \, \mathrm{KL}(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T))`, averaged over the batch."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2


class SCRUB(Baseline):
    r"""SCRUB (Kurmanji et al., 2023): max-steps push the student's outputs on D_f away from the
    teacher's (the original model, frozen in eval mode), min-steps keep the labels and the teacher's
    outputs on D_r.

    The authors' procedure (meghdadk/SCRUB at 98ffb11: ``large_scale_unlearning.ipynb``, the
    "SCRUB Forgetting" cells, with ``thirdparty/repdistiller/helper/loops.py`` ``train_distill``,
    ``distiller_zoo/KD.py`` and ``helper/util.py`` ``adjust_learning_rate``): epoch ``e`` (0-based) is,
    if ``e < max_epochs``, one pass over the forget loader with a max-step on each batch,
    loss :math:`-T^2\,\mathrm{KL}(p_t^T \| p_s^T)`, then one pass over the remain loader with a
    min-step on each, loss ``ce_weight * CE + kd_weight`` :math:`T^2\,\mathrm{KL}`. Defaults are the
    authors' CIFAR-10 setting: ``max_epochs`` 2 (their ``msteps``), ``ce_weight`` 0.99 (``gamma``),
    ``kd_weight`` 0.001 (``alpha``), ``temperature`` 4, the rate divided by 10 from epochs 3, 5 and 9.
    """

    name = "scrub"
    needs = ("forget", "remain")
    defaults = dict(Baseline.defaults, temperature=4.0, kd_weight=0.001, ce_weight=0.99, max_epochs=2,
                    lr_milestones=(3, 5, 9))

    def validate(self):
        super().validate()
        hp = self.hparams
        _check_number("temperature", hp["temperature"], low=0.0, low_open=True)
        _check_number("kd_weight", hp["kd_weight"], low=0.0)
        _check_number("ce_weight", hp["ce_weight"], low=0.0)
        _check_int("max_epochs", hp["max_epochs"], 0)
        self.teacher = None

    def setup(self, model, loss_fn, data, *, fresh):
        if getattr(loss_fn, "takes_model", False):
            raise ValueError("scrub distils a classifier's outputs; it does not apply to a diffusion loss")
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        super().setup(model, loss_fn, data, fresh=fresh)

    def epoch_steps(self, epoch, lengths):
        maximize = ["max"] * lengths["forget"] if epoch < self.hparams["max_epochs"] else []
        return maximize + ["min"] * lengths["remain"]

    def take(self, kind, data):
        hp = self.hparams
        x, y = data.next("forget" if kind == "max" else "remain")
        out = self.model(x)
        with torch.no_grad():
            target = self.teacher(x)
        kl = distill_kl(out, target, hp["temperature"])
        if kind == "max":
            self.descend(-kl)
            return _record("forget", self.loss(out.detach(), y), out, y, {"forget_kl": kl.detach()})
        ce = self.loss(out, y)
        self.descend(hp["ce_weight"] * ce + hp["kd_weight"] * kl)
        return _record("remain", ce, out, y)

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
    ``weight_eps`` is the constant of the weights' denominator (1e-15; the official diffusion code
    uses 1e-8). ``fisher_clip`` clips each batch's gradient to that norm before it is squared into
    the Fisher; ``mask_guidance`` takes the Fisher of a diffusion model on its guided prediction
    (the official DDPM mask: ``fisher_clip=1``, ``mask_guidance=2``).
    """

    name = "sfron"
    needs = ("forget", "remain")
    forget_advice = SFRON_ADVICE
    defaults = dict(Method.defaults, iterations=1500, forget_freq=5, forget_alpha=25.0, alpha_schedule="cosine",
                    max_grad_norm=7.0, remain_max_grad_norm=None, lambd=0.5, loss_floor=LOSS_FLOOR,
                    weight_eps=WEIGHT_EPS, mask=True, gamma=1.0, density=None, fisher_batches=None, fisher_clip=None,
                    mask_guidance=None, slow_alpha=1.0, sync_period=1, reset_fast=True, check_finite=True, impl=None)

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
        _check_number("weight_eps", hp["weight_eps"], low=0.0)
        if hp["fisher_clip"] is not None:
            _check_number("fisher_clip", hp["fisher_clip"], low=0.0, low_open=True)
        _check_guidance(hp["mask_guidance"])
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
        kw = dict(max_batches=hp["fisher_batches"], clip_norm=hp["fisher_clip"], impl=hp["impl"])
        loss_fn = _saliency_loss(self)
        forget = fisher_diagonal(self.model, data.loader("forget"), loss_fn, **kw)
        remain = fisher_diagonal(self.model, data.loader("remain"), loss_fn, **kw)
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
            losses, out = self.losses(xf, yf)
            loss = adaptive_forget_loss(losses, hp["lambd"], hp["loss_floor"], hp["weight_eps"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(phase="forget")
            _record("forget", losses.detach().mean(), out, yf, rec)
            zeros = (losses.detach() == 0).sum()
            rec["forget_zero"] = zeros.float()
            self._zero_total = self._zero_total + zeros
        xr, yr = data.next("remain")
        losses, out = self.losses(xr, yr)
        loss = _mean(losses)
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


class SelectiveAmnesia(Method):
    r"""Selective Amnesia (Heng & Soh, 2023) for class-conditional diffusion models.

    Once, before the loop: ``replay_per_class`` images of every kept class are generated by the
    original model (guidance ``sample_guidance``, ``sample_steps`` steps), and the diagonal Fisher
    :math:`F` of the original is estimated from the squared per-sample gradients of the ε-loss on
    ``fisher_samples`` generated images of all classes. Each iteration then descends

    .. math::
       \mathcal L = \ell_\varepsilon(u, c_f) + \text{replay\_weight}\,\ell_\varepsilon(x_{rep}, c_{rep})
                   + \text{ewc\_weight} \sum_i F_i (\theta_i - \theta^*_i)^2

    with :math:`u \sim \mathcal U[-1, 1]` images labelled with the forgotten class (no label
    dropout) and a batch of the replay set. It needs only the forget loader (for the class and the
    image shape); the kept classes are everything else.
    """

    name = "sa"
    needs = ("forget",)
    defaults = dict(Method.defaults, base="adamw", lr=1e-4, weight_decay=0.0, lr_schedule="constant",
                    ewc_weight=10.0, replay_weight=1.0, replay_per_class=50, fisher_samples=100, sample_steps=50,
                    sample_guidance=2.0, batch_size=None)

    def validate(self):
        super().validate()
        hp = self.hparams
        _check_number("ewc_weight", hp["ewc_weight"], low=0.0)
        _check_number("replay_weight", hp["replay_weight"], low=0.0)
        _check_int("replay_per_class", hp["replay_per_class"], 1)
        _check_int("fisher_samples", hp["fisher_samples"], 1)
        _check_int("sample_steps", hp["sample_steps"], 1)
        _check_number("sample_guidance", hp["sample_guidance"], low=0.0)
        if hp["batch_size"] is not None:
            _check_int("batch_size", hp["batch_size"], 1)
        self.forget_class = self.replay = self.fisher = self.anchor = None

    def setup(self, model, loss_fn, data, *, fresh):
        if not getattr(loss_fn, "takes_model", False):
            raise ValueError("sa unlearns a class-conditional diffusion model; give it a diffusion loss "
                             "(sfron_ops.diffusion.EpsLoss)")
        self.anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        super().setup(model, loss_fn, data, fresh=fresh)

    def prepare(self, data):
        from ..diffusion import sample

        hp = self.hparams
        xf, yf = data.next("forget")
        classes = torch.unique(yf)
        if classes.numel() != 1:
            raise ValueError(f"sa forgets one class; the forget batch holds {classes.tolist()}")
        self.forget_class = int(classes)
        self.image_shape = tuple(xf.shape[1:])
        self.batch_size = hp["batch_size"] or xf.shape[0]
        loss = self.loss_fn
        device = xf.device
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        kept = [c for c in range(loss.num_classes) if c != self.forget_class]
        labels = torch.tensor(kept).repeat_interleave(hp["replay_per_class"])
        images = sample(self.model, labels, self.image_shape, scheduler=loss.scheduler, steps=hp["sample_steps"],
                        guidance=hp["sample_guidance"], null_label=loss.null_label, generator=gen)
        self.replay = (images.to(device), labels.to(device))
        # Fisher of the original from single generated samples of every class (no label dropout)
        labels = torch.arange(loss.num_classes).repeat(math.ceil(hp["fisher_samples"] / loss.num_classes))
        labels = labels[: hp["fisher_samples"]]
        images = sample(self.model, labels, self.image_shape, scheduler=loss.scheduler, steps=hp["sample_steps"],
                        guidance=hp["sample_guidance"], null_label=loss.null_label, generator=gen)
        singles = [(images[i: i + 1].to(device), labels[i: i + 1].to(device)) for i in range(len(labels))]
        fisher = fisher_diagonal(self.model, singles, loss.with_options(label_dropout=0.0))
        self.fisher = [fisher[n] for n, p in self.model.named_parameters() if p.requires_grad]

    def step(self, i, data):
        hp = self.hparams
        loss_fn = self.loss_fn
        n = self.batch_size
        device = self.replay[0].device
        noise_images = torch.rand((n, *self.image_shape)).to(device) * 2 - 1
        forget = loss_fn.with_options(label_dropout=0.0)(
            self.model, noise_images, torch.full((n,), self.forget_class, dtype=torch.long, device=device)).mean()
        pick = torch.randint(0, self.replay[0].shape[0], (n,)).to(device)
        replay = loss_fn(self.model, self.replay[0][pick], self.replay[1][pick]).mean()
        params = [p for p in self.model.parameters() if p.requires_grad]
        ewc = sum((f * (p - a).square()).sum() for f, p, a in zip(self.fisher, params, self.anchor))
        self.descend(forget + hp["replay_weight"] * replay + hp["ewc_weight"] * ewc)
        self.scheduler.step()
        return {"forget_loss": forget.detach(), "remain_loss": replay.detach(), "ewc": ewc.detach()}

    def state_dict(self):
        return {**super().state_dict(), "forget_class": self.forget_class, "image_shape": list(self.image_shape),
                "batch_size": self.batch_size, "replay": list(self.replay), "fisher": self.fisher,
                "anchor": self.anchor}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.forget_class, self.batch_size = state["forget_class"], state["batch_size"]
        self.image_shape = tuple(state["image_shape"])
        self.replay, self.fisher, self.anchor = tuple(state["replay"]), state["fisher"], state["anchor"]


METHODS = {cls.name: cls for cls in (Train, FineTune, GradientAscent, RandomLabel, SalUn, SCRUB, SFRonMethod,
                                     SelectiveAmnesia)}


def make_method(name: str, **hparams) -> Method:
    """A method by name with hyperparameters (the others keep their defaults)."""
    if name not in METHODS:
        raise ValueError(f"Invalid method: {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**hparams)
