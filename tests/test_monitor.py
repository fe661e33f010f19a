"""ForgetMonitor: forget loss and accuracy per forget step, and the warning when the loss does not rise."""

import io
import math
import warnings

import pytest
import torch
from torch import nn

from sfron_ops import ForgetMonitor, ForgettingStalledWarning
from sfron_ops.unlearn import run
from sfron_ops.unlearn.data import TensorLoader

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_rising_loss_is_no_stall():
    monitor = ForgetMonitor(patience=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for loss in (0.05, 0.2, 0.5, 1.0, 2.0, 3.0, 3.0, 4.0):
            monitor.record(loss, 100.0)
    assert len(monitor) == 8 and not monitor.stalled and monitor.check()
    assert monitor.summary() == {"forget_steps": 8, "first_loss": 0.05, "loss": 4.0, "stalled": False,
                                 "first_acc": 100.0, "acc": 100.0}


def test_a_flat_loss_warns_once_after_patience_steps_and_names_the_knobs():
    monitor = ForgetMonitor(patience=5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(4):
            monitor.record(0.06 + 0.001 * i, 100.0)
        assert not seen and not monitor.stalled  # no verdict before `patience` forget steps
        for _ in range(11):
            monitor.record(0.07, 98.0)
    assert [w.category for w in seen] == [ForgettingStalledWarning]  # once, although every check finds a stall
    text = str(seen[0].message)
    assert "not risen in 5 forget steps" in text and "0.06 at the first" in text and "forget accuracy 98.0 %" in text
    assert "forget_alpha" in text and "forget_freq" in text
    assert monitor.stalled and monitor.postfix() == {"forget": "0.06→0.07", "forget_acc": "98", "note": "not rising"}
    for _ in range(5):  # it can recover
        monitor.record(0.5)
    assert not monitor.stalled and "note" not in monitor.postfix()


def test_rise_and_window():
    # the latest ceil(patience / 4) = 2 records are averaged and compared with rise x the first
    monitor = ForgetMonitor(patience=8, rise=3.0, warn=False)
    for loss in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 4.1):
        monitor.record(torch.tensor(loss))  # tensors stay tensors until the check
    assert not monitor.stalled  # (2 + 4.1) / 2 = 3.05 > 3
    monitor = ForgetMonitor(patience=8, rise=3.0, warn=False)
    for loss in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.9):
        monitor.record(loss)
    assert monitor.stalled


def test_zero_and_non_finite_losses():
    stuck = ForgetMonitor(patience=2, warn=False)
    for _ in range(2):
        stuck.record(0.0)
    assert stuck.stalled  # 0 that stays 0 has not risen
    diverged = ForgetMonitor(patience=2, warn=False)
    diverged.record(0.1)
    diverged.record(math.nan)
    assert not diverged.stalled


def test_update_from_the_model_output():
    monitor = ForgetMonitor(patience=100)
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]], requires_grad=True)
    target = torch.tensor([0, 1, 1, 1])
    monitor.update(logits, target)
    s = monitor.summary()
    assert s["loss"] == pytest.approx(nn.functional.cross_entropy(logits, target).item())
    assert s["acc"] == 75.0
    monitor.update(torch.randn(3, 2), torch.randn(3, 2), loss=torch.tensor(1.5))  # regression: no accuracy
    assert monitor.summary()["loss"] == 1.5 and "acc" not in monitor.summary()


def test_state_dict_round_trip():
    monitor = ForgetMonitor(patience=2, warn=False)
    for loss in (torch.tensor(0.1), 0.1):
        monitor.record(loss, torch.tensor(50.0))
    other = ForgetMonitor(patience=2, warn=False)
    other.load_state_dict(monitor.state_dict())
    assert other.summary() == monitor.summary() and other.stalled


def test_rise_none_records_without_a_verdict():
    monitor = ForgetMonitor(patience=2, rise=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            monitor.record(0.07, 98.0)
    assert len(monitor) == 6 and not monitor.stalled and monitor.check()
    assert monitor.postfix() == {"forget": "0.07→0.07", "forget_acc": "98"}


@pytest.mark.parametrize("bad", [dict(patience=0), dict(patience=2.0), dict(rise=0.5), dict(rise=math.inf)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match=f"Invalid {next(iter(bad))}"):
        ForgetMonitor(**bad)


def _task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g)
    y = torch.randint(0, 3, (120,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):  # memorise everything, the forget set included
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, TensorLoader(x[:20], y[:20], 20), TensorLoader(x[20:], y[20:], 50)


def test_runner_warns_when_sfron_does_not_forget_and_shows_it_in_the_bar(monkeypatch):
    model, forget, remain = _task()
    bar = io.StringIO()
    monkeypatch.setattr("sys.stderr", bar)
    with pytest.warns(ForgettingStalledWarning, match="forget_alpha"):
        res = run("sfron", model, forget, remain, iterations=30, forget_freq=2, forget_alpha=0.0, lr=0.01,
                  progress=True, log_every=10)
    assert res.info["forget_stalled"] is True and len(res.monitor) == 15
    assert "not rising" in bar.getvalue() and "forget=" in bar.getvalue()


def test_runner_stays_quiet_when_sfron_forgets():
    model, forget, remain = _task()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForgettingStalledWarning)
        res = run("sfron", model, forget, remain, iterations=30, forget_freq=2, forget_alpha=50.0, lr=0.05,
                  progress=False)
    s = res.monitor.summary()
    assert res.info["forget_stalled"] is False and s["loss"] > 2 * s["first_loss"]


class _RunsTheModel(nn.Module):
    """A per-sample loss that runs the model itself, as a diffusion model's ε-loss does (``takes_model``)."""

    reduction = "none"
    takes_model = True

    def forward(self, model, x, y):
        return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_runner_records_but_does_not_judge_a_loss_that_runs_the_model():
    """The doubling rule is a classifier's: with a diffusion-style loss the default monitor records the forget
    loss and shows it, and neither warns nor gives a verdict (the same run with cross-entropy warns)."""
    model, forget, remain = _task()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForgettingStalledWarning)
        res = run("sfron", model, forget, remain, loss_fn=_RunsTheModel(), iterations=30, forget_freq=2,
                  forget_alpha=0.0, lr=0.01, mask=False, progress=False)
    assert len(res.monitor) == 15 and res.monitor.rise is None and "forget_stalled" not in res.info
    with pytest.warns(ForgettingStalledWarning):
        run("sfron", _task()[0], forget, remain, iterations=30, forget_freq=2, forget_alpha=0.0, lr=0.01, mask=False,
            progress=False)


def test_runner_monitor_can_be_given_or_turned_off():
    model, forget, remain = _task()
    mine = ForgetMonitor(patience=3, warn=False)
    res = run("sfron", model, forget, remain, iterations=6, forget_freq=1, forget_alpha=0.0, progress=False,
              forget_monitor=mine)
    assert res.monitor is mine and len(mine) == 6 and mine.stalled
    res = run("sfron", model, forget, remain, iterations=2, progress=False, forget_monitor=False)
    assert res.monitor is None and "forget_stalled" not in res.info
    with pytest.raises(TypeError, match="forget_monitor must be"):
        run("sfron", model, forget, remain, iterations=2, progress=False, forget_monitor="yes")
