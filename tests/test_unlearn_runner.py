"""The unlearning runner: the official loop, exact resume, checkpoints, logging, argument checks."""

import io
import math
import os
import signal
import zipfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sfron_ops import AdaptiveLoss, SFRon, fisher_diagonal, saliency_mask
from sfron_ops.unlearn import METHODS, make_method, run
from sfron_ops.unlearn import runner as R
from sfron_ops.unlearn.checkpoints import CheckpointError
from sfron_ops.unlearn.data import TensorLoader

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed=0, n=96, n_forget=16, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return (x[:n_forget], y[:n_forget]), (x[n_forget:], y[n_forget:])


def _loaders(kind="tensor", seed=0):
    (xf, yf), (xr, yr) = _data(seed)
    if kind == "tensor":
        return TensorLoader(xf, yf, 8, shuffle=True, seed=1), TensorLoader(xr, yr, 16, shuffle=True, seed=2)
    # torch DataLoaders that shuffle with the global generator
    return (DataLoader(TensorDataset(xf, yf), batch_size=8, shuffle=True),
            DataLoader(TensorDataset(xr, yr), batch_size=16, shuffle=True))


def _model(seed=0, dropout=0.2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Dropout(dropout), nn.Linear(24, 3))


SMALL = {
    "train": dict(iterations=9, lr=0.05),
    "ft": dict(iterations=9, lr=0.05),
    "ga": dict(iterations=9, lr=0.01),
    "rl": dict(iterations=9, lr=0.05),
    "salun": dict(iterations=9, lr=0.05, density=0.5),
    "scrub": dict(iterations=9, lr=0.05),
    "sfron": dict(iterations=9, lr=0.05, forget_freq=2, forget_alpha=5.0, max_grad_norm=2.0),
}


def test_every_method_has_a_small_config():
    # "sa" unlearns diffusion models only; tests/test_unlearn_generation.py runs it
    assert set(SMALL) == set(METHODS) - {"sa"}


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _loaders_with_zero_losses(model):
    """The tensor loaders, with three forget samples the model fits so well that their float32 loss is exactly 0."""
    (xf, yf), (xr, yr) = _data(0)
    xf, yf = xf.clone(), yf.clone()
    xf[:3] *= 300
    with torch.no_grad():
        model.eval()
        yf[:3] = model(xf[:3]).argmax(1)
        assert int((nn.functional.cross_entropy(model(xf), yf, reduction="none") == 0).sum()) >= 2
        model.train()
    return TensorLoader(xf, yf, 8, shuffle=True, seed=1), TensorLoader(xr, yr, 16, shuffle=True, seed=2)


def _plain_loop(n, ff, alpha, lr, loss_floor, data):
    """The README's loop: Fisher, ratio mask, SFRon, AdaptiveLoss; ``loss_floor="default"`` leaves it out."""
    ce = nn.CrossEntropyLoss(reduction="none")
    model = _model(dropout=0.0)
    forget, remain = data(model)
    fisher_f = fisher_diagonal(model, forget, ce)
    fisher_r = fisher_diagonal(model, remain, ce)
    masks = saliency_mask(fisher_f, fisher_r, gamma=1.0).masks
    opt = SFRon(model.named_parameters(), mask=masks, lr=lr, momentum=0.9, weight_decay=5e-4, forget_alpha=alpha,
                max_grad_norm=7.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n)
    adaptive = AdaptiveLoss(ce, lambd=0.5) if loss_floor == "default" else AdaptiveLoss(ce, 0.5, loss_floor)

    def cycle(loader):
        while True:
            yield from loader

    fit, rit = cycle(forget), cycle(remain)
    for i in range(n):
        model.train()
        if i % ff == 0:
            for group in opt.param_groups:
                group["forget_alpha"] = alpha * (1 + math.cos(math.pi * i / n)) / 2
            x, y = next(fit)
            opt.zero_grad()
            adaptive(model(x), y).backward()
            opt.step(phase="forget")
        x, y = next(rit)
        opt.zero_grad()
        ce(model(x), y).mean().backward()
        opt.step()
        sched.step()
    return model, masks


@pytest.mark.filterwarnings("ignore::sfron_ops.ZeroForgetLossWarning")
@pytest.mark.parametrize("loss_floor", [None, "default"])
def test_sfron_method_is_the_plain_loop(loss_floor):
    """The runner's "sfron" reproduces the README's loop bit for bit, with the official weights (loss_floor=None)
    and with both defaults, on forget batches that hold samples of loss exactly 0."""
    n, ff, alpha, lr = 12, 3, 8.0, 0.05
    model, masks = _plain_loop(n, ff, alpha, lr, loss_floor, _loaders_with_zero_losses)
    twin = _model(dropout=0.0)
    forget, remain = _loaders_with_zero_losses(twin)
    floor = {} if loss_floor == "default" else {"loss_floor": loss_floor}
    res = run("sfron", twin, forget, remain, iterations=n, forget_freq=ff, forget_alpha=alpha, lr=lr,
              max_grad_norm=7.0, progress=False, **floor)
    assert res.completed and res.iterations == n
    assert torch.equal(_flat(model), _flat(twin))
    kept = sum(int(m.sum()) for m in masks.values())
    assert res.info["mask_kept"] == kept and 0 < kept < res.info["mask_total"]
    assert res.info["forget_zero_losses_seen"] > 0
    assert res.history[-1]["forget_alpha"] == pytest.approx(alpha * (1 + math.cos(math.pi * 9 / n)) / 2)
    other, _ = _plain_loop(n, ff, alpha, lr, "default" if loss_floor is None else None, _loaders_with_zero_losses)
    assert not torch.equal(_flat(other), _flat(twin))  # the floor matters on these batches


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_resume_continues_identically(tmp_path, name, kind):
    """Stop after 4 of 9 iterations, resume with a fresh model, fresh loaders and a disturbed global RNG:
    the result is bitwise that of an uninterrupted run."""
    ckpt = str(tmp_path / "run.pt")

    torch.manual_seed(123)
    whole = _model()
    forget, remain = _loaders(kind)
    full = run(name, whole, forget, remain, progress=False, log_every=3, **SMALL[name])

    torch.manual_seed(123)
    part = _model()
    forget, remain = _loaders(kind)
    first = run(name, part, forget, remain, progress=False, checkpoint=ckpt, stop_after=4, log_every=3,
                **SMALL[name])
    assert not first.completed and first.iterations == 4

    torch.manual_seed(999)  # whatever happened in between
    resumed_model = _model(seed=7)
    forget, remain = _loaders(kind)
    if kind == "dataloader":
        for _ in forget:  # a loader that was used before resuming
            pass
    second = run(name, resumed_model, forget, remain, progress=False, checkpoint=ckpt, resume=True, log_every=3,
                 **SMALL[name])
    assert second.completed and second.resumed_from == 4
    assert torch.equal(_flat(resumed_model), _flat(whole))
    # the record of iterations 4-6 straddles the stop
    assert [h["iteration"] for h in second.history] == [h["iteration"] for h in full.history] == [3, 6, 9]
    for a, b in zip(second.history, full.history):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), k
    # the forget monitor goes on from the checkpoint too, bit for bit
    assert len(second.monitor) == len(full.monitor) == (0 if name in ("train", "ft") else len(full.monitor) or -1)
    assert second.monitor.state_dict() == full.monitor.state_dict()
    assert second.info.get("forget_stalled") == full.info.get("forget_stalled")


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    ckpt = str(tmp_path / "done.pt")
    model = _model()
    res = run("sfron", model, *_loaders(), progress=False, checkpoint=ckpt, **SMALL["sfron"])
    other = _model(seed=5)
    again = run("sfron", other, *_loaders(), progress=False, checkpoint=ckpt, resume=True, **SMALL["sfron"])
    assert again.completed and again.resumed_from == 9
    assert torch.equal(_flat(model), _flat(other))
    assert again.seconds == pytest.approx(res.seconds)


def test_resume_refuses_a_different_configuration(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    run("sfron", _model(), *_loaders(), progress=False, checkpoint=ckpt, stop_after=2, **SMALL["sfron"])
    changed = dict(SMALL["sfron"], forget_alpha=6.0)
    with pytest.raises(CheckpointError, match="hparams.forget_alpha=5.0 there, hparams.forget_alpha=6.0 here"):
        run("sfron", _model(), *_loaders(), progress=False, checkpoint=ckpt, resume=True, **changed)
    with pytest.raises(CheckpointError, match="method='sfron' there, method='ft' here"):
        run("ft", _model(), *_loaders(), progress=False, checkpoint=ckpt, resume=True, **SMALL["ft"])


def test_resume_refuses_another_checkpoint_key(tmp_path):
    """The caller's key (data, forget set, ...) is part of what a checkpoint must match; nested entries are
    named by their dotted path."""
    ckpt = str(tmp_path / "run.pt")
    key = {"seed": 0, "forget": {"fraction": 0.1, "set": "ab12"}}
    run("ft", _model(), None, _loaders()[1], progress=False, checkpoint=ckpt, checkpoint_key=key, stop_after=2,
        **SMALL["ft"])
    other = {"seed": 0, "forget": {"fraction": 0.11, "set": "cd34"}}
    with pytest.raises(CheckpointError, match=r"forget.fraction=0.1 there, forget.fraction=0.11 here; "
                                              r"forget.set='ab12' there, forget.set='cd34' here") as err:
        run("ft", _model(), None, _loaders()[1], progress=False, checkpoint=ckpt, checkpoint_key=other, resume=True,
            **SMALL["ft"])
    assert [d[0] for d in err.value.differences] == ["forget.fraction", "forget.set"]
    res = run("ft", _model(), None, _loaders()[1], progress=False, checkpoint=ckpt, checkpoint_key=dict(key),
              resume=True, **SMALL["ft"])
    assert res.resumed_from == 2 and res.completed


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated", "flipped", "foreign"])
def test_resume_refuses_an_unreadable_checkpoint(tmp_path, content):
    ckpt = tmp_path / "run.pt"
    if content in ("truncated", "flipped"):
        run("ft", _model(), None, _loaders()[1], progress=False, checkpoint=str(ckpt), stop_after=2, **SMALL["ft"])
        raw = bytearray(ckpt.read_bytes())
        if content == "flipped":  # zero 8 bytes in the middle of the largest tensor
            with zipfile.ZipFile(ckpt) as archive:
                record = max(archive.infolist(), key=lambda r: r.file_size)
            name_and_extra = int.from_bytes(raw[record.header_offset + 26:record.header_offset + 28], "little") + \
                int.from_bytes(raw[record.header_offset + 28:record.header_offset + 30], "little")
            middle = record.header_offset + 30 + name_and_extra + record.file_size // 2
            raw[middle:middle + 8] = bytes(8)
        ckpt.write_bytes(bytes(raw[:-100] if content == "truncated" else raw))
        if content == "flipped":
            assert torch.load(ckpt, weights_only=True)["iteration"] == 2  # torch.load alone takes it as it is
    elif content == "foreign":
        torch.save({"model": _model().state_dict()}, ckpt)
    else:
        ckpt.write_bytes(content)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} (cannot be read|was not written by)") as err:
        run("ft", _model(), None, _loaders()[1], progress=False, checkpoint=str(ckpt), resume=True, **SMALL["ft"])
    assert ckpt.read_bytes() == before
    if content == "flipped":
        assert "fails its checksum" in str(err.value)


def test_ctrl_c_stops_at_an_iteration_boundary_and_resumes_exactly(tmp_path):
    """A SIGINT during the loop is held until the iteration ends; the run saves its checkpoint there and raises
    RunInterrupted; resuming from it ends bitwise where an uninterrupted run ends."""
    torch.manual_seed(123)
    whole = _model()
    full = run("sfron", whole, *_loaders(), progress=False, log_every=3, **SMALL["sfron"])

    def interrupt(i, model):
        if i == 3:
            os.kill(os.getpid(), signal.SIGINT)

    ckpt = str(tmp_path / "run.pt")
    torch.manual_seed(123)
    with pytest.raises(R.RunInterrupted) as err:
        run("sfron", _model(), *_loaders(), progress=False, log_every=3, checkpoint=ckpt, callback=interrupt,
            **SMALL["sfron"])
    assert isinstance(err.value, KeyboardInterrupt) and (err.value.iteration, err.value.checkpoint) == (4, ckpt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == 4 and len(saved["monitor"]["losses"]) > 0  # the forget steps before the stop
    resumed = _model(seed=7)
    res = run("sfron", resumed, *_loaders(), progress=False, log_every=3, checkpoint=ckpt, resume=True,
              **SMALL["sfron"])
    assert res.resumed_from == 4 and torch.equal(_flat(resumed), _flat(whole))
    assert res.monitor.state_dict() == full.monitor.state_dict()


def test_periodic_checkpoints(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    seen = []
    run("ft", _model(), None, _loaders()[1], progress=False, checkpoint=ckpt, checkpoint_every=3, log_every=3,
        callback=lambda i, m: seen.append(torch.load(ckpt, weights_only=True)["iteration"] if i > 3 else i),
        **SMALL["ft"])
    # the callback runs after the record and before the save of the same boundary
    assert seen == [3, 3, 6]
    assert torch.load(ckpt, weights_only=True)["iteration"] == 9


def test_callback_results_join_the_history_and_survive_a_resume(tmp_path):
    """What the callback measures is part of the record, so a run resumed from a checkpoint reports the
    measurements made before the stop too."""
    def measure(i, model):
        return {"norm": float(_flat(model).norm())}

    whole = run("sfron", _model(), *_loaders(), progress=False, log_every=3, callback=measure, **SMALL["sfron"])
    assert [h["iteration"] for h in whole.history if "norm" in h] == [3, 6, 9]
    ckpt = str(tmp_path / "run.pt")
    run("sfron", _model(), *_loaders(), progress=False, log_every=3, callback=measure, checkpoint=ckpt, stop_after=4,
        **SMALL["sfron"])
    resumed = run("sfron", _model(seed=7), *_loaders(), progress=False, log_every=3, callback=measure,
                  checkpoint=ckpt, resume=True, **SMALL["sfron"])
    assert resumed.resumed_from == 4
    def norms(res):
        return [(h["iteration"], h["norm"]) for h in res.history]

    assert norms(resumed) == norms(whole)


def test_history_logs_forget_and_remain_loss_and_accuracy():
    calls = []
    res = run("sfron", _model(), *_loaders(), progress=False, log_every=3, callback=lambda i, m: calls.append(i),
              **SMALL["sfron"])
    assert [h["iteration"] for h in res.history] == [3, 6, 9] == calls
    for h in res.history:
        assert {"remain_loss", "remain_acc", "forget_loss", "forget_acc", "lr", "forget_alpha"} <= h.keys()
        assert 0.0 <= h["remain_acc"] <= 100.0
    assert res.seconds > 0


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert R._default_progress() is False
    monkeypatch.undo()
    run("ft", _model(), None, _loaders()[1], progress=True, desc="bar-test", **SMALL["ft"])
    assert "bar-test" in capsys.readouterr().err


def test_argument_errors():
    forget, remain = _loaders()
    with pytest.raises(ValueError, match="needs a forget_loader"):
        run("sfron", _model(), None, remain, progress=False)
    with pytest.raises(ValueError, match="unknown hyperparameter 'alpha'"):
        run("sfron", _model(), forget, remain, alpha=3.0)
    with pytest.raises(ValueError, match="Invalid method: 'nope'"):
        run("nope", _model(), forget, remain)
    with pytest.raises(ValueError, match="reduction='none'"):
        run("ft", _model(), None, remain, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        run("ft", _model(), None, remain, resume=True)
    with pytest.raises(TypeError, match="Method instance"):
        run(make_method("ft"), _model(), None, remain, lr=0.1)
    with pytest.raises(ValueError, match="Invalid iterations: 0"):
        make_method("ft", iterations=0)
    with pytest.raises(ValueError, match="Invalid lr: -1"):
        make_method("sfron", lr=-1)
    with pytest.raises(ValueError, match="the remain loader is empty"):
        run("ft", _model(), None, [], progress=False, iterations=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sfron", "rl"])
def test_resume_on_cuda(tmp_path, name):
    ckpt = str(tmp_path / "run.pt")
    torch.manual_seed(123)
    whole = _model().cuda()
    run(name, whole, *_loaders(), progress=False, **SMALL[name])
    torch.manual_seed(123)
    part = _model().cuda()
    run(name, part, *_loaders(), progress=False, checkpoint=ckpt, stop_after=4, **SMALL[name])
    torch.manual_seed(999)
    resumed = _model(seed=7).cuda()
    res = run(name, resumed, *_loaders(), progress=False, checkpoint=ckpt, resume=True, **SMALL[name])
    assert res.completed and next(resumed.parameters()).is_cuda
    torch.testing.assert_close(_flat(resumed), _flat(whole), rtol=1e-6, atol=1e-7)
