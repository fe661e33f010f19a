"""The unlearning runner: one loop for every method, with progress, logging, checkpoints and exact resume.

``run(method, model, forget_loader, remain_loader)`` drives a :class:`~sfron_ops.unlearn.methods.Method`
for its ``iterations``. Loaders are cycled; the runner remembers how far each one got, so a run
resumed from a checkpoint draws the same batches, the same random numbers and ends with the
same parameters as a run that never stopped.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..monitor import ForgetMonitor
from . import checkpoints

log = logging.getLogger("sfron_ops.unlearn")


# ---------------------------------------------------------------------------------------------- RNG states
def _np_state_to_plain(state):
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _np_state_from_plain(plain):
    name, keys, pos, has_gauss, cached = plain
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached


def _py_state_to_plain(state):
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _py_state_from_plain(plain):
    version, internal, gauss = plain
    return version, tuple(int(v) for v in internal.tolist()), gauss


def rng_state() -> dict:
    """Every global random state a training step may draw from (torch CPU and CUDA, numpy, ``random``)."""
    state = {"torch": torch.get_rng_state(), "numpy": _np_state_to_plain(np.random.get_state()),
             "python": _py_state_to_plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_state_from_plain(state["numpy"]))
    random.setstate(_py_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _loader_generators(loader):
    """The private generators a loader may shuffle with (its own, its sampler's), without duplicates."""
    gens = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None),
                                                                      "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


# ---------------------------------------------------------------------------------------------- batches
class _Stream:
    """An endless iterator over a loader that can say where it is and go back there.

    Before each pass over the loader it records the random states the loader may draw from;
    restoring replays the pass up to the same position from those states.
    """

    def __init__(self, name, loader):
        self.name = name
        self.loader = loader
        self.epoch = 0
        self.position = 0
        self._iterator = None
        self._start_state = None

    def _start(self):
        self._start_state = {"global": rng_state(), "generators": [g.get_state() for g in
                                                                   _loader_generators(self.loader)]}
        self._iterator = iter(self.loader)
        self.position = 0

    def next(self):
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.position == 0:
                raise ValueError(f"the {self.name} loader is empty") from None
            self.epoch += 1
            self._start()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"the {self.name} loader is empty") from None
        self.position += 1
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "start_state": self._start_state}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]
        self._iterator = None
        self._start_state = None
        self.position = 0
        if state["start_state"] is None:
            return
        set_rng_state(state["start_state"]["global"])
        gens = _loader_generators(self.loader)
        saved = state["start_state"]["generators"]
        if len(gens) != len(saved):
            raise ValueError(f"the {self.name} loader has {len(gens)} generators but the checkpoint saved {len(saved)}")
        for g, s in zip(gens, saved):
            g.set_state(s)
        self._start()
        for _ in range(state["position"]):
            next(self._iterator)
        self.position = state["position"]


def _to_device(x, device):
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


class Batches:
    """What a method sees of the data: ``next("forget")``, ``next("remain")`` and the raw ``loader(name)``."""

    def __init__(self, loaders: dict, device):
        self.loaders = {k: v for k, v in loaders.items() if v is not None}
        self.device = device
        self.streams = {k: _Stream(k, v) for k, v in self.loaders.items()}

    def next(self, which: str):
        if which not in self.streams:
            raise ValueError(f"this run has no {which} loader")
        batch = self.streams[which].next()
        return _to_device(batch[0], self.device), _to_device(batch[1], self.device)

    def loader(self, which: str):
        if which not in self.loaders:
            raise ValueError(f"this run has no {which} loader")
        return self.loaders[which]

    def state_dict(self):
        return {k: s.state_dict() for k, s in self.streams.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.streams):
            raise ValueError(f"the checkpoint has loaders {sorted(state)} but this run has {sorted(self.streams)}")
        for k, s in self.streams.items():
            s.load_state_dict(state[k])


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class RunResult:
    """What :func:`run` returns. ``seconds`` is the wall time of the unlearning itself (RTE):
    the one-off preparation (Fisher, masks) and the loop, summed over resumes, without
    checkpoint writing, logging or callbacks."""

    model: nn.Module
    method: str
    hparams: dict
    iterations: int
    completed: bool
    seconds: float
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    resumed_from: int | None = None
    monitor: ForgetMonitor | None = None


def _default_progress() -> bool:
    return sys.stderr.isatty()


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class RunInterrupted(KeyboardInterrupt):
    """A Ctrl-C that stopped :func:`run` (``desc``, or the method's name): ``iteration`` of ``iterations`` were
    done and, when ``checkpoint`` is not None, saved there (run again with ``resume=True`` to continue)."""

    def __init__(self, desc: str, iteration: int, iterations: int, checkpoint: str | None):
        where = f", saved to {checkpoint}" if checkpoint else ""
        super().__init__(f"{desc} stopped after iteration {iteration}/{iterations}{where}")
        self.desc, self.iteration, self.iterations, self.checkpoint = desc, iteration, iterations, checkpoint


class _InterruptHold:
    """From construction to :meth:`release`, hold a Ctrl-C (SIGINT) back as ``requested`` so that the loop
    stops at an iteration boundary, where the state is whole and can be saved; a second Ctrl-C interrupts
    at once. Only where Python's own handler is installed (the main thread, no handler of the caller's)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def release(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def run(method, model: nn.Module, forget_loader=None, remain_loader=None, *, loss_fn=None, device=None,
        seed: int | None = None, checkpoint: str | None = None, checkpoint_every: int | None = None,
        checkpoint_key: dict | None = None, resume: bool = False, stop_after: int | None = None,
        progress: bool | None = None, log_every: int | None = None, desc: str | None = None, callback=None,
        forget_monitor=None,
        **hparams) -> RunResult:
    """Run ``method`` on ``model`` in place and return a :class:`RunResult`.

    Args:
        method: a :class:`~sfron_ops.unlearn.methods.Method`, or its name (``"sfron"``, ``"ft"``,
            ``"ga"``, ``"rl"``, ``"salun"``, ``"scrub"``, ``"train"``) with ``**hparams``.
        model: the model to unlearn (changed in place; the returned ``model`` is the same object).
        forget_loader, remain_loader: iterables of ``(inputs, targets)`` batches, cycled as needed.
        loss_fn: per-sample loss ``loss_fn(output, target)`` (``reduction="none"``); cross-entropy by default.
        device: where batches go (default: the model's device).
        seed: seed the global random generators before a fresh start (not on resume).
        checkpoint: file to save to every ``checkpoint_every`` iterations, at the end, and on Ctrl-C.
        checkpoint_key: what else determines the run besides the method and its hyperparameters (data,
            forget set, seed, model, ...), as a nested dict of plain values; saved with the checkpoint.
        resume: continue from ``checkpoint`` if it exists (the run then ends exactly as an uninterrupted one).
            A checkpoint of another method, other hyperparameters or another ``checkpoint_key`` is refused
            with a :class:`~sfron_ops.unlearn.checkpoints.CheckpointError` naming what differs.
        stop_after: stop once this many iterations are done (the checkpoint is saved), e.g. to split a job.
        progress: show a tqdm bar (default: when stderr is a terminal).
        log_every: record the mean forget/remain loss and accuracy every this many iterations
            (default: about 20 records per run); records go to ``history`` and the ``sfron_ops.unlearn`` logger.
        callback: ``callback(iteration, model)`` after each record, e.g. for evaluation (not timed); a dict it
            returns joins the record (and so the history and the checkpoint).
        forget_monitor: a :class:`~sfron_ops.monitor.ForgetMonitor` fed with every forget step's loss and
            accuracy (default: a new one, which warns if SFR-on's forget loss has not doubled after 10 forget
            steps; ``False``: none). The progress bar shows its first and latest forget loss; ``result.monitor``
            holds it and ``result.info["forget_stalled"]`` its verdict. Its records are saved with the
            checkpoint and restored on resume. With a loss that runs the model (a diffusion model's
            ε-loss, ``loss_fn.takes_model``) the default one records and shows the forget loss but gives no
            verdict (``rise=None``): its rule reads a classifier's forget loss.

    A Ctrl-C during the loop stops the run at the end of the current iteration, saves the checkpoint
    (if any) and raises :class:`RunInterrupted`, a ``KeyboardInterrupt``; a second Ctrl-C stops at once.
    """
    from .methods import Method, make_method

    if isinstance(method, str):
        method = make_method(method, **hparams)
    elif hparams:
        raise TypeError(f"hyperparameters {sorted(hparams)} given with a Method instance; set them on the method")
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method or a method name, got {type(method).__name__}")
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(reduction="none")
    if getattr(loss_fn, "reduction", "none") != "none":
        raise ValueError(f"loss_fn must return per-sample losses (reduction='none'), got "
                         f"reduction={loss_fn.reduction!r}")
    loaders = {"forget": forget_loader, "remain": remain_loader}
    for need in method.needs:
        if loaders[need] is None:
            raise ValueError(f"method {method.name!r} needs a {need}_loader")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    method.plan({k: v for k, v in loaders.items() if v is not None})
    n = method.iterations
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0):
        raise ValueError(f"Invalid stop_after: {stop_after!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"Invalid checkpoint_every: {checkpoint_every!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    if log_every is None:
        log_every = max(1, n // 20)
    if progress is None:
        progress = _default_progress()

    if forget_monitor is None:
        # its rule (a forget loss that doubles) is a classifier's: a diffusion model's ε-loss (a loss that runs the
        # model) is recorded and shown, not judged
        judge = not getattr(loss_fn, "takes_model", False)
        forget_monitor = ForgetMonitor(rise=2.0 if judge else None, warn=method.forget_advice is not None,
                                       advice=method.forget_advice)
    elif forget_monitor is not False and not isinstance(forget_monitor, ForgetMonitor):
        raise TypeError(f"forget_monitor must be a ForgetMonitor, None or False, got {type(forget_monitor).__name__}")
    monitor = None if forget_monitor is False else forget_monitor

    data = Batches(loaders, device)
    start, history, elapsed, resumed_from = 0, [], 0.0, None
    saved = None
    key = checkpoints.run_key(method, checkpoint_key)
    if resume and os.path.exists(checkpoint):
        saved = checkpoints.read(checkpoint, key)
    model.train()
    if saved is not None:
        model.load_state_dict(saved["model"])
        method.setup(model, loss_fn, data, fresh=False)
        method.load_state_dict(saved["method"])
        data.load_state_dict(saved["data"])
        set_rng_state(saved["rng"])
        start, history, elapsed = saved["iteration"], saved["history"], saved["seconds"]
        if monitor is not None and saved.get("monitor") is not None:
            monitor.load_state_dict(saved["monitor"])
        resumed_from = start
        log.info("%s: resumed from %s at iteration %d/%d", method.name, checkpoint, start, n)
    else:
        if seed is not None:
            seed_everything(seed)
        _sync(device)
        t0 = time.perf_counter()
        method.setup(model, loss_fn, data, fresh=True)
        _sync(device)
        elapsed += time.perf_counter() - t0

    finished = bool(saved is not None and saved.get("finished"))

    def save(iteration):
        checkpoints.save({"version": checkpoints.VERSION, "key": key, "iteration": iteration, "finished": finished,
                          "model": model.state_dict(), "method": method.state_dict(), "data": data.state_dict(),
                          "rng": rng_state(), "history": history, "seconds": elapsed,
                          "monitor": None if monitor is None else monitor.state_dict(),
                          # the record being accumulated, so that a resumed history matches an uninterrupted one
                          "window": {k: (float(v), counts[k]) for k, v in sums.items()}}, checkpoint)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=start, desc=desc or method.name, leave=False, dynamic_ncols=True)
    sums: dict = {}
    counts: dict = {}
    if saved is not None:
        for k, (total, count) in saved.get("window", {}).items():
            sums[k], counts[k] = total, count
    end = n if stop_after is None else min(n, stop_after)
    i = start
    hold = _InterruptHold()
    try:
        t0 = time.perf_counter()
        while i < end:
            model.train()
            record = method.step(i, data)
            if monitor is not None and "forget_loss" in record:
                monitor.record(record["forget_loss"], record.get("forget_acc"))
            for k, v in record.items():
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
                counts[k] = counts.get(k, 0) + 1
            i += 1
            if bar is not None:
                bar.update(1)
            boundary_log = i % log_every == 0 or i == n
            boundary_ckpt = checkpoint is not None and checkpoint_every is not None and i % checkpoint_every == 0
            stop = hold.requested
            if boundary_log or boundary_ckpt or i == end or stop:
                _sync(device)
                elapsed += time.perf_counter() - t0
                if boundary_log and sums:
                    entry = {"iteration": i, **method.schedule_state()}
                    entry.update({k: float(sums[k]) / counts[k] for k in sums})
                    history.append(entry)
                    sums, counts = {}, {}
                    log.info("%s %d/%d %s", method.name, i, n, " ".join(
                        f"{k}={v:.4g}" for k, v in entry.items() if k != "iteration" and isinstance(v, float)))
                    if bar is not None:
                        shown = {k: f"{v:.3g}" for k, v in entry.items() if k in ("remain_loss", "remain_acc")}
                        bar.set_postfix({**(monitor.postfix() if monitor is not None else {}), **shown})
                    if callback is not None:
                        entry.update(callback(i, model) or {})  # kept in the history, so a resumed run has it
                if checkpoint is not None and (boundary_ckpt or i == end or stop):
                    save(i)
                if stop:
                    raise RunInterrupted(desc or method.name, i, n, checkpoint)
                t0 = time.perf_counter()
    except Exception:
        if hold.requested:  # e.g. DataLoader workers that the same Ctrl-C stopped: the last save stands
            raise RunInterrupted(desc or method.name, i, n, None) from None
        raise
    finally:
        hold.release()
        if bar is not None:
            bar.close()
    completed = i >= n
    if completed and not finished:
        t0 = time.perf_counter()
        method.finish(model)
        _sync(device)
        elapsed += time.perf_counter() - t0
        finished = True
        if checkpoint is not None:
            save(i)
    info = method.info()
    if monitor is not None and len(monitor) and monitor.rise is not None:
        monitor.check()
        info["forget_stalled"] = monitor.stalled
    return RunResult(model=model, method=method.name, hparams=dict(method.hparams), iterations=i, completed=completed,
                     seconds=elapsed, history=history, info=info, resumed_from=resumed_from, monitor=monitor)


def fmt_seconds(s: float) -> str:
    return f"{s:.2f}s" if s < 120 else f"{s / 60:.1f}min"


__all__ = ["run", "RunResult", "RunInterrupted", "Batches", "rng_state", "set_rng_state", "seed_everything",
           "fmt_seconds"]
