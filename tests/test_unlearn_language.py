"""Unlearning facts from a causal LM (scenario ``facts-lm``): the facts generator and its splits, every method's
loss on hand-computed cases, the TOFU yardsticks on constructed distributions, every method end to end on a tiny
budget, resume after Ctrl-C, and the command line's checks."""

import gc
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchmetrics")
pytest.importorskip("scipy")

from sfron_ops import adaptive_weights  # noqa: E402
from sfron_ops.integrations.hf import ForgetRetainDataset, SFRonTrainer, per_sample_loss  # noqa: E402
from sfron_ops.unlearn import checkpoints, cli, language, presets  # noqa: E402
from sfron_ops.unlearn import metrics as M  # noqa: E402
from sfron_ops.unlearn.facts import RELATIONS, Collator, build_tokenizer, encode, encode_all, make_facts  # noqa: E402
from sfron_ops.unlearn.lm import UnlearnTrainer, npo_loss, sequence_nll, simnpo_loss  # noqa: E402
from sfron_ops.unlearn.runner import RunInterrupted  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def frozen_heap():
    """The Trainer calls gc.collect() at the start of every train(); with the objects alive now (torch,
    transformers, ...) frozen, it walks only what the tests create, not the whole heap each time."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(n_embd=32, n_layer=1, n_head=2)


# ---------------------------------------------------------------------------------------------- the facts
def _texts(facts):
    return [(q.person, q.relation, q.question, q.answer, q.paraphrase, q.perturbed, q.value)
            for q in facts.qa + facts.world + facts.holdout]


def test_facts_are_a_function_of_the_seed_in_any_process():
    a, b, c = make_facts(7, 60), make_facts(7, 60), make_facts(8, 60)
    assert _texts(a) == _texts(b) and a.forget_order == b.forget_order
    assert a.identity() == b.identity() and a.identity() != c.identity() and _texts(a) != _texts(c)
    code = ("from sfron_ops.unlearn.facts import make_facts; import json; "
            "print(json.dumps(make_facts(7, 60).identity()))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout) == a.identity(), out.stderr


def test_splits_are_whole_people_disjoint_and_nested():
    facts = make_facts(0, 200)
    assert len(facts.qa) == 200 * len(RELATIONS) and len({p[1] for p in facts.people}) == 200  # unique surnames
    forgotten = {f: set(facts.forget_people(f)) for f in (0.01, 0.05, 0.10)}
    assert [len(v) for v in forgotten.values()] == [2, 10, 20]
    assert forgotten[0.01] < forgotten[0.05] < forgotten[0.10]  # TOFU's nested forget01/05/10
    for f, people in forgotten.items():
        s = facts.split(f)
        forget, retain, holdout = ({q.person for q in s[k]} for k in ("forget", "retain", "holdout"))
        assert forget == people and not forget & retain and not holdout & (forget | retain)
        assert len(holdout) == len(people) and len(s["forget"]) == len(people) * len(RELATIONS)
        assert len(s["forget"]) + len(s["retain"]) == len(facts.qa) and s["world"] == facts.world
    for q in facts.qa[:60] + facts.world:
        assert len(set(q.perturbed)) == len(q.perturbed) and q.paraphrase not in q.perturbed
        before, after = q.paraphrase.split(q.value)
        for wrong in q.perturbed:  # the same sentence with only the value swapped
            assert wrong.startswith(before) and wrong.endswith(after) and q.value not in wrong.split()
    assert all(q.answer != q.paraphrase and q.value in q.answer for q in facts.qa)
    with pytest.raises(ValueError, match="Invalid forget fraction: 1.5"):
        facts.split(1.5)


def test_tokenizer_and_encoding():
    facts = make_facts(1, 20)
    tok = build_tokenizer(facts)
    q = facts.qa[3]
    e = encode(tok, q.question, q.answer)
    assert e["input_ids"][0] == tok.bos_token_id and e["input_ids"][-1] == tok.eos_token_id
    answer = e["labels"][e["labels"] != -100]
    assert tok.decode(answer, skip_special_tokens=True) == q.answer and answer[-1] == tok.eos_token_id
    assert tok.decode(e["input_ids"], skip_special_tokens=True) == f"question : {q.question} answer : {q.answer}"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode(tok, q.question, "an unheard-of word")
    batch = Collator(tok.pad_token_id)(encode_all(tok, facts.qa[:5]))
    assert (batch["attention_mask"] == (batch["input_ids"] != tok.pad_token_id)).all()
    assert ((batch["labels"] == -100) | (batch["attention_mask"] == 1)).all()


# ---------------------------------------------------------------------------------------------- losses by hand
def _batch(seed=0, n=3, vocab=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, 7), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 5:] = -100  # a shorter answer
    return ids, labels


def _hand_token_losses(logits, labels):
    """Next-token losses of each sequence's labelled tokens, one by one."""
    out = []
    for row, lab in zip(logits, labels):
        losses = []
        for t in range(1, len(lab)):
            if lab[t] != -100:
                losses.append(-torch.log_softmax(row[t - 1].double(), -1)[lab[t]])
        out.append(torch.stack(losses))
    return out


def test_sequence_losses_by_hand():
    ids, labels = _batch()
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(1))
    hand = _hand_token_losses(logits, labels)
    torch.testing.assert_close(per_sample_loss(logits, labels, "sum").double(), torch.stack([h.sum() for h in hand]))
    torch.testing.assert_close(per_sample_loss(logits, labels).double(), torch.stack([h.mean() for h in hand]))
    nll, length = sequence_nll(logits, labels)
    assert length.tolist() == [len(h) for h in hand] == [4, 2, 4]
    with pytest.raises(ValueError, match="Invalid reduction"):
        per_sample_loss(logits, labels, "max")


def test_npo_and_simnpo_losses_by_hand():
    nll, ref = torch.tensor([2.0, 4.0]), torch.tensor([3.0, 3.0])

    def softplus(x):
        return math.log1p(math.exp(x))

    # NPO: (2 / beta) mean softplus(beta (ref - nll)) = (2 / beta) mean log(1 + (pi / pi_ref)^beta)
    assert float(npo_loss(nll, ref, 0.1)) == pytest.approx(20 * (softplus(0.1) + softplus(-0.1)) / 2, rel=1e-6)
    assert float(npo_loss(nll, nll, 0.5)) == pytest.approx(4 * math.log(2), rel=1e-6)  # at the start: 4 log 2
    # SimNPO: (2 / beta) mean softplus(-beta (nll / |y| - delta))
    length = torch.tensor([4, 2])
    want = (2 / 4.5) * (softplus(-4.5 * (0.5 - 0.1)) + softplus(-4.5 * (2.0 - 0.1))) / 2
    assert float(simnpo_loss(nll, length, 4.5, 0.1)) == pytest.approx(want, rel=1e-6)


def _tiny_lm(seed=0, vocab=11):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=8,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _hand_losses(model, ref, forget, retain):
    """Every baseline's loss written out from the token losses (TOFU-style definitions)."""
    f_tok = _hand_token_losses(model(input_ids=forget[0]).logits, forget[1])
    r_tok = _hand_token_losses(model(input_ids=retain[0]).logits, retain[1])
    ref_tok = _hand_token_losses(ref(input_ids=forget[0]).logits, forget[1])
    ce_f, ce_r = torch.cat(f_tok).mean(), torch.cat(r_tok).mean()  # token means over the batch, as HF's loss
    nll = torch.stack([t.sum() for t in f_tok])
    ref_nll = torch.stack([t.sum() for t in ref_tok])
    lengths = torch.tensor([len(t) for t in f_tok], dtype=torch.float64)
    npo = (2 / 0.1) * F.softplus(0.1 * (ref_nll - nll)).mean()
    simnpo = (2 / 4.5) * F.softplus(-4.5 * (nll / lengths - 0.0)).mean()
    return {"ga": -ce_f, "graddiff": -ce_f + ce_r, "npo": npo + ce_r, "simnpo": 0.125 * simnpo + ce_r, "ft": ce_r}


@pytest.mark.parametrize("loss", ["ga", "graddiff", "npo", "simnpo", "ft"])
def test_unlearn_trainer_losses_by_hand(loss, tmp_path):
    model = _tiny_lm()
    ref = _tiny_lm()
    with torch.no_grad():  # the model has moved away from its reference (NPO's start)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    forget, retain = _batch(1), _batch(2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = UnlearnTrainer(model=model, args=args, loss=loss, ref_model=ref)
    inputs = {"forget": {"input_ids": forget[0], "labels": forget[1]},
              "retain": {"input_ids": retain[0], "labels": retain[1]}}
    got = trainer.compute_loss(model, inputs)
    torch.testing.assert_close(got.double(), _hand_losses(model, ref, forget, retain)[loss], rtol=1e-5, atol=1e-6)


def test_unlearn_trainer_rejects_bad_constants(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="Invalid loss: 'dpo'"):
        UnlearnTrainer(model=_tiny_lm(), args=args, loss="dpo")
    with pytest.raises(ValueError, match="ga has no constant 'beta'"):
        UnlearnTrainer(model=_tiny_lm(), args=args, loss="ga", beta=0.1)
    with pytest.raises(ValueError, match="Invalid beta: 0"):
        UnlearnTrainer(model=_tiny_lm(), args=args, loss="npo", beta=0)


def test_sfron_forget_loss_is_adaptive_over_answer_nll(tmp_path):
    model = _tiny_lm()
    ids, labels = _batch(3)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SFRonTrainer(model=model, args=args, sequence_loss="sum", lambd=0.5)
    got = trainer.compute_forget_loss(model, {"input_ids": ids, "labels": labels})
    nll = torch.stack([t.sum() for t in _hand_token_losses(model(input_ids=ids).logits, labels)])
    c = 1 / nll.detach() ** 0.5
    torch.testing.assert_close(got.double(), (len(c) * c / c.sum() * nll).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, (adaptive_weights(nll.float()) * nll.float()).mean())
    with pytest.raises(ValueError, match="Invalid sequence_loss: 'max'"):
        SFRonTrainer(model=model, args=args, sequence_loss="max")


def test_forget_anchored_pairs_are_epochs_over_the_forget_set():
    forget, retain = list(range(5)), list(range(100, 130))
    data = ForgetRetainDataset(forget, retain, anchor="forget", epochs=3, seed=4)
    assert len(data) == 15
    items = [data[i] for i in range(15)]
    for e in range(3):  # each epoch is a new order of the whole forget set
        assert sorted(it["forget"] for it in items[5 * e: 5 * e + 5]) == forget
    assert [it["forget"] for it in items[:5]] != [it["forget"] for it in items[5:10]]
    assert all(it["retain"] in retain for it in items) and len({it["retain"] for it in items}) > 5
    again = ForgetRetainDataset(forget, retain, anchor="forget", epochs=3, seed=4)
    assert [again[i] for i in range(15)] == items
    assert len(ForgetRetainDataset(forget, retain)) == 30  # the retain-anchored default is unchanged
    with pytest.raises(ValueError, match="Invalid anchor"):
        ForgetRetainDataset(forget, retain, anchor="both")
    with pytest.raises(ValueError, match="epochs applies to anchor='forget'"):
        ForgetRetainDataset(forget, retain, epochs=2)


# ---------------------------------------------------------------------------------------------- the yardsticks
def test_truth_ratio_by_hand():
    # P_true = 1/2; P_false = exp(-mean(log 4, log 16)) = 1/8 (a mean in log space, not of probabilities)
    tr = M.truth_ratios([math.log(2)], [[math.log(4), math.log(16)]])
    assert tr[0] == pytest.approx(0.25, rel=1e-9)
    assert M.truth_ratio_score([0.25, 2.0], "forget") == pytest.approx((0.25 + 0.5) / 2)
    assert M.truth_ratio_score([0.25, 2.0], "true_better") == pytest.approx((0.75 + 0.0) / 2)
    assert M.truth_ratio_score([1.0], "forget") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="perturbed_nll must be"):
        M.truth_ratios([1.0, 2.0], [[1.0]])


def test_forget_quality_on_constructed_distributions():
    rng = np.random.default_rng(0)
    rt = rng.lognormal(0.0, 0.5, 60)
    assert M.forget_quality(rt, rt) == 1.0
    # the exact two-sided KS p-value with all of one sample below the other, n = m = 3: 2 / C(6, 3)
    assert M.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    memorised = rng.lognormal(-3.0, 0.5, 60)        # true answers far more likely than the perturbed ones
    similar = rng.lognormal(0.0, 0.5, 60)
    assert M.forget_quality(memorised, rt) < 1e-10 < 0.05 < M.forget_quality(similar, rt)
    # KS reads the shape, not the direction: over-forgetting (TR far above 1) is as far from RT
    assert M.forget_quality(rng.lognormal(3.0, 0.5, 60), rt) < 1e-10


def test_utility_mia_and_rouge_by_hand():
    assert M.model_utility([0.5, 1.0]) == pytest.approx(2 / 3)
    assert M.model_utility([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="finite values"):
        M.model_utility([0.5, math.nan])
    assert M.min_k_score([torch.tensor([-1.0, -2, -3, -4, -5])], 0.4)[0] == pytest.approx(4.5)
    assert M.min_k_score([torch.tensor([-1.0, -2])], 0.4)[0] == pytest.approx(2.0)  # at least one token
    assert M.mia_auc([0.1, 0.2], [0.5, 0.6]) == 1.0 and M.mia_auc([0.5, 0.6], [0.1, 0.2]) == 0.0
    assert M.mia_auc([0.3, 0.3], [0.3, 0.3]) == 0.5
    # LCS("a b c", "a c d") = "a c": recall 2/3; a perfect answer: 1
    assert M.rouge_l_recall(["a b c", "x y"], ["a c d", "x y"]) == pytest.approx((2 / 3 + 1) / 2, rel=1e-6)
    assert M.rouge_l_recall(["The Cat."], ["the cat"]) == pytest.approx(1.0)


def test_quality_bar_on_constructed_results():
    def row(fq, mu, auc):
        return {"FQ": fq, "MU": mu, "MIA loss": auc, "MIA Min-K": auc}

    def results(sfron_mu):
        per_seed = {s: {"f05": {"Original": row(1e-9, 0.70, 1.0), "RT": row(1.0, 0.70, 0.5),
                                "SFR-on": row(fq, sfron_mu, 0.3), "NPO": row(1e-3, 0.69, 0.9),
                                "GA": row(0.5, 0.30, 0.5)}} for s, fq in (("0", 0.2), ("1", 0.04))}
        return {"seeds": [0, 1], "per_seed": per_seed, "summary": {"f05": {"SFR-on": {}}},
                "order": ["Original", "RT", "SFR-on", "NPO", "GA"]}

    (fq_met, fq), (mu_met, mu), (loss_met, loss), _ = language.quality_bar(results(0.68))
    assert not fq_met and "0.2, 0.04" in fq             # one seed out of the band
    assert mu_met and "0.9714" in mu
    assert loss_met and "SFR-on 0.200" in loss and "NPO 0.400" in loss and "GA" not in loss  # GA broke the model
    (_, _), (mu_met, mu), (loss_met, loss), _ = language.quality_bar(results(0.66))
    assert not mu_met and "worst seed 0.9429" in mu
    assert not loss_met and "SFR-on 0.200 (its utility is below the bar" in loss  # the distance is still given


# ---------------------------------------------------------------------------------------------- end to end
def tiny_scenario(labels=tuple(presets.FACTS_LM), **kw):
    methods = {label: dict(presets.FACTS_LM[label], epochs=1) for label in labels}
    return presets.facts_lm_scenario(people=20, fractions=(0.1,), model=TINY_MODEL, methods=methods,
                                     train=dict(presets.FACTS_TRAIN, epochs=2, batch_size=16), batch_size=4,
                                     eval_retain_people=3, max_new_tokens=4, **kw)


def test_every_method_end_to_end(tmp_path):
    scenario = tiny_scenario(precisions=("float32",))
    results = language.run_scenario(scenario, seeds=(0,), checkpoint_dir=str(tmp_path / "ckpt"), echo=lambda s: None)
    rows = results["per_seed"]["0"]["f10"]
    labels = list(presets.FACTS_LM)
    assert results["order"] == ["Original", "RT", *labels]
    assert rows["RT"]["FQ"] == 1.0
    for label, m in rows.items():
        assert 0 <= m["FQ"] <= 1 and 0 <= m["MU"] <= 1 and 0 <= m["MIA loss"] <= 1, label
        assert len(m["forget_tr_values"]) == 2 * len(RELATIONS), label
    for label in labels:  # every run moved the model and took time
        assert rows[label]["RTE"] > 0 and rows[label]["forget_prob"] != rows["Original"]["forget_prob"], label
    assert rows["GradAscent"]["forget_prob"] < rows["Original"]["forget_prob"]
    assert rows["SFR-on"]["info"]["mask_kept"] < rows["SFR-on"]["info"]["mask_total"]
    # a second call reads every run and score back from the checkpoints
    again = language.run_scenario(scenario, seeds=(0,), checkpoint_dir=str(tmp_path / "ckpt"), echo=lambda s: None)
    assert again["per_seed"]["0"]["f10"]["NPO"]["FQ"] == rows["NPO"]["FQ"]


def test_bfloat16_beside_float32_in_the_table_and_plot(tmp_path):
    scenario = tiny_scenario(("SFR-on", "GradDiff"))
    results = language.run_scenario(scenario, seeds=(0,), checkpoint_dir=str(tmp_path / "ckpt"), echo=lambda s: None)
    assert results["order"] == ["Original", "RT", "SFR-on", "GradDiff", "Original (bf16)", "SFR-on (bf16)",
                                "GradDiff (bf16)"]
    rows = results["per_seed"]["0"]["f10"]
    for label in ("SFR-on", "GradDiff"):  # the bf16 run is its own run, not the float32 one relabelled
        assert rows[f"{label} (bf16)"]["forget_tr_values"] != rows[label]["forget_tr_values"], label
    saved = checkpoints.read(str(tmp_path / "ckpt" / "seed0" / "SFR-on-f10-bfloat16.pt"))
    assert {t.dtype for t in saved["model"].values() if t.is_floating_point()} == {torch.bfloat16}
    language.write_outputs(results, str(tmp_path / "out"))
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| SFR-on (bf16) |" in table and "| GradDiff (bf16) |" in table and "Quality bar" in table
    assert (tmp_path / "out" / "results.png").stat().st_size > 0


def _flat(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("label, precision", [("SFR-on", "float32"), ("NPO", "bfloat16")])
def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path, label, precision, monkeypatch):
    scenario = tiny_scenario(precisions=(precision,))
    scenario.methods[label]["epochs"] = 3
    base = language.prepare_seed(scenario, 0, checkpoint_dir=str(tmp_path / "a"))
    spec = scenario.methods[label]
    whole, _, _, _ = language.unlearn(scenario, base, 0.1, label, spec, precision)

    from sfron_ops.unlearn.lm import RunClock

    original_end = RunClock.on_step_end

    def ctrl_c_at_step_2(self, args, state, control, **kw):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # held by the clock until the step ends
        return original_end(self, args, state, control, **kw)

    monkeypatch.setattr(RunClock, "on_step_end", ctrl_c_at_step_2)
    with pytest.raises(RunInterrupted, match="stopped after iteration 2/9"):
        language.unlearn(scenario, base, 0.1, label, spec, precision, checkpoint_dir=str(tmp_path / "a"))
    monkeypatch.setattr(RunClock, "on_step_end", original_end)
    folder = tmp_path / "a" / "seed0" / f"{label}-f10-{precision}.trainer"
    assert (folder / "checkpoint-2").is_dir()
    resumed, seconds, _, saved = language.unlearn(scenario, base, 0.1, label, spec, precision,
                                                  checkpoint_dir=str(tmp_path / "a"))
    assert torch.equal(_flat(resumed), _flat(whole)) and seconds > 0 and saved["iteration"] == 9
    assert not folder.exists()  # a finished run keeps its model, not the Trainer's checkpoints
    # a run with other settings refuses the checkpoint, naming what differs
    with pytest.raises(checkpoints.CheckpointError, match="hparams.lr"):
        language.unlearn(scenario, base, 0.1, label, dict(spec, lr=0.5), precision, checkpoint_dir=str(tmp_path / "a"))


def test_command_line_checks_before_training(tmp_path, capsys):
    out = str(tmp_path / "out")
    for flags, names in [(["--model", "mlp"], ["--model", "facts-lm"]),
                         (["--forget", "class:1"], ["random:FRACTION"]),
                         (["--set", "NPO.beta=0"], ["NPO", "beta"]),
                         (["--methods", "SFR-on,RT"], ["RT"])]:
        assert cli.main(["run", "--scenario", "facts-lm", "--out", out, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in names), err
    assert not os.path.exists(out)
    args = cli.build_parser().parse_args(["run", "--scenario", "facts-lm", "--forget", "random:0.05", "--epochs", "3",
                                          "--seeds", "0", "--out", out])
    plan = cli.prepare(args)
    assert plan.scenario.fractions == (0.05,) and plan.scenario.train["epochs"] == 3
    # a run folder of another run is found before training and named
    folder = Path(plan.checkpoint_dir) / "seed0" / "original.trainer"
    folder.mkdir(parents=True)
    (folder / "key.json").write_text(json.dumps({"run": "original", "seed": 5}))
    assert cli.main(["run", "--scenario", "facts-lm", "--forget", "random:0.05", "--seeds", "0", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "original.trainer belongs to another run" in err and "pass --overwrite" in err
