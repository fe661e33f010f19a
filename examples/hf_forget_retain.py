"""SFR-on in your own Hugging Face Trainer setup: a causal LM, a forget set and a retain set of QA examples.

    python examples/hf_forget_retain.py [--people 40] [--epochs 5] [--bf16]

What a user brings: a trained causal LM, its tokenizer, and two datasets of tokenised examples
(``input_ids``, and ``labels`` with -100 on the prompt, so that only the answers count). Here they
come from the package's synthetic facts (a tiny GPT-2 trained on them first, no downloads), but
nothing below depends on that. The recipe:

1. saliency masks from the Fisher of the answers' NLL on the forget and the retain set;
2. ``ForgetRetainDataset(forget, retain, anchor="forget", epochs=E)``: every forget example E times,
   each paired with a random retain example, and ``ForgetRetainCollator`` around your own collator;
3. ``SFRonTrainer``: a forget step (adaptive loss over each answer's NLL, masked, clipped) and a
   remain step per batch pair, inside the Trainer's own loop, schedule, clipping and checkpoints.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from sfron_ops import fisher_diagonal, saliency_mask  # noqa: E402
from sfron_ops.integrations.hf import ForgetRetainCollator, ForgetRetainDataset, SFRonTrainer  # noqa: E402
from sfron_ops.unlearn.facts import Collator, build_lm, build_tokenizer, encode_all, make_facts  # noqa: E402
from sfron_ops.unlearn.lm import SequenceLoss  # noqa: E402


@torch.no_grad()
def answer_probability(model, examples, collate):
    """Mean per-token probability of the answers (exp of minus the mean next-token loss over the labels)."""
    model.eval()
    batch = collate(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none",
                                            ignore_index=-100)
    return float((-(nll.sum(1) / (labels != -100).sum(1))).exp().mean())


def trained_model(tokenizer, examples, collate, epochs, out):
    """The model to unlearn from: a tiny GPT-2 trained on every example (stands for your own trained model)."""
    model = build_lm(tokenizer, seed=0)
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=32, num_train_epochs=epochs,
                                          learning_rate=3e-3, warmup_steps=0.1, weight_decay=0.01, report_to="none",
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                          use_cpu=not torch.cuda.is_available(), seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=examples, data_collator=collate).train()
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=40, help="epochs of training the model to unlearn from")
    parser.add_argument("--forget-epochs", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="unlearn with the parameters in bfloat16")
    args = parser.parse_args(argv)

    facts = make_facts(0, args.people)
    tokenizer = build_tokenizer(facts)
    split = facts.split(0.1)
    forget = encode_all(tokenizer, split["forget"])                 # your forget set
    retain = encode_all(tokenizer, split["retain"] + split["world"])  # your retain set
    collate = Collator(tokenizer.pad_token_id)                       # your collator
    with tempfile.TemporaryDirectory() as out:
        model = trained_model(tokenizer, forget + retain, collate, args.epochs, out)
        print(f"before: forget answer probability {answer_probability(model, forget, collate):.3f}  "
              f"retain answer probability {answer_probability(model, retain, collate):.3f}")
        if args.bf16:
            model = model.to(torch.bfloat16)  # SFRon keeps its arithmetic in float32

        # 1. saliency: Fisher of the answers' NLL (labels mark the answer tokens) on both sets
        def batches(examples, size=32):
            return [(b["input_ids"], b["labels"]) for b in
                    (collate(examples[i: i + size]) for i in range(0, len(examples), size))]

        loss = SequenceLoss(tokenizer.pad_token_id)
        masks = saliency_mask(fisher_diagonal(model, batches(forget), loss),
                              fisher_diagonal(model, batches(retain), loss), gamma=1.0)
        print(f"saliency mask keeps {masks.kept} of {masks.total} weights")

        # 2. forget/retain pairs: the forget set forget_epochs times, each example with a random retain partner
        data = ForgetRetainDataset(forget, retain, anchor="forget", epochs=args.forget_epochs, seed=0)

        # 3. the Trainer: one forget step and one remain step per batch pair
        batch = 16
        training_args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=math.ceil(len(data) / batch),
            learning_rate=1e-3, lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0,
            train_sampling_strategy="sequential", report_to="none", save_strategy="no", logging_strategy="no",
            disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=0)
        trainer = SFRonTrainer(model=model, args=training_args, train_dataset=data,
                               data_collator=ForgetRetainCollator(collate), masks=masks.masks, forget_freq=1,
                               sequence_loss="sum", sfron_kwargs=dict(base="adamw", forget_alpha=1.0,
                                                                      max_grad_norm=1.0))
        trainer.train()
    model = model.float()
    print(f" after: forget answer probability {answer_probability(model, forget, collate):.3f}  "
          f"retain answer probability {answer_probability(model, retain, collate):.3f}")


if __name__ == "__main__":
    main()
