"""SFR-on in PyTorch Lightning manual optimisation: opt.step(phase="forget") through LightningOptimizer."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from models import INTEGRATION_KW, tiny_mlp  # noqa: E402
from torch.nn import functional as F  # noqa: E402

pl = pytest.importorskip("lightning.pytorch")

import sfron_ops  # noqa: E402
from sfron_ops.integrations import unwrap_optimizer  # noqa: E402
from sfron_ops.integrations.hf import ForgetRetainDataset  # noqa: E402  (framework-neutral pairing)
from sfron_ops.integrations.lightning import SFRonModule  # noqa: E402

ITERS = 6
BATCH = 8


def dataset():
    g = torch.Generator().manual_seed(1)
    forget = [(torch.randn(10, generator=g), int(torch.randint(0, 3, (), generator=g))) for _ in range(12)]
    retain = [(torch.randn(10, generator=g), int(torch.randint(0, 3, (), generator=g))) for _ in range(ITERS * BATCH)]
    return ForgetRetainDataset(forget, retain)


def masks_for(model):
    g = torch.Generator().manual_seed(2)
    return {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()}


class Unlearner(SFRonModule):
    def __init__(self):
        super().__init__(forget_freq=2, total_iterations=ITERS)
        self.net = tiny_mlp()
        self.phases = []

    def forward(self, x):
        return self.net(x)

    def forget_loss(self, batch):
        x, y = batch
        return sfron_ops.adaptive_cross_entropy(self(x), y)

    def remain_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = sfron_ops.SFRon(self.net.named_parameters(), mask=masks_for(self.net), **INTEGRATION_KW)
        opt.register_step_pre_hook(lambda o, a, k: self.phases.append(k.get("phase") or o.current_phase))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=ITERS)
        return {"optimizer": opt, "lr_scheduler": sched}


def trainer(tmp_path, **kw):
    return pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def plain_loop(autocast=False):
    model = tiny_mlp()
    opt = sfron_ops.SFRon(model.named_parameters(), mask=masks_for(model), **INTEGRATION_KW)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=ITERS)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else \
        (lambda: torch.autocast("cpu", enabled=False))
    for i, batch in enumerate(loader):
        if i % 2 == 0:
            for g in opt.param_groups:
                g["forget_alpha"] = 3.0 * (1 + math.cos(math.pi * i / ITERS)) / 2
            (xf, yf) = batch["forget"]
            with ctx():
                loss = sfron_ops.adaptive_cross_entropy(model(xf), yf)
            loss.backward()
            opt.step(phase="forget")
            opt.zero_grad()
        (xr, yr) = batch["retain"]
        with ctx():
            loss = F.cross_entropy(model(xr), yr)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_manual_optimisation_matches_the_plain_loop(tmp_path, precision):
    module = Unlearner()
    t = trainer(tmp_path, precision=precision)
    t.fit(module, torch.utils.data.DataLoader(dataset(), batch_size=BATCH))
    assert module.phases == ["forget", "remain", "remain"] * (ITERS // 2)
    assert module.sfron_iteration == ITERS and t.global_step == ITERS + ITERS // 2  # both phases count
    assert isinstance(unwrap_optimizer(t.optimizers[0]), sfron_ops.SFRon)
    expected = plain_loop(autocast=precision == "bf16-mixed")
    for a, b in zip(module.net.parameters(), expected):
        assert torch.equal(a.detach(), b)


def test_iteration_counter_survives_a_checkpoint(tmp_path):
    module = Unlearner()
    module.sfron_iteration, module._base_alpha = 4, 3.0
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    fresh = Unlearner()
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.sfron_iteration == 4 and fresh._base_alpha == 3.0
    with pytest.raises(ValueError, match="Invalid forget_freq: 0"):
        SFRonModule(forget_freq=0)
