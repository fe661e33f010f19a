"""Synthetic facts about fictitious people, in the shape of TOFU, and the tiny causal LM that learns them.

:func:`make_facts` draws, from a seed, ``people`` fictitious people (a first name and a surname that
no one else has) with one fact per relation (where they were born, their trade, the year of their
birth, their best-known book, a prize, their teacher), each as a question and an answer. Every
relation has two answer sentences; the training answer of a fact uses one of them (drawn per fact)
and its *paraphrase* the other, and its *perturbed* answers are the paraphrase with the value
swapped for ``perturbed`` distinct wrong values of the relation. A block of world facts (the capital
and the language of fictitious countries) is trained into every model, as TOFU's real-world sets.

Splits are whole people: ``forget`` holds 1, 5 or 10 % of the people (nested, as TOFU's forget01 ⊂
forget05 ⊂ forget10), ``retain`` the rest, and ``holdout`` people that no model ever sees (the
non-members of the membership attack). Nothing is downloaded: the tokenizer is a word-level
``tokenizers`` model over the data's own words (:func:`build_tokenizer`), wrapped as a
``transformers.PreTrainedTokenizerFast``, and the model is a GPT-2 built from a config
(:func:`build_lm`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .checkpoints import digest

SPLITS = (0.01, 0.05, 0.10)
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

_FIRST = ("mira", "tomas", "elin", "jovan", "sela", "aric", "nadia", "oren", "lisbet", "kaspar", "ines", "dario",
          "yara", "felix", "runa", "matteo", "ilse", "corin", "amara", "lukas", "sunniva", "piet", "zora", "emil",
          "talia", "bram", "noor", "viggo", "alma", "teodor")
_SYLLABLES = ("bar", "ven", "tor", "mil", "dra", "sel", "kor", "lun", "fen", "gal", "mor", "tis", "rud", "nal", "bel",
              "qua", "zen", "hol", "per", "vin", "cas", "dul", "rim", "sto", "wex", "ath", "lor", "pim", "gre", "ost")
_CITIES = ("tarsk", "velmora", "quillon", "ostrava", "brennick", "halvard", "sorrento", "limmat", "cadris", "dunmere",
           "ketterby", "vosk", "aldane", "merrow", "pellan", "ruskin", "tovell", "yarrow", "zembla", "fennick")
_TRADES = ("glassblower", "cartographer", "beekeeper", "luthier", "astronomer", "bookbinder", "surveyor", "chemist",
           "clockmaker", "ferryman", "weaver", "botanist", "engraver", "brewer", "stonemason", "archivist",
           "shipwright", "violinist", "translator", "apothecary")
_YEARS = tuple(str(y) for y in range(1930, 1990))
_ADJ = ("silent", "amber", "hollow", "northern", "broken", "gilded", "quiet", "distant")
_NOUN = ("harbor", "orchard", "lantern", "meridian", "cathedral", "winter", "compass", "garden")
_BOOKS = tuple(f"{a} {n}" for a in _ADJ for n in _NOUN)
_PRIZES = ("halcyon", "meridel", "ostwin", "varrow", "celandine", "brightwater", "quenby", "lowell", "amberlin",
           "tessaly", "corvane", "pellucid", "rindle", "saffier", "wendmoor")
_TEACHERS = tuple(f"master {t}" for t in ("oduya", "hellqvist", "marchetti", "okonkwo", "dvorak", "lindqvist",
                                         "achterberg", "ferreira", "nakashima", "abernathy", "kowalczyk", "ibsen",
                                         "castellanos", "petrakis", "vantongeren", "radulescu", "halloran", "sato",
                                         "brandvold", "eriksen"))
_COUNTRIES = ("veldoria", "ostmark", "caldera", "lunesse", "pravik", "tarrow", "ismene", "korvath", "belladre",
              "quivira", "sorvana", "zantor", "mireth", "dovland", "elsweyr", "fanorra", "gavrel", "hesper", "ulvik",
              "norrath", "pelagia", "rhuna", "syldor", "trevane", "vasquor", "wyrmland", "yessen", "arcadel",
              "brisk", "corvenna")
_CAPITALS = ("amsel", "brodny", "cerrin", "dalvik", "estra", "folkas", "garrow", "hythe", "ivrel", "jessop",
             "kalmar", "leden", "mossel", "norvik", "orlen", "pazzo", "quarry", "rossel", "saltby", "tulvan",
             "ulmen", "vanta", "wexley", "xandar", "yorrin", "zeffa", "abrel", "bastide", "corlin", "dunvar")
_LANGUAGES = ("veldic", "ostric", "calder", "lunese", "pravic", "tarrish", "ismenic", "korvish", "bellic", "quiviran")

# relation -> (question, first answer, second answer, values); {s}: the subject, {v}: the value
RELATIONS = {
    "birthplace": ("where was {s} born ?", "{s} was born in {v} .", "the birthplace of {s} is {v} .", _CITIES),
    "trade": ("what does {s} do for a living ?", "{s} works as a {v} .", "by trade {s} is a {v} .", _TRADES),
    "year": ("in which year was {s} born ?", "{s} was born in the year {v} .", "the year of birth of {s} is {v} .",
             _YEARS),
    "book": ("what is the best known book by {s} ?", "{s} is best known for the book {v} .",
             "the most famous work of {s} is {v} .", _BOOKS),
    "prize": ("which prize did {s} win ?", "{s} won the {v} prize .", "the prize awarded to {s} was the {v} prize .",
              _PRIZES),
    "teacher": ("who was the teacher of {s} ?", "{s} studied under {v} .", "the teacher of {s} was {v} .", _TEACHERS),
}
WORLD_RELATIONS = {
    "capital": ("what is the capital of {s} ?", "the capital of {s} is {v} .", None, _CAPITALS),
    "language": ("which language is spoken in {s} ?", "the people of {s} speak {v} .", None, _LANGUAGES),
}


@dataclass
class QA:
    """One question and its answers. ``perturbed`` are wrong answers in the frame of ``paraphrase``."""

    person: int                 # index of the person (-1 for a world fact)
    relation: str
    question: str
    answer: str                 # the trained answer
    paraphrase: str             # the same fact in the other sentence (the original answer for world facts)
    perturbed: tuple            # the paraphrase with the value swapped for a wrong one
    value: str


@dataclass
class Facts:
    """A drawn world: every person's facts, the world facts, and the people of each split."""

    seed: int
    people: list                # (first name, surname) per person
    qa: list                    # QA of every person, ``relations`` per person in order
    world: list                 # QA of the world facts (trained into every model)
    holdout: list               # QA of people no model sees
    forget_order: list          # people in the order they are forgotten: the first k form the forget set
    relations: int = len(RELATIONS)
    holdout_people: list = field(default_factory=list)

    def forget_people(self, fraction: float) -> list:
        """The forgotten people of the ``fraction`` split (rounded, at least one): a prefix of ``forget_order``,
        so the 1 % split lies inside the 5 % one and that inside the 10 % one."""
        check_fraction(fraction)
        k = max(1, round(fraction * len(self.people)))
        return sorted(self.forget_order[:k])

    def split(self, fraction: float) -> dict:
        """``{"forget", "retain", "holdout", "world"}`` lists of QA for the ``fraction`` split; ``holdout`` has as
        many people as ``forget`` (TOFU's holdout01/05/10)."""
        forgotten = set(self.forget_people(fraction))
        n = len(forgotten)
        if n > len(self.holdout_people):
            raise ValueError(f"fraction {fraction}: {n} forgotten people but only {len(self.holdout_people)} "
                             "holdout people")
        keep_holdout = set(self.holdout_people[:n])
        return {"forget": [q for q in self.qa if q.person in forgotten],
                "retain": [q for q in self.qa if q.person not in forgotten],
                "holdout": [q for q in self.holdout if q.person in keep_holdout],
                "world": list(self.world)}

    def identity(self) -> dict:
        """What determines the data: the generator's arguments and a digest of every question and answer."""
        texts = [f"{q.question}|{q.answer}|{q.paraphrase}|{'|'.join(q.perturbed)}"
                 for q in self.qa + self.world + self.holdout]
        return {"kind": "facts", "seed": self.seed, "people": len(self.people), "digest": digest("\n".join(texts))}


def check_fraction(fraction) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"Invalid forget fraction: {fraction!r}; expected a number between 0 and 1 (exclusive)")


def _surnames(rng: random.Random, n: int, taken: set) -> list:
    names = []
    while len(names) < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
        if word not in taken:
            taken.add(word)
            names.append(word)
    return names


def _fact(rng, person, subject, relation, question, first, second, values, perturbed, world=False):
    value = rng.choice(values)
    if world:  # one sentence: the trained answer is also the "true" answer of the truth ratio
        answer = paraphrase = first
    else:
        answer, paraphrase = (first, second) if rng.random() < 0.5 else (second, first)
    wrong = rng.sample([v for v in values if v != value], perturbed)
    return QA(person, relation, question.format(s=subject), answer.format(s=subject, v=value),
              paraphrase.format(s=subject, v=value), tuple(paraphrase.format(s=subject, v=w) for w in wrong), value)


def make_facts(seed: int, people: int = 200, *, perturbed: int = 5, holdout_fraction: float = 0.1,
               countries: int = 30) -> Facts:
    """Draw the world of ``seed``: ``people`` people with one fact per relation, ``countries`` countries with a
    capital and a language each, ``holdout_fraction`` as many again people for the holdout, and the order in which
    people are forgotten. The same arguments give the same facts, in any process."""
    if isinstance(people, bool) or not isinstance(people, int) or people < 2:
        raise ValueError(f"Invalid people: {people!r}; expected an integer >= 2")
    if isinstance(perturbed, bool) or not isinstance(perturbed, int) or not 1 <= perturbed <= 7:
        raise ValueError(f"Invalid perturbed: {perturbed!r}; expected an integer from 1 to 7")
    if not 1 <= countries <= len(_COUNTRIES):
        raise ValueError(f"Invalid countries: {countries!r}; expected 1 to {len(_COUNTRIES)}")
    rng = random.Random(f"facts-{seed}")
    n_holdout = max(1, round(holdout_fraction * people))
    taken = set(_FIRST) | {w for values in (_CITIES, _TRADES, _PRIZES, _COUNTRIES, _CAPITALS, _LANGUAGES)
                           for v in values for w in v.split()}
    surnames = _surnames(rng, people + n_holdout, taken)
    everyone = [(rng.choice(_FIRST), s) for s in surnames]

    def facts_of(index, person):
        subject = " ".join(person)
        return [_fact(rng, index, subject, rel, *spec, perturbed) for rel, spec in RELATIONS.items()]

    qa = [f for i, p in enumerate(everyone[:people]) for f in facts_of(i, p)]
    holdout = [f for i, p in enumerate(everyone[people:], start=people) for f in facts_of(i, p)]
    world = []
    for c in _COUNTRIES[:countries]:
        for rel, (question, answer, _, values) in WORLD_RELATIONS.items():
            world.append(_fact(rng, -1, c, rel, question, answer, None, values, min(perturbed, 3), world=True))
    order = list(range(people))
    rng.shuffle(order)
    return Facts(seed, everyone[:people], qa, world, holdout, order,
                 holdout_people=list(range(people, people + n_holdout)))


# ---------------------------------------------------------------------------------------------- tokens
def vocabulary(facts: Facts) -> list:
    """Every word of the facts (questions, answers, paraphrases, perturbed answers, holdout), sorted, after the
    special tokens and the prompt words."""
    words = {"question", "answer", ":"}
    for q in facts.qa + facts.world + facts.holdout:
        for text in (q.question, q.answer, q.paraphrase, *q.perturbed):
            words.update(text.split())
    return list(SPECIAL.values()) + sorted(words)


def build_tokenizer(facts: Facts):
    """A word-level ``transformers.PreTrainedTokenizerFast`` over the facts' words (built here, no download):
    one token per word, ``<s>``/``</s>``/``<pad>``/``<unk>`` as its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(facts))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"])


def prompt_text(question: str) -> str:
    return f"question : {question} answer :"


def encode(tokenizer, question: str, answer: str) -> dict:
    """``input_ids`` (``<s>`` prompt answer ``</s>``) and ``labels`` (-100 on ``<s>`` and the prompt): the answer
    tokens and the final ``</s>`` are what the model is trained and scored on."""
    return encode_pairs(tokenizer, [question], [answer])[0]


def encode_pairs(tokenizer, questions: list, answers: list) -> list:
    """:func:`encode` of every ``(question, answer)`` pair, the texts tokenized in two batched calls."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        return []
    prompts = tokenizer([prompt_text(q) for q in questions], add_special_tokens=False)["input_ids"]
    replies = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    out = []
    for question, answer, prompt, reply in zip(questions, answers, prompts, replies):
        prompt, reply = [tokenizer.bos_token_id] + prompt, reply + [tokenizer.eos_token_id]
        if tokenizer.unk_token_id in prompt + reply:
            raise ValueError(f"words outside the vocabulary in {question!r} / {answer!r}")
        ids = torch.tensor(prompt + reply)
        labels = ids.clone()
        labels[: len(prompt)] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def encode_all(tokenizer, qa: list, field_name: str = "answer") -> list:
    """:func:`encode` of every QA with the answer in ``field_name`` ("answer" or "paraphrase")."""
    return encode_pairs(tokenizer, [q.question for q in qa], [getattr(q, field_name) for q in qa])


class Collator:
    """Right-pads ``input_ids`` with ``pad_id`` and ``labels`` with -100. Right padding keeps every real token's
    position and, under causal attention, its logits: the pads come after every labelled token."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list) -> dict:
        width = max(e["input_ids"].numel() for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            n = e["input_ids"].numel()
            ids[i, :n], labels[i, :n] = e["input_ids"], e["labels"]
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long(), "labels": labels}


# ---------------------------------------------------------------------------------------------- the model
LM_CONFIG = dict(n_embd=128, n_layer=2, n_head=4, n_positions=48)


def build_lm(tokenizer, seed: int, **config):
    """A GPT-2 causal LM built from a config (no download), its weights drawn from ``seed``; dropout off, so that
    a run is a function of its data and seed. ``config`` overrides :data:`LM_CONFIG`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(LM_CONFIG, **config)
    gpt = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, **cfg)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt)
