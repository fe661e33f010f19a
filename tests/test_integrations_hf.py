"""SFRonTrainer (Hugging Face Trainer) on a tiny Llama built from a config: the same run as a hand-written loop."""

from __future__ import annotations

import copy
import os

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import sfron_ops  # noqa: E402
from sfron_ops.integrations import unwrap_optimizer  # noqa: E402
from sfron_ops.integrations.hf import ForgetRetainCollator, ForgetRetainDataset, SFRonTrainer, per_sample_loss  # noqa: E402

STEPS = 6
BATCH = 4
SFRON = dict(base="adamw", forget_alpha=2.0, max_grad_norm=0.5, slow_alpha=0.5, sync_period=2, impl="foreach")


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return transformers.LlamaForCausalLM(config)


def sequences(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 12), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def masks_for(model):
    g = torch.Generator().manual_seed(3)
    return {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()}


def args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=0.01,
        weight_decay=0.01, max_grad_norm=1.0, train_sampling_strategy="sequential", report_to="none",
        save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, **kw)


def test_trainer_runs_forget_and_remain_steps_like_the_official_loop(tmp_path):
    forget, retain = sequences(6, seed=1), sequences(4 * STEPS, seed=2)
    model = tiny_llama()
    start = copy.deepcopy(model)
    masks = masks_for(model)
    trainer = SFRonTrainer(model=model, args=args(tmp_path), train_dataset=ForgetRetainDataset(forget, retain),
                           data_collator=ForgetRetainCollator(), sfron_kwargs=SFRON, masks=masks, forget_freq=2)
    trainer.create_optimizer()
    phases = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: phases.append(k.get("phase") or opt.current_phase))
    trainer.train()
    assert phases == ["forget", "remain", "remain", "forget", "remain", "remain", "forget", "remain", "remain"]
    sfron = unwrap_optimizer(trainer.optimizer)  # the Trainer holds it inside Accelerate's wrapper
    assert isinstance(sfron, sfron_ops.SFRon) and sfron is not trainer.optimizer
    for name, p in model.named_parameters():
        assert torch.equal(sfron.state[p]["mask"], masks[name])

    # the same run by hand
    ref = start
    decay = set(trainer.get_decay_parameter_names(ref))
    named = list(ref.named_parameters())
    opt = sfron_ops.SFRon([{"params": [(n, p) for n, p in named if n in decay], "weight_decay": 0.01},
                           {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}],
                          lr=0.01, mask=masks, **SFRON)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
    collate = ForgetRetainCollator()
    data = ForgetRetainDataset(forget, retain)
    for step in range(STEPS):
        batch = collate([data[i] for i in range(step * BATCH, (step + 1) * BATCH)])
        if step % 2 == 0:
            for g in opt.param_groups:
                g["forget_alpha"] = trainer.forget_alpha_at(step)
            f = batch["forget"]
            losses = per_sample_loss(ref(input_ids=f["input_ids"]).logits, f["labels"])
            (sfron_ops.adaptive_weights(losses) * losses).mean().backward()
            opt.step(phase="forget")
            opt.zero_grad()
        ref(**batch["retain"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # it did move away from the start, and alpha followed the cosine schedule
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), copy.deepcopy(tiny_llama()).parameters()))
    assert trainer.forget_alpha_at(0) == 2.0 and trainer.forget_alpha_at(STEPS // 2) == pytest.approx(1.0)


def test_per_sample_loss_matches_the_model_loss():
    model = tiny_llama()
    batch = torch.utils.data.default_collate(sequences(3, seed=5))
    batch["labels"][1, 5:] = -100
    losses = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    for i in range(3):
        one = model(input_ids=batch["input_ids"][i:i + 1], labels=batch["labels"][i:i + 1]).loss
        torch.testing.assert_close(losses[i], one)
    with pytest.raises(ValueError, match="per_sample_loss takes"):
        per_sample_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_trainer_rejects_what_it_cannot_run(tmp_path):
    model = tiny_llama()
    data = ForgetRetainDataset(sequences(2, 1), sequences(4, 2))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        SFRonTrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=2), train_dataset=data,
                     data_collator=ForgetRetainCollator())
    with pytest.raises(ValueError, match="Invalid forget_freq: 0"):
        SFRonTrainer(model=model, args=args(tmp_path), train_dataset=data, forget_freq=0)
    with pytest.raises(ValueError, match="forget and retain sets must be non-empty"):
        ForgetRetainDataset([], sequences(2, 1))
