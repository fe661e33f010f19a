"""SFR-on in PyTorch Lightning with manual optimisation (SFRonModule).

    python examples/lightning_module.py [--epochs 2] [--precision bf16-mixed]

training_step takes the forget step with opt.step(phase="forget") through LightningOptimizer, then the
remain step; the precision plugin wraps both.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from toy import fisher_and_mask, pretrained, report, toy_task

import sfron_ops
from sfron_ops.integrations.hf import ForgetRetainDataset
from sfron_ops.integrations.lightning import SFRonModule


class Unlearner(SFRonModule):
    def __init__(self, net, masks):
        super().__init__(forget_freq=2)
        self.net, self.masks = net, masks

    def forward(self, x):
        return self.net(x)

    def forget_loss(self, batch):
        x, y = batch
        return sfron_ops.adaptive_cross_entropy(self(x), y)

    def remain_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = sfron_ops.SFRon(self.net.named_parameters(), mask=self.masks, lr=0.02, momentum=0.9,
                              weight_decay=5e-4, forget_alpha=10.0, max_grad_norm=5.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": sched}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args(argv)

    forget, retain = toy_task()
    net = pretrained(forget, retain)
    report("before", net, forget, retain)
    # masks from the Fisher ratio, computed once before training
    probe = sfron_ops.SFRon(net.named_parameters())
    kept, total = fisher_and_mask(net, probe, forget, retain)
    masks = {n: m for (n, _), m in zip(net.named_parameters(), probe.masks())}
    print(f"mask keeps {kept} of {total} weights")

    pairs = ForgetRetainDataset(list(zip(*forget)), list(zip(*retain)))
    loader = torch.utils.data.DataLoader(pairs, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, precision=args.precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Unlearner(net, masks), loader)
    report("after", net.cpu(), forget, retain)


if __name__ == "__main__":
    main()
