"""Class forgetting in a class-conditional diffusion model, end to end (scenario ``digits-ddpm-class``).

Per seed: a digits classifier (the judge) and the original denoiser are trained once on the
training split. Then, for every forgotten class, each method unlearns a copy of that original
through :func:`sfron_ops.unlearn.run` with the ε-prediction loss of :mod:`sfron_ops.diffusion`,
and is judged on images it generates: FA (the share of images asked for the forgotten class that
the classifier assigns to it, with its mean probability and entropy), the accuracy on the nine
kept classes, and the FID of the kept classes' images against the real ones in the classifier's
feature space. RT (retraining without the class) is the oracle. Every method sees the same
batches, and every evaluation of a case starts its sampler from the same noise.

With a checkpoint folder every training and unlearning run is checkpointed and every judged case
is kept (``seed<S>/case-c<C>.json``), each with a key of everything that determines it (see
:func:`run_key`); a second call resumes and reuses them, and one of another run is refused.
:func:`check_runs` checks all of it before anything trains.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..diffusion import EpsLoss, sample
from . import checkpoints
from . import metrics as M
from .data import Split, TensorLoader, digits_split
from .models import SmallCNN, build_denoiser
from .runner import run

# metric key -> (column title, digits); FA, FA prob, none and kept acc in %, FA H in nats
GEN_COLUMNS = (("FA", "FA ↓", 1), ("FA prob", "p(c_f)", 1), ("FA H", "H (nats)", 2), ("none", "no digit", 1),
               ("kept acc", "kept acc", 1),
               ("FID", "FID ↓", 1), ("FID ratio", "FID / orig", 2), ("iterations", "iters", 0),
               ("forget_at", "iters to FA ≤ 5 %", 0), ("RTE", "RTE (s)", 1))
GEN_KEYS = tuple(c[0] for c in GEN_COLUMNS)
JUDGE_TRAIN = dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)  # for classifier_epochs epochs
JUDGE_BATCH = 64


@dataclass
class GenerationScenario:
    """What to run. ``methods`` maps a table label to ``{"method": name, **hyperparameters}``; the label
    ``"RT"`` (retraining without the class, with ``train``) is added for the seeds in ``rt_seeds``."""

    name: str = "digits-ddpm-class"
    denoiser: str = "mlp"
    denoiser_kwargs: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)        # the original's and RT's training (method "train")
    batch_size: int = 128
    label_dropout: float = 0.1
    methods: dict = field(default_factory=dict)
    classes: tuple = tuple(range(10))                # forgotten, one at a time, on every seed
    rt_seeds: tuple | None = None                    # seeds whose cases get RT (None: every seed)
    samples_forget: int = 100                        # images of the forgotten class, for FA
    samples_kept: int = 30                           # images of each kept class, for accuracy and FID
    sample_steps: int = 50
    guidance: float = 2.0
    trace_points: int = 10                           # FA measured this many times during a run
    trace_samples: int = 32
    classifier_epochs: int = 20
    judge_non_digits: int = 600                      # images of the judge's "no digit" class
    tuning_seeds: tuple = (100,)
    tuning_max_fa: float = 5.0
    description: str = ""


@dataclass
class GenSeedBase:
    """The per-seed common ground: the split's tensors, the judge, the original and its samples."""

    seed: int
    x: torch.Tensor                 # training images in [-1, 1]
    y: torch.Tensor
    classifier: torch.nn.Module
    real_features: torch.Tensor     # the classifier's features of every training image
    original: torch.nn.Module
    original_seconds: float
    device: torch.device
    image_shape: tuple = (1, 8, 8)
    num_classes: int = 10
    judge_acc: float = math.nan     # the judge's accuracy on the real test images (%)
    split: Split | None = None      # the digits of the seed (pixels in [0, 1])


# ---------------------------------------------------------------------------------------------- the judge
def non_digits(x01: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` images in [0, 1] that are not digits, for the judge's extra class, in six equal families:
    real digits with their pixels shuffled (the same values, no shape), uniform noise, binary noise of
    random density, smooth blobs (coarse noise, upsampled and thresholded), blocky binary noise (2x2
    blocks at a random density, often sparse) and fragments (a binarised real digit with random
    2x2 blocks removed or added)."""
    shape = x01.shape[1:]
    c, h, w = shape
    out = torch.empty((n, *shape))
    idx = torch.randint(0, x01.shape[0], (n,), generator=generator)

    def rand(*size):
        return torch.rand(size, generator=generator)

    def blocks(density):
        return F.interpolate((rand(1, c, h // 2, w // 2) < density).float(), size=(h, w), mode="nearest")[0]

    for i in range(n):
        kind = i % 6
        if kind == 0:
            flat = x01[idx[i]].flatten()
            out[i] = flat[torch.randperm(flat.numel(), generator=generator)].view(shape)
        elif kind == 1:
            out[i] = rand(*shape)
        elif kind == 2:
            out[i] = (rand(*shape) < rand()).float()
        elif kind == 3:
            up = F.interpolate(rand(1, c, h // 2, w // 2), size=(h, w), mode="bilinear", align_corners=False)[0]
            out[i] = (up > rand() * 0.5 + 0.25).float()
        elif kind == 4:
            out[i] = blocks(0.05 + 0.5 * float(rand()))
        else:
            digit = (x01[idx[i]] > 0.5).float()
            keep = blocks(0.5)
            out[i] = torch.where(keep.bool(), digit, blocks(0.15))
    return out


def classifier_features(classifier: SmallCNN, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of images in [0, 1]: the 64-d pooled features before the linear head."""
    classifier.eval()
    with torch.no_grad():
        feats = classifier.head[:2](classifier.features(images01))
        return feats.float().cpu(), classifier.head[2](feats).float().cpu()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1] (clamped) to classifier pixels in [0, 1]."""
    return (images.clamp(-1, 1) + 1) / 2


def judge(base: GenSeedBase, images: torch.Tensor, labels: torch.Tensor, forget_class: int, n_forget: int) -> dict:
    """The metrics of generated ``images`` (the first ``n_forget`` asked for ``forget_class``, the rest for
    kept classes as in ``labels``). "none" is the share of the forgotten class's images that the judge
    calls no digit at all."""
    feats, logits = classifier_features(base.classifier, to_unit(images).to(base.device))
    probs = F.softmax(logits.double(), dim=1)
    pred = probs.argmax(dim=1)
    f = slice(0, n_forget)
    out = {"FA": float((pred[f] == forget_class).double().mean()) * 100.0,
           "FA prob": float(probs[f, forget_class].mean()) * 100.0,
           "FA H": float(M.entropy(probs[f]).mean()),
           "none": float((pred[f] == probs.shape[1] - 1).double().mean()) * 100.0}
    kept_labels = labels[n_forget:]
    correct = (pred[n_forget:] == kept_labels).double()
    per_class = {int(c): float(correct[kept_labels == c].mean()) * 100.0 for c in torch.unique(kept_labels)}
    out["kept acc"] = sum(per_class.values()) / len(per_class)
    out["per_class_acc"] = per_class
    real = base.real_features[base.y != forget_class]
    out["FID"] = M.fid(feats[n_forget:], real)
    return out


# ---------------------------------------------------------------------------------------------- one seed
def eps_loss(scenario: GenerationScenario, num_classes: int = 10) -> EpsLoss:
    return EpsLoss(num_classes, label_dropout=scenario.label_dropout)


def _split(seed: int) -> Split:
    """The digits of ``seed`` (pixels in [0, 1]); which class is forgotten is chosen per case."""
    return digits_split(seed, mode="class", forget_class=0, noise=0.0)


def _judged_by(scenario: GenerationScenario) -> dict:
    """What determines the judge besides the data and the seed, and how images are sampled for it."""
    return {"non_digits": scenario.judge_non_digits, "epochs": scenario.classifier_epochs, "batch_size": JUDGE_BATCH,
            "sample_steps": scenario.sample_steps, "guidance": scenario.guidance}


def run_key(scenario: GenerationScenario, split: Split, seed: int, tag: str, forget_class: int | None = None, *,
            trace: bool = True) -> dict:
    """What determines the run ``tag`` ("judge", "original", "RT" or a method label) of ``seed`` besides its
    method and hyperparameters (which the runner adds): the data's content and the seed; for the judge its
    non-digit images; for the denoisers the model and how the original is trained (the training settings, the
    batch size, the label dropout); for RT and the methods the forgotten class; for the methods, whose history
    holds the FA measured during the run (``trace``), how it is measured. A checkpoint resumes only a run with
    the same key: the judge and the original are shared by every class of a seed, and nothing else is."""
    key = {"run": tag, "seed": seed, "data": split.identity()}
    if tag == "judge":
        return {**key, "judge": {k: v for k, v in _judged_by(scenario).items() if k in ("non_digits", "batch_size")}}
    key["model"] = {"name": scenario.denoiser, **scenario.denoiser_kwargs}
    key["training"] = {**scenario.train, "batch_size": scenario.batch_size, "label_dropout": scenario.label_dropout}
    if tag != "original":
        key["forget"] = {"forget_class": forget_class}
    if tag not in ("original", "RT") and trace:
        key["trace"] = {"points": scenario.trace_points, "samples": scenario.trace_samples, **_judged_by(scenario)}
    return key


def _case_keys(scenario: GenerationScenario, split: Split, seed: int, forget_class: int, methods: dict) -> dict:
    """``label -> key`` of the judged rows of a case: the whole key of the row's run (the original's for
    "Original"; ``methods`` maps labels to their :class:`~sfron_ops.unlearn.methods.Method`) and how it is judged."""
    judged = {"forget_class": forget_class, "samples_forget": scenario.samples_forget,
              "samples_kept": scenario.samples_kept, **_judged_by(scenario)}
    return {label: {**checkpoints.run_key(method, run_key(scenario, split, seed, "original" if label == "Original"
                                                          else label, forget_class)), "judged": judged}
            for label, method in methods.items()}


def _specs(runs: dict, loaders: dict) -> dict:
    """``tag -> (method name, hyperparameters, loaders)`` for ``runs`` (``tag -> {"method": name, **hparams}``)."""
    return {tag: (spec["method"], {k: v for k, v in spec.items() if k != "method"}, loaders)
            for tag, spec in runs.items()}


def _runs(scenario: GenerationScenario, labels, with_rt: bool) -> dict:
    """``label -> spec`` of RT (retraining with the original's settings) if ``with_rt`` and of ``labels``."""
    return {**({"RT": dict(scenario.train, method="train")} if with_rt else {}),
            **{label: scenario.methods[label] for label in labels}}


def _seed_loaders(scenario: GenerationScenario, split: Split, seed: int) -> dict:
    """The judge's loader (the training digits and non-digit images) and the original's (pixels in [-1, 1])."""
    x01, y = split.train
    # The judge has an eleventh class, "no digit": a ten-way classifier must call every image some digit,
    # and it called the noise that a model makes after forgetting the forgotten digit, with confidence.
    junk = non_digits(x01, scenario.judge_non_digits, torch.Generator().manual_seed(seed))
    xj, yj = torch.cat([x01, junk]), torch.cat([y, torch.full((junk.shape[0],), 10, dtype=y.dtype)])
    return {"judge": TensorLoader(xj, yj, JUDGE_BATCH, shuffle=True, seed=seed),
            "original": TensorLoader(x01 * 2 - 1, y, scenario.batch_size, shuffle=True, seed=seed)}


def _seed_specs(scenario: GenerationScenario, loaders: dict) -> dict:
    judge = dict(JUDGE_TRAIN, method="train", iterations=scenario.classifier_epochs * len(loaders["judge"]))
    return {"judge": _specs({"judge": judge}, {"remain": loaders["judge"]})["judge"],
            "original": _specs({"original": dict(scenario.train, method="train")},
                               {"remain": loaders["original"]})["original"]}


def _case_loaders(scenario: GenerationScenario, x: torch.Tensor, y: torch.Tensor, seed: int, forget_class: int):
    keep = y != forget_class
    return {"forget": TensorLoader(x[~keep], y[~keep], scenario.batch_size, shuffle=True, seed=seed + 1),
            "remain": TensorLoader(x[keep], y[keep], scenario.batch_size, shuffle=True, seed=seed + 2)}


def prepare_seed(scenario: GenerationScenario, seed: int, *, device=None, progress=None,
                 checkpoint_dir=None) -> GenSeedBase:
    """Train the judge and the original denoiser of ``seed`` (or load them from ``checkpoint_dir``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    split = _split(seed)
    x01, y = split.train
    resume = checkpoint_dir is not None
    loaders = _seed_loaders(scenario, split, seed)
    specs = _seed_specs(scenario, loaders)
    torch.manual_seed(seed)
    classifier = SmallCNN(1, 11).to(device)
    name, hparams, _ = specs["judge"]
    run(name, classifier, remain_loader=loaders["judge"], seed=seed, progress=progress, desc=f"judge s{seed}",
        checkpoint=checkpoints.path(checkpoint_dir, seed, "judge"), resume=resume,
        checkpoint_key=run_key(scenario, split, seed, "judge"), **hparams)
    real_features, _ = classifier_features(classifier, x01.to(device))
    _, test_logits = classifier_features(classifier, split.test[0].to(device))
    judge_acc = float((test_logits.argmax(1) == split.test[1]).double().mean()) * 100.0
    original = _fresh_denoiser(scenario, seed, device)
    name, hparams, _ = specs["original"]
    res = run(name, original, remain_loader=loaders["original"], loss_fn=eps_loss(scenario), seed=seed,
              progress=progress, desc=f"original s{seed}", resume=resume,
              checkpoint=checkpoints.path(checkpoint_dir, seed, "original"),
              checkpoint_key=run_key(scenario, split, seed, "original"), **hparams)
    return GenSeedBase(seed, x01 * 2 - 1, y, classifier, real_features, original, res.seconds, device,
                       judge_acc=judge_acc, split=split)


def _fresh_denoiser(scenario, seed, device):
    torch.manual_seed(seed)
    return build_denoiser(scenario.denoiser, (1, 8, 8), 10, **scenario.denoiser_kwargs).to(device)


def case_labels(scenario: GenerationScenario, forget_class: int, num_classes: int = 10) -> torch.Tensor:
    kept = [c for c in range(num_classes) if c != forget_class]
    return torch.cat([torch.full((scenario.samples_forget,), forget_class),
                      torch.tensor(kept).repeat_interleave(scenario.samples_kept)])


def generate(scenario, model, labels, seed, forget_class, num_classes=10):
    """The case's images: the sampler starts from noise fixed by (seed, class), the same for every method."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + forget_class)
    return sample(model, labels, (1, 8, 8), steps=scenario.sample_steps, guidance=scenario.guidance,
                  null_label=num_classes, generator=gen)


def evaluate_case(scenario, base: GenSeedBase, model, forget_class: int) -> tuple[dict, torch.Tensor]:
    labels = case_labels(scenario, forget_class, base.num_classes)
    images = generate(scenario, model, labels, base.seed, forget_class, base.num_classes)
    return judge(base, images, labels, forget_class, scenario.samples_forget), images


def _fa_trace(scenario, base, forget_class, iterations):
    """A callback that measures FA (``trace_samples`` images) during a run, into the run's history, and how
    often it is called."""
    labels = torch.full((scenario.trace_samples,), forget_class)

    def callback(i, model):
        images = generate(scenario, model, labels, base.seed + 7919, forget_class, base.num_classes)
        _, logits = classifier_features(base.classifier, to_unit(images).to(base.device))
        return {"FA": float((logits.argmax(1) == forget_class).double().mean()) * 100.0}

    every = max(1, iterations // scenario.trace_points) if scenario.trace_points else None
    return callback, every


def run_case(scenario, base: GenSeedBase, forget_class: int, label: str, spec: dict, *, progress=None,
             checkpoint_dir=None, trace: bool = True) -> tuple[dict, torch.Tensor]:
    """Unlearn ``forget_class`` from a copy of the original with ``spec`` (or retrain for ``"RT"``) and judge it."""
    loaders = _case_loaders(scenario, base.x, base.y, base.seed, forget_class)
    name, hparams, _ = _specs({label: spec}, loaders)[label]
    if label == "RT":
        model = _fresh_denoiser(scenario, base.seed + 10_000, base.device)
    else:
        model = copy.deepcopy(base.original)
    trace = trace and label != "RT"
    callback, every = _fa_trace(scenario, base, forget_class, hparams.get("iterations", 0) or 0) if trace \
        else (None, None)
    res = run(name, model, loaders["forget"], loaders["remain"], loss_fn=eps_loss(scenario, base.num_classes),
              device=base.device, seed=base.seed, progress=progress, desc=f"{label} s{base.seed} c{forget_class}",
              checkpoint=checkpoints.path(checkpoint_dir, base.seed, f"{label}-c{forget_class}"),
              resume=checkpoint_dir is not None, log_every=every, callback=callback,
              checkpoint_key=run_key(scenario, base.split, base.seed, label, forget_class, trace=trace), **hparams)
    m, images = evaluate_case(scenario, base, model, forget_class)
    points = [(h["iteration"], h["FA"]) for h in res.history if "FA" in h]  # resumed runs keep theirs too
    m.update({"iterations": res.iterations, "RTE": res.seconds, "info": res.info, "fa_trace": points})
    m["forget_at"] = next((i for i, fa in points if fa <= 5.0), math.nan)
    return m, images


# ---------------------------------------------------------------------------------------------- scenario
def _labels(scenario, methods):
    labels = list(scenario.methods) if methods is None else [m for m in methods if m != "RT"]
    unknown = [m for m in labels if m not in scenario.methods]
    if unknown:
        raise ValueError(f"Invalid method: {unknown[0]!r}; scenario {scenario.name!r} has {list(scenario.methods)}")
    return labels


def check_runs(scenario: GenerationScenario, seeds, methods=None, *, device=None,
               checkpoint_dir: str | None = None) -> list:
    """What :func:`sfron_ops.unlearn.experiment.check_runs` checks, for this scenario, before anything trains:
    the forgotten classes, every run's method and hyperparameters on the judge or the denoiser and their
    loaders, and the checkpoints and judged cases already under ``checkpoint_dir``. Raises a ``ValueError``
    for a class the digits do not have and a :class:`~sfron_ops.unlearn.experiment.RunConfigError` for a run
    (``"denoiser"`` for the model); returns a :class:`~sfron_ops.unlearn.checkpoints.CheckpointError` for
    every checkpoint or judged case that cannot be used (unreadable, or of another run), touching none."""
    from .experiment import RunConfigError, build_methods

    labels = _labels(scenario, methods)
    with_rt = methods is None or "RT" in methods
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    problems, built = [], None
    for seed in seeds:
        split = _split(seed)
        if built is None:  # the runs are the same on every seed: set them up on the real models once
            bad = [c for c in scenario.classes if isinstance(c, bool) or not isinstance(c, int)
                   or not 0 <= c < split.num_classes]
            if bad:
                raise ValueError(f"class {bad[0]!r} is not a class of the digits (0 to {split.num_classes - 1})")
            try:
                denoiser = build_denoiser(scenario.denoiser, split.input_shape, split.num_classes,
                                          **scenario.denoiser_kwargs).to(device)
            except (ImportError, TypeError, ValueError) as e:
                raise RunConfigError("denoiser", e) from None
            x, y = split.train
            seed_specs = _seed_specs(scenario, _seed_loaders(scenario, split, seed))
            case_specs = _specs(_runs(scenario, labels, True), _case_loaders(scenario, x, y, seed, scenario.classes[0]))
            built = {**build_methods({"judge": seed_specs["judge"]}, SmallCNN(1, 11).to(device),
                                     torch.nn.CrossEntropyLoss(reduction="none")),
                     **build_methods({"original": seed_specs["original"], **case_specs}, denoiser, eps_loss(scenario))}
        found = [(checkpoints.path(checkpoint_dir, seed, tag), checkpoints.run_key(built[tag], run_key(
            scenario, split, seed, tag))) for tag in ("judge", "original")]
        run_rt = with_rt and (scenario.rt_seeds is None or seed in scenario.rt_seeds)
        tags = (["RT"] if run_rt else []) + labels
        found += [(checkpoints.path(checkpoint_dir, seed, f"{tag}-c{c}"), checkpoints.run_key(built[tag], run_key(
            scenario, split, seed, tag, c))) for c in scenario.classes for tag in tags]
        problems += checkpoints.check(found)
        judged = {"Original": built["original"], **{tag: built[tag] for tag in tags}}
        for c in scenario.classes:
            try:
                _read_case(checkpoints.path(checkpoint_dir, seed, f"case-c{c}", ".json"),
                           _case_keys(scenario, split, seed, c, judged))
            except checkpoints.CheckpointError as e:
                problems.append(e)
    return problems


def run_scenario(scenario: GenerationScenario, seeds=(0, 1, 2), methods=None, *, classes=None, device=None,
                 progress=None, checkpoint_dir=None, out=None, echo=print) -> dict:
    """Forget each class of ``classes`` (default ``scenario.classes``) on every seed with every method.

    Returns per-case rows (``per_case["seed/class"][label]``), the mean ± std over all cases, the
    per-class FA of every method and, with ``out``, writes a picture of samples per case there."""
    from .experiment import build_methods

    labels = _labels(scenario, methods)
    with_rt = methods is None or "RT" in methods
    classes = tuple(scenario.classes if classes is None else classes)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    per_case, rt_cases, seeds_info = {}, [], {}
    for seed in seeds:
        base = prepare_seed(scenario, seed, device=device, progress=progress, checkpoint_dir=checkpoint_dir)
        seeds_info[str(seed)] = {"judge_test_acc": base.judge_acc, "original_train_seconds": base.original_seconds}
        echo(f"[{scenario.name} seed {seed}] judge: {base.judge_acc:.1f} % on the real test digits; original "
             f"trained in {base.original_seconds:.1f}s")
        run_rt = with_rt and (scenario.rt_seeds is None or seed in scenario.rt_seeds)
        runs = _runs(scenario, labels, run_rt)
        built = build_methods(_specs({"Original": dict(scenario.train, method="train"), **runs}, {}))
        for c in classes:
            key = f"{seed}/{c}"
            case_path = checkpoints.path(checkpoint_dir, seed, f"case-c{c}", ".json")
            case_keys = _case_keys(scenario, base.split, seed, c, built)
            cached = _read_case(case_path, case_keys)
            if cached is not None:  # every run of this case finished and was judged before
                per_case[key] = cached
                rt_cases += [key] if run_rt else []
                echo(f"[{scenario.name} seed {seed} class {c}] read from {checkpoint_dir}")
                continue
            orig, orig_images = evaluate_case(scenario, base, base.original, c)
            orig.update({"iterations": math.nan, "RTE": math.nan, "FID ratio": 1.0, "forget_at": math.nan})
            rows, pictures = {"Original": orig}, {"Original": orig_images}
            for label, spec in runs.items():
                m, images = run_case(scenario, base, c, label, spec, progress=progress, checkpoint_dir=checkpoint_dir)
                m["FID ratio"] = m["FID"] / orig["FID"]
                rows[label], pictures[label] = m, images
                echo(f"[{scenario.name} seed {seed} class {c}] {label}: " + _row_text(m))
            if run_rt:
                rt_cases.append(key)
            per_case[key] = rows
            _save_case(case_path, case_keys, rows)
            if out is not None:
                plot_grid(pictures, case_labels(scenario, c), c, os.path.join(out, "grids", f"seed{seed}-class{c}.png"),
                          title=f"{scenario.name}: seed {seed}, class {c} forgotten")
    order = ["Original"] + (["RT"] if rt_cases else []) + labels
    summary = {}
    for label in order:
        cases = [k for k in per_case if label in per_case[k]]
        summary[label] = {k: M.mean_std([per_case[c][label][k] for c in cases]) for k in GEN_KEYS}
        summary[label]["cases"] = len(cases)
    by_class = {label: {str(c): [per_case[f"{s}/{c}"][label]["FA"] for s in seeds if label in per_case[f"{s}/{c}"]]
                        for c in classes} for label in order}
    return {
        "scenario": scenario.name,
        "kind": "generation",
        "description": scenario.description,
        "seeds": list(seeds),
        "classes": list(classes),
        "methods": {label: scenario.methods[label] for label in labels},
        "rt": {"cases": rt_cases, "spec": dict(scenario.train)},
        "denoiser": {"name": scenario.denoiser, **scenario.denoiser_kwargs},
        "evaluation": {"samples_forget": scenario.samples_forget, "samples_kept": scenario.samples_kept,
                       "sample_steps": scenario.sample_steps, "guidance": scenario.guidance},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "per_seed": seeds_info,
        "per_case": {k: {lab: _plain(v) for lab, v in rows.items()} for k, rows in per_case.items()},
        "summary": summary,
        "fa_by_class": by_class,
        "order": order,
        "wall_seconds": time.perf_counter() - started,
    }


def _read_case(path, keys: dict):
    """The judged rows of a case from an earlier call (JSON wrote NaN as null), or None when there is none
    or it lacks a label of ``keys``; a :class:`~sfron_ops.unlearn.checkpoints.CheckpointError` when the file
    cannot be read or a row of ``keys`` was judged for another run, naming what differs."""
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            saved = json.load(fh)
        saved_keys, rows = saved["key"], saved["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise checkpoints.CheckpointError(f"judged case {path} cannot be read ({type(e).__name__}: {e})",
                                          path) from None
    mine = json.loads(json.dumps(keys))  # as JSON keeps it: tuples are lists
    diffs = [(f"{label}.{entry}", there, here) for label in mine if label in saved_keys
             for entry, there, here in checkpoints.differences(saved_keys[label], mine[label])]
    if diffs:
        raise checkpoints.CheckpointError(f"judged case {path} belongs to another run: {checkpoints.describe(diffs)}",
                                          path, diffs)
    if not set(keys) <= set(rows):
        return None

    def restore(m):
        return {k: (math.nan if v is None else v) for k, v in m.items()}

    return {label: restore(rows[label]) for label in keys}


def _save_case(path, keys: dict, rows: dict) -> None:
    """Keep the judged ``rows`` of a case with their ``keys``, and the rows of other labels already there."""
    if path is None:
        return
    from .experiment import save_json

    saved = {"key": {}, "rows": {}}
    if os.path.exists(path):  # readable and of this run: _read_case checked it before the case ran
        with open(path) as fh:
            saved = json.load(fh)
    rows = {**saved["rows"], **{label: _plain(m) for label, m in rows.items()}}
    save_json({"key": {**saved["key"], **keys}, "rows": rows}, path)


def _plain(m):
    return {k: v for k, v in m.items() if not torch.is_tensor(v)}


def _row_text(m):
    return " ".join(f"{k}={m[k]:.2f}" for k in GEN_KEYS if k in m and isinstance(m[k], float) and not math.isnan(m[k]))


# ---------------------------------------------------------------------------------------------- tuning
def tune(scenario: GenerationScenario, grids: dict, seeds=None, *, classes=None, max_fa=None, device=None,
         progress=None, echo=print) -> dict:
    """The tuning protocol of the classification scenarios, with generation's yardsticks: over the
    tuning cases (``seeds`` x ``classes``; never the reported seeds), a configuration is eligible if
    it leaves FA <= ``max_fa`` % on every case; among the eligible ones the lowest mean FID ratio to
    the original wins (ties: fewer iterations). With none eligible, the lowest worst-case FA wins."""
    seeds = tuple(scenario.tuning_seeds if seeds is None else seeds)
    classes = tuple(scenario.classes if classes is None else classes)
    max_fa = scenario.tuning_max_fa if max_fa is None else max_fa
    bases = [prepare_seed(scenario, s, device=device, progress=progress) for s in seeds]
    originals = {(b.seed, c): evaluate_case(scenario, b, b.original, c)[0]["FID"] for b in bases for c in classes}
    best, trials = {}, []
    for label, grid in grids.items():
        scored = []
        for config in grid:
            rows = [run_case(scenario, b, c, label, config, progress=progress, trace=False)[0]
                    for b in bases for c in classes]
            ratios = [r["FID"] / originals[(b.seed, c)] for r, (b, c) in
                      zip(rows, [(b, c) for b in bases for c in classes])]
            score = sum(ratios) / len(ratios)
            if not math.isfinite(score):
                score = math.inf
            worst = max(r["FA"] for r in rows)
            kept = sum(r["kept acc"] for r in rows) / len(rows)
            eligible = worst <= max_fa
            trials.append({"label": label, "config": config, "FID ratio": score, "max FA": worst, "kept acc": kept,
                           "eligible": eligible, "rows": [_plain(r) for r in rows]})
            scored.append(((not eligible), score if eligible else worst, config.get("iterations", 0), len(scored),
                           config))
            echo(f"[tune {scenario.name}] {label} {config}: FID ratio={score:.3f} max FA={worst:.1f} "
                 f"kept acc={kept:.1f}" + ("" if eligible else " (not eligible)"))
        best[label] = min(scored, key=lambda t: t[:4])[4]
    return {"best": best, "trials": trials, "seeds": list(seeds), "classes": list(classes), "max_fa": max_fa}


# ---------------------------------------------------------------------------------------------- reporting
def format_table(results: dict, *, markdown: bool = True) -> str:
    """Mean ± std over every (seed, class) case; FA, p(c_f) and kept acc in %."""
    from .experiment import _cell

    header = ["Method", "cases"] + [c[1] for c in GEN_COLUMNS]
    body = []
    for label in results["order"]:
        s = results["summary"][label]
        body.append([label, str(s["cases"])] + [_cell(*s[key], digits) for key, _, digits in GEN_COLUMNS])
    return _render(header, body, markdown)


def format_class_table(results: dict, *, markdown: bool = True) -> str:
    """FA (%) per forgotten class, mean over seeds (worst seed in brackets)."""
    classes = [str(c) for c in results["classes"]]
    header = ["Method"] + [f"FA c{c}" for c in classes]
    body = []
    for label in results["order"]:
        row = [label]
        for c in classes:
            vals = [v for v in results["fa_by_class"][label][c] if v is not None]
            row.append("–" if not vals else f"{sum(vals) / len(vals):.0f} ({max(vals):.0f})")
        body.append(row)
    return _render(header, body, markdown)


def _render(header, body, markdown):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(r) for r in body])


def quality_bar(results: dict, *, method: str = "SFR-on", baselines=("SalUn", "SA"), max_fa: float = 5.0,
                acc_points: float = 2.0, fid_ratio: float = 1.25, iteration_ratio: float = 0.1):
    """The bar of this scenario as (met, sentence) pairs: FA <= 5 % on every case, kept accuracy within
    2 points of the original's and FID within 1.25x of it (mean over cases), and at most a tenth of the
    baselines' iterations to reach FA <= 5 % (mean over cases, from the FA traces)."""
    checks = []
    cases = results["per_case"]
    rows = [(k, r[method], r["Original"]) for k, r in cases.items() if method in r]
    if not rows:
        return [(False, f"{method} did not run")]
    worst = max(rows, key=lambda t: t[1]["FA"])
    misses = [k for k, m, _ in rows if m["FA"] > max_fa]
    checks.append((not misses, f"{method} FA <= {max_fa:g} % on every case: worst {worst[1]['FA']:.1f} % "
                   f"(seed/class {worst[0]})" + (f"; above on {len(misses)} of {len(rows)}: {', '.join(misses)}"
                                                  if misses else "")))
    drop = sum(o["kept acc"] - m["kept acc"] for _, m, o in rows) / len(rows)
    worst_drop = max(rows, key=lambda t: t[2]["kept acc"] - t[1]["kept acc"])
    checks.append((drop <= acc_points, f"{method} kept-class accuracy {drop:.2f} points below the original's on "
                   f"average (worst case {worst_drop[0]}: "
                   f"{worst_drop[2]['kept acc'] - worst_drop[1]['kept acc']:.1f} points)"))
    ratio = sum(m["FID"] for _, m, _ in rows) / sum(o["FID"] for _, _, o in rows)
    worst_ratio = max(rows, key=lambda t: t[1]["FID"] / t[2]["FID"])
    checks.append((ratio <= fid_ratio, f"{method} kept-class FID {ratio:.2f}x the original's (sum over cases; "
                   f"worst case {worst_ratio[0]}: {worst_ratio[1]['FID'] / worst_ratio[2]['FID']:.2f}x)"))
    ours = [m["forget_at"] for _, m, _ in rows]
    ours_mean = _finite_mean(ours)
    for b in baselines:
        theirs = [r[b]["forget_at"] for k, r in cases.items() if b in r]
        if not theirs:
            continue
        t_mean = _finite_mean(theirs)
        reached = sum(1 for v in theirs if v is not None and math.isfinite(v))
        never = len(theirs) - reached
        b_iters = _finite_mean([r[b]["iterations"] for r in cases.values() if b in r])
        if reached == 0:
            # the baseline never reached FA <= 5 % within its budget: it needs more than that budget
            ok = all(v is not None and math.isfinite(v) for v in ours) and max(ours) <= iteration_ratio * b_iters
            checks.append((ok, f"{method} reaches FA <= {max_fa:g} % in {ours_mean:.0f} iterations on average; {b} "
                           f"does not reach it within its {b_iters:.0f} on any case"))
            continue
        ok = math.isfinite(ours_mean) and ours_mean <= iteration_ratio * t_mean and never == 0
        checks.append((ok, f"iterations to FA <= {max_fa:g} %: {method} {ours_mean:.0f}, {b} {t_mean:.0f} "
                       f"(ratio {ours_mean / t_mean:.2f}; {b} never got there on {never} of {len(theirs)} cases; "
                       f"FA measured every {_trace_step(cases, method)} and {_trace_step(cases, b)} iterations)"))
    return checks


def _trace_step(cases: dict, label: str):
    """How many iterations apart the FA traces of ``label`` were measured (the first case's), or ``"?"``."""
    trace = next((r[label].get("fa_trace") or [] for r in cases.values() if label in r), [])
    return trace[1][0] - trace[0][0] if len(trace) > 1 else "?"


def _finite_mean(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def plot_grid(pictures: dict, labels: torch.Tensor, forget_class: int, path: str, *, per_class: int = 4,
              title: str = "") -> None:
    """One row per method, one column block per class: ``per_class`` samples of each (the forgotten class framed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(int(c) for c in torch.unique(labels))
    rows = list(pictures)
    fig, axes = plt.subplots(len(rows), len(classes), figsize=(1.1 * len(classes), 1.25 * len(rows) + 0.4),
                             squeeze=False)
    for r, label in enumerate(rows):
        images = pictures[label]
        for j, c in enumerate(classes):
            idx = torch.nonzero(labels == c).flatten()[:per_class]
            tiles = list(to_unit(images[idx]).squeeze(1))     # per_class images of h x w, blank when fewer
            tiles += [torch.zeros_like(tiles[0])] * (per_class - len(tiles))
            half = (per_class + 1) // 2
            tiles += [torch.zeros_like(tiles[0])] * (2 * half - per_class)
            top, bottom = torch.cat(tiles[:half], 1), torch.cat(tiles[half:], 1)
            ax = axes[r][j]
            ax.imshow(torch.cat([top, bottom], 0).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == forget_class:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:red")
                    spine.set_linewidth(2)
            if r == 0:
                ax.set_title(str(c), fontsize=9, color="tab:red" if c == forget_class else "black")
            if j == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_results(results: dict, path: str) -> None:
    """FA per class, kept accuracy and FID ratio per method, and the FA traces (FA against iterations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = [lab for lab in results["order"] if lab != "Original"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    classes = results["classes"]
    width = 0.8 / max(1, len(order))
    for j, label in enumerate(order):
        means = [np.nanmean([v for v in results["fa_by_class"][label][str(c)] if v is not None] or [np.nan])
                 for c in classes]
        axes[0].bar(np.arange(len(classes)) + (j - len(order) / 2) * width, means, width, label=label)
    axes[0].axhline(5.0, color="k", lw=0.8, ls="--")
    axes[0].set_xticks(range(len(classes)), [str(c) for c in classes])
    axes[0].set_xlabel("forgotten class")
    axes[0].set_ylabel("FA (%), mean over seeds")
    axes[0].legend(fontsize=7, ncol=2)
    s = results["summary"]
    x = np.arange(len(order))
    acc = [s[lab]["kept acc"][0] for lab in order]
    ratio = [s[lab]["FID ratio"][0] for lab in order]
    axes[1].bar(x - 0.2, acc, 0.4, label="kept acc (%)", color="tab:blue")
    axes[1].axhline(s["Original"]["kept acc"][0], color="tab:blue", lw=0.8, ls="--")
    ax2 = axes[1].twinx()
    ax2.bar(x + 0.2, ratio, 0.4, label="FID / original", color="tab:orange")
    ax2.axhline(1.25, color="tab:orange", lw=0.8, ls="--")
    ax2.set_yscale("log")
    axes[1].set_xticks(x, order, rotation=30)
    axes[1].set_title("kept classes: accuracy (left), FID ratio (right, log)")
    for label in order:
        traces = [r[label]["fa_trace"] for r in results["per_case"].values() if label in r and r[label].get("fa_trace")]
        if not traces:
            continue
        its = sorted({i for t in traces for i, _ in t})
        mean = [np.mean([fa for t in traces for i2, fa in t if i2 == i]) for i in its]
        axes[2].plot(its, mean, marker="o", ms=3, label=label)
    axes[2].set_xscale("log")
    axes[2].axhline(5.0, color="k", lw=0.8, ls="--")
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("FA (%), mean over cases")
    axes[2].set_title("forgetting during the run")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{results['scenario']}: seeds {results['seeds']}, classes {classes}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out: str) -> None:
    """results.json, table.md and results.png in ``out`` (the grids are written while running)."""
    from .experiment import save_json

    os.makedirs(out, exist_ok=True)
    save_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(f"### {results['scenario']}\n\n{results['description']}. Seeds {results['seeds']}, classes "
                 f"{results['classes']}; mean ± std over the (seed, class) cases.\n\n")
        fh.write(format_table(results) + "\n\nFA per forgotten class, mean over seeds (worst seed):\n\n")
        fh.write(format_class_table(results) + "\n")
    plot_results(results, os.path.join(out, "results.png"))
