"""Unlearning facts from a causal LM, TOFU-style, end to end (scenario ``facts-lm``).

Per seed: :func:`~sfron_ops.unlearn.facts.make_facts` draws fictitious people and their facts, a
word-level tokenizer is built over their words and a tiny GPT-2 is trained from scratch on every
person's answers and the world facts (the original). For each forget split (1, 5 and 10 % of the
people) RT is the same recipe without the forgotten people, and every method unlearns a copy of the
original in the Hugging Face ``Trainer``: SFR-on through
:class:`~sfron_ops.integrations.hf.SFRonTrainer`, the baselines through
:class:`~sfron_ops.unlearn.lm.UnlearnTrainer`, all on the same paired forget/retain batches; each
method runs with float32 parameters and with bfloat16 parameters (the optimizers' math stays in
float32: SFR-on's kernels, torch's AdamW).

Every model is then scored as TOFU scores it (:mod:`sfron_ops.unlearn.metrics`): the answer
probability and ROUGE-L recall of greedy answers on the forget and retain questions, the truth ratio
against perturbed answers, the forget quality (the KS-test p-value between the forget questions'
truth ratios under the model and under RT), the model utility (the harmonic mean of probability,
ROUGE-L and truth ratio on retain questions and world facts) and two membership attacks (the answer
loss and Min-K % prob, forget answers against answers of people no model saw). Models are scored
with float32 arithmetic on their own weights (a bfloat16 run's weights as it left them).

With a checkpoint folder every training and unlearning run is kept (``seed<S>/<run>.pt``, with its
scores) and a run in progress keeps the Trainer's checkpoints (``seed<S>/<run>.trainer/``); the
same call resumes them. Each carries a key of everything that determines it, and one of another run
is refused (:func:`check_runs` checks all of it before anything trains).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from ..loss import LOSS_FLOOR
from . import checkpoints
from . import metrics as M
from .facts import Collator, Facts, build_lm, build_tokenizer, encode_all, encode_pairs, make_facts, prompt_text
from .runner import RunInterrupted

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# metric key -> (column title, digits); the probabilities, ROUGE-L and truth ratios are in [0, 1]
LM_COLUMNS = (("FQ", "FQ ↑", None), ("MU", "MU ↑", 3), ("forget_prob", "F-Prob", 3), ("forget_rouge", "F-ROUGE", 3),
              ("forget_tr", "F-TR", 3), ("retain_prob", "R-Prob", 3), ("retain_rouge", "R-ROUGE", 3),
              ("MIA loss", "AUC loss", 3), ("MIA Min-K", "AUC Min-K", 3), ("RTE", "RTE (s)", 1))
LM_KEYS = tuple(c[0] for c in LM_COLUMNS)
FQ_BAND = 0.05           # KS p-value at or above which a forget set is read as indistinguishable from RT's
UTILITY_KEPT = 0.95      # a method keeps utility when its MU is at least this share of the original's
MIN_K = 0.4

# ---------------------------------------------------------------------------------------------- method specs
_COMMON = dict(epochs=10, lr=1e-4, weight_decay=0.01, lr_schedule="linear", warmup=0.1)
SPEC_DEFAULTS = {
    "sfron": dict(_COMMON, lr_schedule="cosine", warmup=0.0, base="adamw", forget_alpha=1.0, forget_freq=1,
                  alpha_schedule="cosine", max_grad_norm=1.0, remain_max_grad_norm=1.0, lambd=0.5,
                  loss_floor=LOSS_FLOOR, sequence_loss="sum", mask=True, gamma=1.0, density=None, slow_alpha=1.0,
                  sync_period=1),
    "ga": dict(_COMMON, max_grad_norm=1.0),
    "graddiff": dict(_COMMON, max_grad_norm=1.0, gamma=1.0, alpha=1.0),
    "npo": dict(_COMMON, max_grad_norm=1.0, beta=0.1, gamma=1.0, alpha=1.0),
    "simnpo": dict(_COMMON, max_grad_norm=1.0, beta=4.5, delta=0.0, gamma=0.125, alpha=1.0),
    "ft": dict(_COMMON, max_grad_norm=1.0),
}
SCHEDULES = ("linear", "cosine", "constant")


def method_spec(spec: dict) -> tuple[str, dict]:
    """``(method name, every hyperparameter)`` of ``{"method": name, **hyperparameters}``, checked: a
    ``ValueError`` names an unknown method or key, or a value that cannot be used."""
    spec = dict(spec)
    name = spec.pop("method", None)
    if name not in SPEC_DEFAULTS:
        raise ValueError(f"Invalid method: {name!r}; expected one of {sorted(SPEC_DEFAULTS)}")
    unknown = sorted(set(spec) - set(SPEC_DEFAULTS[name]))
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter {unknown[0]!r}; expected one of "
                         f"{sorted(SPEC_DEFAULTS[name])}")
    hp = {**SPEC_DEFAULTS[name], **spec}

    def number(key, low=0.0, low_open=False, high=None, optional=False):
        v = hp[key]
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low \
                or (low_open and v == low) or (high is not None and v > high):
            raise ValueError(f"Invalid {key}: {v!r}; expected a finite number {'>' if low_open else '>='} {low:g}"
                             + (f" and <= {high:g}" if high is not None else ""))

    if isinstance(hp["epochs"], bool) or not isinstance(hp["epochs"], int) or hp["epochs"] < 1:
        raise ValueError(f"Invalid epochs: {hp['epochs']!r}; expected an integer >= 1")
    number("lr", low_open=True)
    number("weight_decay")
    number("warmup", high=0.99)
    if hp["lr_schedule"] not in SCHEDULES:
        raise ValueError(f"Invalid lr_schedule: {hp['lr_schedule']!r}; expected one of {SCHEDULES}")
    number("max_grad_norm", low_open=True, optional=True)
    if name == "sfron":
        from ..loss import check_weight_args

        if hp["base"] not in ("adamw", "sgd"):
            raise ValueError(f"Invalid base: {hp['base']!r}; expected 'adamw' or 'sgd'")
        number("forget_alpha")
        if isinstance(hp["forget_freq"], bool) or not isinstance(hp["forget_freq"], int) or hp["forget_freq"] < 1:
            raise ValueError(f"Invalid forget_freq: {hp['forget_freq']!r}; expected an integer >= 1")
        if hp["alpha_schedule"] not in ("cosine", "constant"):
            raise ValueError(f"Invalid alpha_schedule: {hp['alpha_schedule']!r}; expected 'cosine' or 'constant'")
        number("remain_max_grad_norm", low_open=True, optional=True)
        check_weight_args(hp["lambd"], hp["loss_floor"])
        if hp["sequence_loss"] not in ("mean", "sum"):
            raise ValueError(f"Invalid sequence_loss: {hp['sequence_loss']!r}; expected 'mean' or 'sum'")
        if not isinstance(hp["mask"], bool):
            raise ValueError(f"Invalid mask: {hp['mask']!r}; expected True or False")
        number("gamma")
        number("density", high=1.0, optional=True)
        number("slow_alpha", high=1.0)
        if isinstance(hp["sync_period"], bool) or not isinstance(hp["sync_period"], int) or hp["sync_period"] < 1:
            raise ValueError(f"Invalid sync_period: {hp['sync_period']!r}; expected an integer >= 1")
    else:
        for key in ("gamma", "alpha", "delta"):
            if key in hp:
                number(key, low=-math.inf)
        if "beta" in hp:
            number("beta", low_open=True)
    return name, hp


# ---------------------------------------------------------------------------------------------- the scenario
@dataclass
class LMScenario:
    """What to run. ``methods`` maps a table label to ``{"method": name, **hyperparameters}`` (names:
    ``sfron``, ``ga``, ``graddiff``, ``npo``, ``simnpo``, ``ft``; :data:`SPEC_DEFAULTS` lists the keys)."""

    name: str = "facts-lm"
    people: int = 200
    fractions: tuple = (0.01, 0.05, 0.10)
    model: dict = field(default_factory=dict)      # overrides of facts.LM_CONFIG
    train: dict = field(default_factory=dict)      # the original's and RT's: epochs, lr, batch_size, ...
    methods: dict = field(default_factory=dict)
    precisions: tuple = ("float32", "bfloat16")
    batch_size: int = 16                           # unlearning: forget examples per step (and as many retain ones)
    eval_retain_people: int = 20                   # retain questions scored: those of the first 20 retain people
    max_new_tokens: int = 16
    tuning_seeds: tuple = (100,)
    tuning_fraction: float = 0.05
    description: str = ""


def fraction_tag(fraction: float) -> str:
    return f"f{round(fraction * 100):02d}"


def row_label(label: str, precision: str) -> str:
    return label if precision == "float32" else f"{label} (bf16)"


@dataclass
class LMSeedBase:
    """The per-seed common ground: the facts, the tokenizer, the original and, per split, RT and the scores."""

    seed: int
    facts: Facts
    tokenizer: object
    original: torch.nn.Module
    device: torch.device
    rt: dict = field(default_factory=dict)           # fraction -> RT's scores
    original_scores: dict = field(default_factory=dict)  # (fraction, precision) -> the original's scores
    train_seconds: dict = field(default_factory=dict)


def _key(scenario: LMScenario, facts: Facts, seed: int, tag: str, fraction=None, precision=None) -> dict:
    """What determines run ``tag`` ("original", "RT" or a method label) besides its method and hyperparameters:
    the data, the seed, the model and how the original is trained; for RT and the methods the forget split
    (its fraction and who is in it); for the methods the parameters' precision and the batch size."""
    key = {"run": tag, "seed": seed, "data": facts.identity(), "model": dict(scenario.model),
           "training": dict(scenario.train)}
    if tag != "original":
        key["forget"] = {"fraction": fraction, "people": checkpoints.digest(str(facts.forget_people(fraction)))}
    if tag not in ("original", "RT"):
        key["unlearning"] = {"precision": precision, "batch_size": scenario.batch_size}
    return key


def _run_key(name: str, hparams: dict, extra: dict) -> dict:
    return {"method": name, "hparams": dict(hparams), **extra}


def _eval_config(scenario: LMScenario) -> dict:
    return {"eval_retain_people": scenario.eval_retain_people, "max_new_tokens": scenario.max_new_tokens,
            "min_k": MIN_K}


def _paths(checkpoint_dir, seed, tag):
    """``(final checkpoint, Trainer folder)`` of run ``tag``, or ``(None, None)`` without a folder."""
    final = checkpoints.path(checkpoint_dir, seed, tag)
    return final, (None if final is None else final[: -len(".pt")] + ".trainer")


def _check_trainer_folder(folder: str | None, key: dict) -> None:
    """Refuse a run-in-progress folder written for another run (its ``key.json``), naming what differs."""
    path = None if folder is None else os.path.join(folder, "key.json")
    if path is None or not os.path.exists(path):
        return
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as e:
        raise checkpoints.CheckpointError(f"run folder {folder} cannot be read ({type(e).__name__}: {e})",
                                          folder) from None
    diffs = checkpoints.differences(saved, json.loads(json.dumps(key)))
    if diffs:
        raise checkpoints.CheckpointError(f"run folder {folder} belongs to another run: "
                                          f"{checkpoints.describe(diffs)}", folder, diffs)


# ---------------------------------------------------------------------------------------------- training
def _training_args(out, *, batch_size, steps, lr, weight_decay, schedule, warmup, max_grad_norm, seed, device,
                   save_steps, progress, shuffle):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        weight_decay=weight_decay, lr_scheduler_type=schedule, warmup_steps=float(warmup),
        max_grad_norm=max_grad_norm if max_grad_norm is not None else 0.0,
        train_sampling_strategy="random" if shuffle else "sequential", report_to="none",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=1,
        logging_strategy="no", use_cpu=device.type == "cpu", seed=seed, disable_tqdm=not progress,
        dataloader_num_workers=0, dataloader_pin_memory=False)


def _trainer_run(build, final, folder, key, *, desc, steps, extra_seconds=0.0, info=None):
    """Run the Trainer that ``build(output_dir, callbacks)`` makes, resuming from the latest checkpoint in
    ``folder`` (``None``: no checkpoints); returns ``(model, seconds)`` and, with ``final``, saves the model and
    the run's time there and removes ``folder``. A Ctrl-C stops at the end of a step, after a checkpoint."""
    from transformers.utils import logging as hf_logging

    from .lm import RunClock, last_checkpoint

    temporary = folder is None
    out = tempfile.mkdtemp(prefix="sfron-lm-") if temporary else folder
    try:
        os.makedirs(out, exist_ok=True)
        if not temporary:
            with open(os.path.join(out, "key.json"), "w") as fh:
                json.dump(key, fh, indent=1)
        resume = None if temporary else last_checkpoint(out)
        clock = RunClock(RunClock.resumed(resume) if resume else extra_seconds)
        trainer = build(out, [clock])
        quiet = trainer.args.disable_tqdm
        if quiet:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # it prints the run's summary; the scenario prints its own
        bars = hf_logging.is_progress_bar_enabled()
        if quiet:
            hf_logging.disable_progress_bar()  # the bars of writing checkpoints
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if clock.interrupted:
            raise RunInterrupted(desc, trainer.state.global_step, steps, out)
        model = trainer.model
        if final is not None:
            checkpoints.save({"version": checkpoints.VERSION, "key": key, "iteration": trainer.state.global_step,
                              "finished": True, "model": model.state_dict(), "seconds": clock.seconds,
                              "info": dict(info or {}), "evaluation": {}}, final)
            shutil.rmtree(out, ignore_errors=True)
        return model, clock.seconds
    finally:
        if temporary:
            shutil.rmtree(out, ignore_errors=True)


def _read_final(final, key):
    """A finished run's checkpoint (checked against ``key``), or None."""
    if final is None or not os.path.exists(final):
        return None
    return checkpoints.read(final, key)


def train_lm(scenario: LMScenario, facts: Facts, tokenizer, seed: int, tag: str, examples: list, *, device,
             fraction=None, checkpoint_dir=None, progress=False):
    """Train a fresh LM on ``examples`` with ``scenario.train`` (the original, or RT); returns ``(model, seconds,
    saved)``, ``saved`` the finished run's checkpoint payload (None without a checkpoint folder)."""
    from transformers import Trainer

    hp = scenario.train
    key = _run_key("train", hp, _key(scenario, facts, seed, tag, fraction))
    final, folder = _paths(checkpoint_dir, seed, tag if fraction is None else f"{tag}-{fraction_tag(fraction)}")
    init_seed = seed if tag == "original" else seed + 10_000
    model = build_lm(tokenizer, init_seed, **scenario.model).to(device)
    saved = _read_final(final, key)
    if saved is not None:
        model.load_state_dict(saved["model"])
        return model, saved["seconds"], saved
    _check_trainer_folder(folder, key)
    steps = hp["epochs"] * math.ceil(len(examples) / hp["batch_size"])

    def build(out, callbacks):
        args = _training_args(out, batch_size=hp["batch_size"], steps=steps, lr=hp["lr"],
                              weight_decay=hp["weight_decay"], schedule="linear", warmup=hp["warmup"],
                              max_grad_norm=hp.get("max_grad_norm", 1.0), seed=init_seed, device=device,
                              save_steps=hp.get("save_steps", 200) if folder else None, progress=progress,
                              shuffle=True)
        return Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(tokenizer.pad_token_id),
                       callbacks=callbacks)

    model, seconds = _trainer_run(build, final, folder, key, desc=f"{tag} s{seed}", steps=steps)
    return model, seconds, _read_final(final, key)


def _masks(model, forget, retain, collate, batch_size, pad_id, hp):
    """SFR-on's saliency mask: the Fisher of the answers' NLL on the forget and the retain examples."""
    from ..fisher import fisher_diagonal
    from ..mask import saliency_mask
    from .lm import SequenceLoss

    def batches(examples):
        return [(b["input_ids"], b["labels"]) for b in
                (collate(examples[i: i + batch_size]) for i in range(0, len(examples), batch_size))]

    loss = SequenceLoss(pad_id, hp["sequence_loss"])
    result = saliency_mask(fisher_diagonal(model, batches(forget), loss), fisher_diagonal(model, batches(retain), loss),
                           gamma=hp["gamma"], density=hp["density"])
    return result.masks, (result.kept, result.total)


def unlearn(scenario: LMScenario, base: LMSeedBase, fraction: float, label: str, spec: dict, precision: str, *,
            checkpoint_dir=None, progress=False):
    """Unlearn the ``fraction`` split from a copy of the seed's original with ``spec`` in ``precision``; returns
    ``(model, seconds, info, saved)`` (``saved``: the finished run's checkpoint payload, or None)."""
    from ..integrations.hf import ForgetRetainCollator, ForgetRetainDataset, SFRonTrainer
    from .lm import UnlearnTrainer

    name, hp = method_spec(spec)
    tok = base.tokenizer
    sets = base.facts.split(fraction)
    forget, retain = encode_all(tok, sets["forget"]), encode_all(tok, sets["retain"] + sets["world"])
    key = _run_key(name, hp, _key(scenario, base.facts, base.seed, label, fraction, precision))
    tag = f"{label}-{fraction_tag(fraction)}-{precision}"
    final, folder = _paths(checkpoint_dir, base.seed, tag)
    model = copy.deepcopy(base.original).to(PRECISIONS[precision])
    saved = _read_final(final, key)
    if saved is not None:
        model.load_state_dict(saved["model"])
        return model, saved["seconds"], saved.get("info", {}), saved
    _check_trainer_folder(folder, key)
    collate = Collator(tok.pad_token_id)
    data = ForgetRetainDataset(forget, retain, anchor="forget", epochs=hp["epochs"], seed=base.seed)
    steps = math.ceil(len(data) / scenario.batch_size)
    info, fisher_seconds = {}, 0.0
    masks = None
    if name == "sfron" and hp["mask"]:
        t0 = time.perf_counter()
        masks, (kept, total) = _masks(model, forget, retain, collate, scenario.batch_size, tok.pad_token_id, hp)
        fisher_seconds = time.perf_counter() - t0
        info.update(mask_kept=kept, mask_total=total)

    def build(out, callbacks):
        clip = hp["remain_max_grad_norm"] if name == "sfron" else hp["max_grad_norm"]
        warmup = hp["warmup"]
        args = _training_args(out, batch_size=scenario.batch_size, steps=steps, lr=hp["lr"],
                              weight_decay=hp["weight_decay"], schedule=hp["lr_schedule"], warmup=warmup,
                              max_grad_norm=clip, seed=base.seed, device=base.device,
                              save_steps=max(1, steps // 4) if folder else None, progress=progress, shuffle=False)
        common = dict(model=model, args=args, train_dataset=data, data_collator=ForgetRetainCollator(collate),
                      callbacks=callbacks)
        if name == "sfron":
            sfron = dict(base=hp["base"], forget_alpha=hp["forget_alpha"], max_grad_norm=hp["max_grad_norm"],
                         slow_alpha=hp["slow_alpha"], sync_period=hp["sync_period"])
            return SFRonTrainer(**common, sfron_kwargs=sfron, masks=masks, forget_freq=hp["forget_freq"],
                                alpha_schedule=hp["alpha_schedule"], lambd=hp["lambd"], loss_floor=hp["loss_floor"],
                                sequence_loss=hp["sequence_loss"])
        constants = {k: hp[k] for k in ("beta", "gamma", "alpha", "delta") if k in hp}
        return UnlearnTrainer(**common, loss=name, **constants)

    model, seconds = _trainer_run(build, final, folder, key, desc=f"{label} ({precision}) s{base.seed}",
                                  steps=steps, extra_seconds=fisher_seconds, info=info)
    return model, seconds, info, _read_final(final, key)


# ---------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def _token_logprobs(model, examples, collate, batch_size=64) -> list:
    """The log-probability of every labelled token of each example (its answer and final EOS), float32."""
    out = []
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i: i + batch_size])
        logits = model(input_ids=b["input_ids"].to(model.device),
                       attention_mask=b["attention_mask"].to(model.device)).logits.float().cpu()
        labels = b["labels"][:, 1:]
        lp = F.log_softmax(logits[:, :-1], dim=-1).gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += [row[lab != -100] for row, lab in zip(lp, labels)]
    return out


def _avg_nll(logprobs) -> np.ndarray:
    return np.asarray([-float(lp.double().mean()) for lp in logprobs])


@torch.no_grad()
def greedy_answers(model, tokenizer, questions, max_new_tokens: int = 16) -> list:
    """Greedy answers to ``questions`` (prompts of equal length are batched, so nothing is padded), decoded
    without special tokens and cut at the first EOS."""
    if not questions:
        return []
    prompts = [[tokenizer.bos_token_id] + p
               for p in tokenizer([prompt_text(q) for q in questions], add_special_tokens=False)["input_ids"]]
    answers = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, idx in by_length.items():
        ids = torch.tensor([prompts[i] for i in idx], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        for i, row in zip(idx, out[:, length:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    return answers


def _truth(model, tok, qa, collate, true_field):
    """Per-question truth ratios, with ``true_field`` ("paraphrase" or "answer") as the true answer, and the
    probabilities of the true and the perturbed answers (``[N]``, ``[N, J]``)."""
    true_nll = _avg_nll(_token_logprobs(model, encode_all(tok, qa, true_field), collate))
    j = len(qa[0].perturbed)
    flat = encode_pairs(tok, [q.question for q in qa for _ in q.perturbed], [p for q in qa for p in q.perturbed])
    pert_nll = _avg_nll(_token_logprobs(model, flat, collate)).reshape(len(qa), j)
    return M.truth_ratios(true_nll, pert_nll), np.exp(-true_nll), np.exp(-pert_nll)


def evaluate_lm(model, tokenizer, sets: dict, *, max_new_tokens: int = 16) -> dict:
    """TOFU-style scores of ``model`` on a split's ``sets`` (``forget``, ``retain``: the scored retain questions,
    ``world``, ``holdout``: QA lists), computed in float32 on a copy of the model."""
    model = copy.deepcopy(model).float().eval()
    collate = Collator(tokenizer.pad_token_id)
    out = {}
    answer_lp = {}
    for part in ("forget", "retain", "world", "holdout"):
        answer_lp[part] = _token_logprobs(model, encode_all(tokenizer, sets[part]), collate)
    for part in ("forget", "retain", "world"):
        qa = sets[part]
        generated = greedy_answers(model, tokenizer, [q.question for q in qa], max_new_tokens)
        out[f"{part}_rouge"] = M.rouge_l_recall(generated, [q.answer for q in qa])
        prob = np.exp(-_avg_nll(answer_lp[part]))
        if part == "world":  # world facts: the answer itself is the true one, scored against its alternatives
            tr, p_true, p_false = _truth(model, tokenizer, qa, collate, "answer")
            out["world_prob"] = float((p_true / (p_true + p_false.sum(axis=1) + M.TRUTH_RATIO_EPS)).mean())
        else:
            tr, _, _ = _truth(model, tokenizer, qa, collate, "paraphrase")
            out[f"{part}_prob"] = float(prob.mean())
        out[f"{part}_tr"] = M.truth_ratio_score(tr, "forget" if part == "forget" else "true_better")
        if part == "forget":
            out["forget_tr_values"] = tr.tolist()
        if part == "forget":
            out["forget_answers"] = generated[:5]
    out["MU"] = M.model_utility([out[k] for k in ("retain_prob", "retain_rouge", "retain_tr", "world_prob",
                                                  "world_rouge", "world_tr")])
    loss = {p: _avg_nll(answer_lp[p]) for p in ("forget", "holdout")}
    mink = {p: M.min_k_score([lp[:-1] for lp in answer_lp[p]], MIN_K) for p in ("forget", "holdout")}
    out["MIA loss"] = M.mia_auc(loss["forget"], loss["holdout"])
    out["MIA Min-K"] = M.mia_auc(mink["forget"], mink["holdout"])
    return out


def scored_sets(scenario: LMScenario, facts: Facts, fraction: float) -> dict:
    """The question sets a model is scored on for ``fraction``: every forget question, the questions of the first
    ``eval_retain_people`` retain people, the world facts and the holdout (as many people as are forgotten)."""
    sets = facts.split(fraction)
    keep = sorted({q.person for q in sets["retain"]})[: scenario.eval_retain_people]
    sets["retain"] = [q for q in sets["retain"] if q.person in set(keep)]
    return sets


def _scores(scenario, facts, tokenizer, model, fraction, saved, final, entry):
    """The model's scores on ``fraction`` (read from its checkpoint when scored there before with the same
    settings; otherwise computed and, with a checkpoint, kept there under ``entry``)."""
    config = _eval_config(scenario)
    if saved is not None:
        kept = saved.get("evaluation", {}).get(entry)
        if kept is not None and kept["config"] == config:
            return kept["metrics"]
    m = evaluate_lm(model, tokenizer, scored_sets(scenario, facts, fraction), max_new_tokens=scenario.max_new_tokens)
    if saved is not None and final is not None:
        saved.setdefault("evaluation", {})[entry] = {"config": config, "metrics": m}
        checkpoints.save(saved, final)
    return m


# ---------------------------------------------------------------------------------------------- one seed
def _rows_for(base: LMSeedBase, m: dict, fraction: float, seconds: float) -> dict:
    """``m`` with FQ against RT on the same split and the run time."""
    rt = base.rt[fraction]
    return {**m, "FQ": M.forget_quality(m["forget_tr_values"], rt["forget_tr_values"]), "RTE": seconds}


def prepare_seed(scenario: LMScenario, seed: int, fractions=None, *, device=None, progress=False,
                 checkpoint_dir=None, precisions=None) -> LMSeedBase:
    """Draw the facts of ``seed``, train (or load) the original and, for every split, RT, and score them."""
    device = torch.device(device or "cpu")
    fractions = tuple(scenario.fractions if fractions is None else fractions)
    precisions = tuple(scenario.precisions if precisions is None else precisions)
    facts = make_facts(seed, scenario.people)
    tok = build_tokenizer(facts)
    all_people = facts.split(min(fractions))
    everything = encode_all(tok, all_people["forget"] + all_people["retain"] + all_people["world"])
    original, seconds, saved = train_lm(scenario, facts, tok, seed, "original", everything, device=device,
                                        checkpoint_dir=checkpoint_dir, progress=progress)
    base = LMSeedBase(seed, facts, tok, original, device, train_seconds={"original": seconds})
    final, _ = _paths(checkpoint_dir, seed, "original")
    for f in fractions:
        sets = facts.split(f)
        rt, rt_seconds, rt_saved = train_lm(scenario, facts, tok, seed, "RT", encode_all(tok, sets["retain"]
                                                                                          + sets["world"]),
                                            device=device, fraction=f, checkpoint_dir=checkpoint_dir,
                                            progress=progress)
        rt_final, _ = _paths(checkpoint_dir, seed, f"RT-{fraction_tag(f)}")
        base.rt[f] = {**_scores(scenario, facts, tok, rt, f, rt_saved, rt_final, fraction_tag(f)), "FQ": 1.0,
                      "RTE": rt_seconds}
        base.train_seconds[f"RT-{fraction_tag(f)}"] = rt_seconds
        for precision in precisions:
            model = original if precision == "float32" else copy.deepcopy(original).to(PRECISIONS[precision])
            m = _scores(scenario, facts, tok, model, f, saved, final, f"{fraction_tag(f)}-{precision}")
            base.original_scores[(f, precision)] = {**_rows_for(base, m, f, math.nan)}
    return base


def evaluate_run(scenario, base, fraction, label, spec, precision, *, checkpoint_dir=None, progress=False) -> dict:
    """Unlearn with ``spec`` and score the result against RT."""
    model, seconds, info, saved = unlearn(scenario, base, fraction, label, spec, precision,
                                          checkpoint_dir=checkpoint_dir, progress=progress)
    final, _ = _paths(checkpoint_dir, base.seed, f"{label}-{fraction_tag(fraction)}-{precision}")
    m = _scores(scenario, base.facts, base.tokenizer, model, fraction, saved, final, fraction_tag(fraction))
    return {**_rows_for(base, m, fraction, seconds), "info": info}


def check_runs(scenario: LMScenario, seeds, methods=None, *, device=None, checkpoint_dir: str | None = None) -> list:
    """What :func:`sfron_ops.unlearn.experiment.check_runs` checks, for this scenario, before anything trains:
    the splits, the training settings and every method's hyperparameters (a
    :class:`~sfron_ops.unlearn.experiment.RunConfigError` names the run), and the checkpoints and run
    folders already under ``checkpoint_dir`` (returned as :class:`~sfron_ops.unlearn.checkpoints.CheckpointError`
    for every one of another run or unreadable, none of them touched)."""
    from .experiment import RunConfigError, _labels

    labels = _labels(scenario, methods)
    for f in scenario.fractions:
        from .facts import check_fraction

        check_fraction(f)
    bad = [p for p in scenario.precisions if p not in PRECISIONS]
    if bad:
        raise RunConfigError("precision", ValueError(f"Invalid precision: {bad[0]!r}; expected one of "
                                                     f"{list(PRECISIONS)}"))
    train = scenario.train
    try:
        for k in ("epochs", "batch_size"):
            if isinstance(train.get(k), bool) or not isinstance(train.get(k), int) or train[k] < 1:
                raise ValueError(f"Invalid {k}: {train.get(k)!r}; expected an integer >= 1")
    except ValueError as e:
        raise RunConfigError("original", e) from None
    specs = {}
    for label in labels:
        try:
            specs[label] = method_spec(scenario.methods[label])
        except ValueError as e:
            raise RunConfigError(label, e) from None
    problems = []
    for seed in seeds:
        facts = make_facts(seed, scenario.people)
        for f in scenario.fractions:
            if len(facts.forget_people(f)) >= len(facts.people):
                raise ValueError(f"seed {seed}: every person is in the forget set, none remains")
        runs = [("original", _run_key("train", train, _key(scenario, facts, seed, "original")))]
        runs += [(f"RT-{fraction_tag(f)}", _run_key("train", train, _key(scenario, facts, seed, "RT", f)))
                 for f in scenario.fractions]
        runs += [(f"{label}-{fraction_tag(f)}-{p}", _run_key(*specs[label], _key(scenario, facts, seed, label, f, p)))
                 for label in labels for f in scenario.fractions for p in scenario.precisions]
        for tag, key in runs:
            final, folder = _paths(checkpoint_dir, seed, tag)
            problems += checkpoints.check([(final, key)])
            try:
                _check_trainer_folder(folder, key)
            except checkpoints.CheckpointError as e:
                problems.append(e)
    return problems


def run_scenario(scenario: LMScenario, seeds=(0, 1, 2), methods=None, *, device=None, progress=False,
                 checkpoint_dir=None, echo=print) -> dict:
    """Run every method on every split and seed, in every precision; per-seed rows and mean ± std over seeds."""
    from .experiment import _labels

    labels = _labels(scenario, methods)
    device = torch.device(device or "cpu")
    started = time.perf_counter()
    per_seed, info = {}, {}
    for seed in seeds:
        base = prepare_seed(scenario, seed, device=device, progress=progress, checkpoint_dir=checkpoint_dir)
        info[str(seed)] = {"train_seconds": base.train_seconds}
        per_seed[str(seed)] = {}
        for f in scenario.fractions:
            tag = fraction_tag(f)
            rows = {"Original": base.original_scores[(f, "float32")], "RT": base.rt[f]}
            for precision in scenario.precisions:
                if precision != "float32":
                    rows[row_label("Original", precision)] = base.original_scores[(f, precision)]
                for label in labels:
                    m = evaluate_run(scenario, base, f, label, scenario.methods[label], precision,
                                     checkpoint_dir=checkpoint_dir, progress=progress)
                    rows[row_label(label, precision)] = m
                    echo(f"[{scenario.name} seed {seed} {tag}] {row_label(label, precision)}: {_row_text(m)}")
            echo(f"[{scenario.name} seed {seed} {tag}] Original: {_row_text(rows['Original'])} | RT: "
                 f"{_row_text(rows['RT'])}")
            per_seed[str(seed)][tag] = rows
    order = ["Original", "RT"]
    for precision in scenario.precisions:
        order += ([row_label("Original", precision)] if precision != "float32" else []) + \
                 [row_label(label, precision) for label in labels]
    summary = {}
    for f in scenario.fractions:
        tag = fraction_tag(f)
        summary[tag] = {}
        for label in order:
            rows = [per_seed[str(s)][tag][label] for s in seeds]
            summary[tag][label] = {k: M.mean_std([r[k] for r in rows]) for k in LM_KEYS}
            summary[tag][label]["FQ band"] = sum(1 for r in rows if r["FQ"] >= FQ_BAND)
    return {
        "scenario": scenario.name, "kind": "language", "description": scenario.description, "seeds": list(seeds),
        "fractions": [fraction_tag(f) for f in scenario.fractions], "precisions": list(scenario.precisions),
        "methods": {label: scenario.methods[label] for label in labels}, "train": dict(scenario.train),
        "model": dict(scenario.model), "batch_size": scenario.batch_size, "evaluation": _eval_config(scenario),
        "device": str(device), "torch_threads": torch.get_num_threads(), "per_seed_info": info,
        "per_seed": {s: {t: {lab: _plain(m) for lab, m in rows.items()} for t, rows in d.items()}
                     for s, d in per_seed.items()},
        "summary": summary, "order": order, "wall_seconds": time.perf_counter() - started,
    }


def _plain(m):
    return {k: v for k, v in m.items() if not torch.is_tensor(v)}


def _row_text(m):
    return " ".join(f"{k}={m[k]:.3g}" for k in LM_KEYS if isinstance(m.get(k), float) and not math.isnan(m[k]))


# ---------------------------------------------------------------------------------------------- tuning
def tune(scenario: LMScenario, grids: dict, seeds=None, *, fraction=None, device=None, progress=False,
         checkpoint_dir=None, echo=print) -> dict:
    """The tuning protocol of the other scenarios with TOFU's yardsticks, on the tuning seeds (never the
    reported ones), the ``tuning_fraction`` split and float32: a configuration is eligible when it keeps the
    model utility at least :data:`UTILITY_KEPT` of the original's on every seed; among the eligible ones the
    highest mean log10 forget quality wins (ties: the MIA loss AUC closest to RT's). With none eligible, the
    highest mean utility ratio wins. ``checkpoint_dir`` keeps the originals and RTs for the next call."""
    seeds = tuple(scenario.tuning_seeds if seeds is None else seeds)
    fraction = scenario.tuning_fraction if fraction is None else fraction
    bases = [prepare_seed(scenario, s, (fraction,), device=device, progress=progress, checkpoint_dir=checkpoint_dir,
                          precisions=("float32",)) for s in seeds]
    best, trials = {}, []
    for label, grid in grids.items():
        scored = []
        for config in grid:
            rows = [evaluate_run(scenario, b, fraction, label, config, "float32", progress=progress) for b in bases]
            ratios = [r["MU"] / b.original_scores[(fraction, "float32")]["MU"] for r, b in zip(rows, bases)]
            log_fq = float(np.mean([math.log10(max(r["FQ"], 1e-300)) for r in rows]))
            auc_gap = float(np.mean([abs(r["MIA loss"] - b.rt[fraction]["MIA loss"]) for r, b in zip(rows, bases)]))
            eligible = min(ratios) >= UTILITY_KEPT
            trials.append({"label": label, "config": config, "log10 FQ": log_fq, "MU ratio": ratios,
                           "AUC gap": auc_gap, "eligible": eligible, "rows": [_plain(r) for r in rows]})
            rank = (-log_fq, auc_gap) if eligible else (-float(np.mean(ratios)), 0.0)
            scored.append((not eligible, *rank, len(scored), config))
            echo(f"[tune {scenario.name}] {label} {config}: log10 FQ={log_fq:.2f} MU/orig={min(ratios):.3f} "
                 f"AUC gap={auc_gap:.3f}" + ("" if eligible else " (not eligible)"))
        best[label] = min(scored, key=lambda t: t[:4])[4]
    return {"best": best, "trials": trials, "seeds": list(seeds), "fraction": fraction}


# ---------------------------------------------------------------------------------------------- reporting
def _fq_cell(mean, std):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.2g} ± {std:.2g}"


def format_table(results: dict, tag: str, *, markdown: bool = True) -> str:
    """Mean ± std over seeds of the ``tag`` split; "p ≥ 0.05" counts the seeds within RT's forget-quality band."""
    from .experiment import _cell
    from .generation import _render

    n = len(results["seeds"])
    header = ["Method", "FQ ↑", "p ≥ 0.05"] + [c[1] for c in LM_COLUMNS[1:]]
    body = []
    for label in results["order"]:
        s = results["summary"][tag][label]
        body.append([label, _fq_cell(*s["FQ"]), f"{s['FQ band']}/{n}"]
                    + [_cell(*s[key], digits) for key, _, digits in LM_COLUMNS[1:]])
    return _render(header, body, markdown)


def quality_bar(results: dict, *, method: str = "SFR-on", tag: str = "f05") -> list:
    """The bar as (met, sentence) pairs, on the ``tag`` split: ``method`` within RT's forget-quality band
    (KS p >= 0.05) on every seed, its utility at least 95 % of the original's, and the MIA AUCs (loss and
    Min-K) closest to RT's among the methods that keep utility (mean over seeds, float32 rows)."""
    if tag not in results["summary"] or method not in results["summary"][tag]:
        return [(False, f"{method} did not run on the {tag} split")]
    seeds = [str(s) for s in results["seeds"]]
    rows = {s: results["per_seed"][s][tag] for s in seeds}
    checks = []
    fqs = [rows[s][method]["FQ"] for s in seeds]
    checks.append((min(fqs) >= FQ_BAND, f"{method} forget quality (KS p vs RT) on {tag}: "
                   + ", ".join(f"{v:.2g}" for v in fqs) + f" (seeds {', '.join(seeds)}; band p >= {FQ_BAND})"))
    ratio = {lab: [rows[s][lab]["MU"] / rows[s]["Original"]["MU"] for s in seeds]
             for lab in results["order"] if lab in rows[seeds[0]] and "(bf16)" not in lab}
    r = ratio[method]
    checks.append((min(r) >= UTILITY_KEPT, f"{method} model utility {np.mean(r):.4f} of the original's (worst seed "
                   f"{min(r):.4f}; bar {UTILITY_KEPT})"))
    methods = [lab for lab in ratio if lab not in ("Original", "RT")]
    keepers = [lab for lab in methods if np.mean(ratio[lab]) >= UTILITY_KEPT]
    for attack in ("MIA loss", "MIA Min-K"):
        gaps = {lab: float(np.mean([abs(rows[s][lab][attack] - rows[s]["RT"][attack]) for s in seeds]))
                for lab in methods}
        others = ", ".join(f"{lab} {gaps[lab]:.3f}" for lab in sorted(keepers, key=gaps.get) if lab != method)
        mine = f"{method} {gaps[method]:.3f}" + ("" if method in keepers else
                                                 " (its utility is below the bar, so it does not count)")
        met = method in keepers and min(gaps[lab] for lab in keepers) == gaps[method]
        checks.append((met, f"{attack} AUC distance to RT's (mean over seeds): {mine}; other methods that keep "
                       f"utility: {others or 'none'}"))
    return checks


def plot_results(results: dict, path: str) -> None:
    """Per split: forget quality (log), utility relative to the original, and the MIA AUCs, float32 next to bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = results["fractions"]
    labels = [lab for lab in results["order"] if "(bf16)" not in lab and lab != "RT"]
    fig, axes = plt.subplots(len(tags), 3, figsize=(16, 3.6 * len(tags)), squeeze=False)
    x = np.arange(len(labels))
    for row, tag in zip(axes, tags):
        s = results["summary"][tag]
        orig_mu = s["Original"]["MU"][0]
        for j, (suffix, name) in enumerate((("", "float32"), (" (bf16)", "bf16"))):
            present = [lab + suffix in s for lab in labels]
            if not any(present):
                continue
            off = (j - 0.5) * 0.38
            fq = [s[lab + suffix]["FQ"][0] if p else np.nan for lab, p in zip(labels, present)]
            mu = [s[lab + suffix]["MU"][0] / orig_mu if p else np.nan for lab, p in zip(labels, present)]
            row[0].bar(x + off, np.maximum(fq, 1e-30), 0.38, label=name)
            row[1].bar(x + off, mu, 0.38, label=name)
            for k, attack in enumerate(("MIA loss", "MIA Min-K")):
                auc = [s[lab + suffix][attack][0] if p else np.nan for lab, p in zip(labels, present)]
                row[2].scatter(x + off, auc, marker="o" if k == 0 else "^", s=22,
                               label=f"{name}, {'loss' if k == 0 else 'Min-K'}")
        row[0].set_yscale("log")
        row[0].axhline(FQ_BAND, color="k", lw=0.8, ls="--")
        row[0].set_title(f"{tag}: forget quality (KS p vs RT, log) ↑")
        row[1].axhline(UTILITY_KEPT, color="k", lw=0.8, ls="--")
        row[1].set_ylim(0, 1.15)
        row[1].set_title(f"{tag}: model utility / original's")
        for attack, style in (("MIA loss", "-"), ("MIA Min-K", ":")):
            row[2].axhline(s["RT"][attack][0], color="tab:red", lw=0.9, ls=style)
        row[2].set_title(f"{tag}: MIA AUC (red lines: RT, loss solid, Min-K dotted)")
        for ax in row:
            ax.set_xticks(x, labels, rotation=30)
        row[0].legend(fontsize=7)
        row[2].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{results['scenario']}: seeds {results['seeds']}, mean over seeds", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_results(results: dict, echo=print) -> None:
    echo(f"## {results['scenario']}: {results['description']}")
    echo(f"seeds {results['seeds']}; mean ± std. FQ = KS-test p-value of the forget questions' truth ratios against "
         "RT's (p ≥ 0.05: within RT's band), MU = model utility, F-/R- = forget/retain answer probability, ROUGE-L "
         "recall and truth ratio, AUC = membership attack (forget vs never-seen people; RT ≈ 0.5), RTE in seconds")
    for tag in results["fractions"]:
        echo(f"\n### forget split {tag}")
        echo(format_table(results, tag, markdown=False))
    echo("\nQuality bar (5 % split):")
    for met, sentence in quality_bar(results):
        echo(f"  [{'met' if met else 'NOT met'}] {sentence}")


def write_outputs(results: dict, out: str) -> None:
    """results.json, table.md and results.png in ``out``."""
    from .experiment import save_json

    os.makedirs(out, exist_ok=True)
    save_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(f"### {results['scenario']}\n\n{results['description']}. Seeds {results['seeds']}, mean ± std.\n")
        for tag in results["fractions"]:
            fh.write(f"\n#### forget split {tag}\n\n" + format_table(results, tag) + "\n")
        fh.write("\nQuality bar (5 % split):\n\n")
        for met, sentence in quality_bar(results):
            fh.write(f"- {'met' if met else '**not met**'}: {sentence}\n")
    plot_results(results, os.path.join(out, "results.png"))
