"""SFR-on through Accelerate's prepared optimizer: the phase reaches SFRon through the wrapper."""

from __future__ import annotations

import os

for _key in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from models import INTEGRATION_KW, tiny_mlp  # noqa: E402
from torch.nn import functional as F  # noqa: E402

accelerate = pytest.importorskip("accelerate")

import sfron_ops  # noqa: E402
from sfron_ops.integrations import accelerate as sfron_accelerate  # noqa: E402
from sfron_ops.integrations import set_phase, unwrap_optimizer  # noqa: E402

ITERS = 6


def data(n=2 * ITERS + 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


DATA = data()


def fisher_then_mask(model, opt, fisher):
    for which, (x, y) in zip(("forget", "remain", "forget", "remain"), DATA[-4:]):
        fisher(which, F.cross_entropy(model(x), y))
    return unwrap_optimizer(opt).compute_mask(gamma=1.0)


def loop(model, opt, forget_step, remain_step, start=0, stop=ITERS):
    for i in range(start, stop):
        if i % 2 == 0:
            x, y = DATA[2 * i]
            forget_step(sfron_ops.adaptive_cross_entropy(model(x), y))
        x, y = DATA[2 * i + 1]
        remain_step(F.cross_entropy(model(x), y))


def plain_run():
    model = tiny_mlp()
    opt = sfron_ops.SFRon(model.named_parameters(), **INTEGRATION_KW)

    def fisher(which, loss):
        loss.backward()
        opt.accumulate_fisher(which, scale=0.5)
        opt.zero_grad()

    def make_step(phase):
        def run(loss):
            loss.backward()
            opt.step(phase=phase)
            opt.zero_grad()
        return run

    kept = fisher_then_mask(model, opt, fisher)
    loop(model, opt, make_step("forget"), make_step("remain"))
    return [p.detach().clone() for p in model.parameters()], kept


@pytest.fixture
def accelerator():
    # one per test: save_state/load_state number the models an accelerator has prepared
    return accelerate.Accelerator(cpu=True)


def prepared(accelerator):
    model = tiny_mlp()
    return accelerator.prepare(model, sfron_ops.SFRon(model.named_parameters(), **INTEGRATION_KW))


def test_prepared_run_matches_the_plain_loop_bitwise(accelerator):
    expected, expected_kept = plain_run()
    model, opt = prepared(accelerator)
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    phases = []
    unwrap_optimizer(opt).register_step_pre_hook(lambda o, a, k: phases.append(o.current_phase))
    kept = fisher_then_mask(model, opt, lambda which, loss: sfron_accelerate.accumulate_fisher(
        accelerator, opt, loss, which, scale=0.5))
    loop(model, opt, lambda loss: sfron_accelerate.step(accelerator, opt, loss, "forget"),
         lambda loss: sfron_accelerate.step(accelerator, opt, loss))
    assert kept == expected_kept
    assert phases == ["forget", "remain", "remain"] * (ITERS // 2)
    for a, b in zip(model.parameters(), expected):
        assert torch.equal(a, b)


def test_phase_reaches_sfron_through_the_wrapper(accelerator):
    model, opt = prepared(accelerator)
    sfron = unwrap_optimizer(opt)
    x, y = DATA[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(TypeError):
        opt.step(phase="forget")  # AcceleratedOptimizer.step takes no phase
    with sfron_ops.phase(opt, "forget"):
        assert sfron.current_phase == "forget"
    assert sfron.current_phase == "remain"
    assert set_phase(opt, "forget") == "remain" and sfron.current_phase == "forget"
    set_phase(opt, "remain")
    with pytest.raises(ValueError, match="Invalid phase: 'erase'"):
        set_phase(opt, "erase")
    with pytest.raises(TypeError, match="no SFRon optimizer inside SGD"):
        unwrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))


def test_masks_set_before_prepare_survive_it(accelerator):
    model = tiny_mlp()
    g = torch.Generator().manual_seed(5)
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()}
    model, opt = accelerator.prepare(model, sfron_ops.SFRon(model.named_parameters(), mask=masks, **INTEGRATION_KW))
    for name, p in model.named_parameters():
        assert torch.equal(unwrap_optimizer(opt).state[p]["mask"], masks[name])


def test_save_state_and_load_state_resume_bitwise(accelerator, tmp_path):
    def run(acc, model, opt, start, stop):
        loop(model, opt, lambda loss: sfron_accelerate.step(acc, opt, loss, "forget"),
             lambda loss: sfron_accelerate.step(acc, opt, loss), start, stop)

    model, opt = prepared(accelerator)
    fisher_then_mask(model, opt, lambda which, loss: sfron_accelerate.accumulate_fisher(accelerator, opt, loss, which))
    run(accelerator, model, opt, 0, ITERS // 2)
    accelerator.save_state(str(tmp_path / "ckpt"))
    run(accelerator, model, opt, ITERS // 2, ITERS)

    resumed = accelerate.Accelerator(cpu=True)  # as a new process would
    model2, opt2 = prepared(resumed)
    resumed.load_state(str(tmp_path / "ckpt"))
    assert all(m is not None for m in unwrap_optimizer(opt2).masks())
    run(resumed, model2, opt2, ITERS // 2, ITERS)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
