"""The runnable examples in examples/ run and unlearn (each in a fresh process, offline)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(args, timeout=600, quiet=False):
    """Run an example; ``quiet``: it must print no warning either (Python's or torch's logged ones)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", WANDB_DISABLED="true")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    if quiet:
        warned = re.findall(r"^.*(?:Warning: |^W\d{4} ).*$", proc.stderr, flags=re.M)
        assert not warned, "\n".join(warned)
    return proc.stdout


def accuracies(out):
    """{'before': (forget, retain), 'after': (forget, retain)} from the examples' report lines."""
    found = re.findall(r"(before|after): forget accuracy ([\d.]+)\s+retain accuracy ([\d.]+)", out)
    return {k: (float(f), float(r)) for k, f, r in found}


def assert_unlearned(out):
    acc = accuracies(out)
    assert acc["after"][0] < acc["before"][0] - 0.5, acc  # the forget set is no longer fitted
    assert acc["after"][1] > 0.95, acc  # the retain set still is


def test_plain_loop_example_forgets():
    out = run([sys.executable, EXAMPLES / "plain_loop.py"], quiet=True)
    assert_unlearned(out)
    assert "3 of 60 forget samples have a loss of exactly 0" in out and "NOT forgetting" not in out


def test_readme_loop_forgets_where_the_official_formula_does_not(monkeypatch, one_thread):
    """The README's loop (examples/plain_loop.py) on a small MLP whose 60 mislabelled forget samples include
    three of loss exactly 0: AdaptiveLoss's default floor forgets them; the official formula (loss_floor=None)
    does not, and at the README's own lr and alpha the forget monitor says so."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import plain_loop
    from toy import accuracy

    from sfron_ops import ForgettingStalledWarning, ZeroForgetLossWarning
    from sfron_ops import loss as loss_module

    forget, retain = plain_loop.noisy_label_digits(seed=0)
    original = plain_loop.train_original(forget, retain, seed=0)
    with torch.no_grad():
        assert int((F.cross_entropy(original(forget[0]), forget[1], reduction="none") == 0).sum()) == 3
    assert accuracy(original, forget) == accuracy(original, retain) == 1.0

    def unlearn(**settings):
        model = copy.deepcopy(original)
        monkeypatch.setattr(loss_module, "_zero_loss_warned", False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            monitor = plain_loop.unlearn(model, forget, retain, **settings)
        return accuracy(model, forget), accuracy(model, retain), monitor, {w.category for w in seen}

    # the example's settings: the default floor forgets everything and keeps the retain set
    fa, ra, monitor, warned = unlearn(lr=0.1, forget_alpha=300.0)
    assert fa <= 0.02 and ra >= 0.98 and not warned and not monitor.stalled
    fa, ra, _, warned = unlearn(lr=0.1, forget_alpha=300.0, loss_floor=None)
    assert fa >= 0.3 and ZeroForgetLossWarning in warned
    # the README's settings (the paper's CIFAR-10 lr and alpha): forgets with the floor; without it, nothing
    # moves and the monitor warns
    fa, ra, monitor, warned = unlearn(lr=0.01, forget_alpha=25.0)
    assert fa <= 0.05 and not warned and not monitor.stalled
    fa, ra, monitor, warned = unlearn(lr=0.01, forget_alpha=25.0, loss_floor=None)
    assert fa == 1.0 and ra == 1.0 and {ZeroForgetLossWarning, ForgettingStalledWarning} <= warned


@pytest.mark.parametrize("example", ["accelerate_loop.py", "amp.py", "lightning_module.py"])
def test_example_unlearns(example):
    pytest.importorskip({"accelerate_loop.py": "accelerate", "lightning_module.py": "lightning"}.get(example, "torch"))
    assert_unlearned(run([sys.executable, EXAMPLES / example]))


@pytest.mark.slow
def test_compile_example_compiles_a_few_graphs_once():
    # quiet: no profiler, CUDA_HOME or scheduler-order warning
    out = run([sys.executable, EXAMPLES / "compile.py", "--iters", "40"], quiet=True)
    assert_unlearned(out)
    graphs = int(re.search(r"compiled graphs: (\d+) for 40 iterations", out).group(1))
    assert 1 <= graphs <= 4
    kept, total, stored = map(int, re.search(r"keeps (\d+) of (\d+) weights, stored in (\d+) bytes", out).groups())
    assert stored < total / 7


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_example(mode):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out = run(cmd + ["--standalone", "--nproc_per_node=2", EXAMPLES / "distributed.py", "--mode", mode])
    assert f"{mode} on 2 ranks" in out and "parameters equal = True" in out
    assert ("['DTensor']" if mode == "fsdp2" else "['Tensor']") in out
    acc = accuracies(out)["after"]
    assert acc[0] < 0.5 and acc[1] > 0.95


@pytest.mark.slow
def test_hf_trainer_example():
    pytest.importorskip("transformers")
    out = run([sys.executable, EXAMPLES / "hf_trainer.py", "--steps", "10", "--memorise-steps", "40"])
    before = re.search(r"before: forget loss ([\d.]+)\s+retain loss ([\d.]+)", out).groups()
    after = re.search(r"after: forget loss ([\d.]+)\s+retain loss ([\d.]+)", out).groups()
    assert float(after[0]) > 2 * float(before[0])  # the forget sequences are no longer memorised


@pytest.mark.slow
def test_hf_forget_retain_example():
    pytest.importorskip("transformers")
    out = run([sys.executable, EXAMPLES / "hf_forget_retain.py", "--people", "20", "--epochs", "30"])
    found = dict((k, (float(f), float(r))) for k, f, r in re.findall(
        r"(before|after): forget answer probability ([\d.]+)\s+retain answer probability ([\d.]+)", out))
    assert found["before"][0] > 0.9 and found["before"][1] > 0.9, found  # the facts were learnt
    assert found["after"][0] < found["before"][0] / 2, found            # the forgotten people's are gone
    assert found["after"][1] > 0.8, found                               # the others' stay
    assert re.search(r"saliency mask keeps \d+ of \d+ weights", out)
