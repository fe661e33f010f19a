"""SFR-on in the Hugging Face Trainer: SFRonTrainer on a tiny causal LM built from a config (no downloads).

    python examples/hf_trainer.py [--steps 30]

The forget set is a handful of sequences the model memorised; the retain set is more sequences of the
same kind. Each Trainer step first takes a forget step on a forget batch (in training_step), then the
Trainer's own remain step on a retain batch, with its LR schedule, clipping, logging and checkpoints.
"""

from __future__ import annotations

import argparse
import os
import tempfile

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from sfron_ops.integrations.hf import ForgetRetainCollator, ForgetRetainDataset, SFRonTrainer  # noqa: E402


def tiny_llama(vocab: int = 64):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return transformers.LlamaForCausalLM(config)


def sequences(n, seed, vocab=64, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


@torch.no_grad()
def mean_loss(model, examples):
    batch = torch.utils.data.default_collate(examples)
    return float(model(**batch).loss)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--memorise-steps", type=int, default=80)
    args = parser.parse_args(argv)

    forget, retain = sequences(8, seed=1), sequences(40, seed=2)
    model = tiny_llama()
    # the model to unlearn from: trained on both sets until it has memorised them
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    every = torch.utils.data.default_collate(forget + retain)
    for _ in range(args.memorise_steps):
        opt.zero_grad()
        model(**every).loss.backward()
        opt.step()
    print(f"before: forget loss {mean_loss(model, forget):.3f}  retain loss {mean_loss(model, retain):.3f}")

    with tempfile.TemporaryDirectory() as out:
        training_args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=1e-3,
            weight_decay=0.01, max_grad_norm=1.0, report_to="none", save_strategy="no", logging_steps=10,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        trainer = SFRonTrainer(
            model=model, args=training_args, train_dataset=ForgetRetainDataset(forget, retain),
            data_collator=ForgetRetainCollator(), forget_freq=2,
            sfron_kwargs=dict(base="adamw", forget_alpha=1.0, max_grad_norm=1.0))
        trainer.train()
    model.eval()
    print(f" after: forget loss {mean_loss(model, forget):.3f}  retain loss {mean_loss(model, retain):.3f}")


if __name__ == "__main__":
    main()
