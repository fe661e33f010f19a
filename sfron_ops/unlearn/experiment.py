"""One scenario end to end: train the original, retrain RT, run every method, evaluate, tabulate, plot.

The scenario fixes the data, the model, how the original is trained and each method's
hyperparameters (presets). Every method unlearns a copy of the same original with loaders seeded
the same way; each is compared with the RT model of the same seed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import checkpoints
from . import metrics as M
from .data import Split
from .methods import make_method
from .models import build_model
from .runner import run

METRIC_KEYS = ("FA", "RA", "TA", "MIA", "Avg.D", "KL", "JS", "RTE")


@dataclass
class Scenario:
    """What to run. ``methods`` maps a table label ("SFR-on") to ``{"method": name, **hyperparameters}``."""

    name: str
    split: Callable[[int], Split]
    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    epochs: int = 40
    batch_size: int = 64
    forget_batch_size: int | None = None
    eval_batch_size: int = 512
    methods: dict = field(default_factory=dict)
    num_workers: int = 0
    description: str = ""
    # How `tune` picks presets: the seeds it averages over, and, for class-wise forgetting, the largest FA
    # (in %) a configuration may leave on any of them and still be eligible (None: no such condition).
    tuning_seeds: tuple = (100, 101, 102)
    tuning_max_fa: float | None = None


def _loaders(split: Split, scenario: Scenario, seed: int):
    bs = scenario.batch_size
    fbs = scenario.forget_batch_size or bs
    kw = dict(num_workers=scenario.num_workers)
    return {
        "train": split.loader("train", bs, shuffle=True, seed=seed, **kw),
        "forget": split.loader("forget", fbs, shuffle=True, seed=seed + 1, **kw),
        "remain": split.loader("remain", bs, shuffle=True, seed=seed + 2, **kw),
        "forget_eval": split.loader("forget", scenario.eval_batch_size, shuffle=False, eval_transform=True, **kw),
        "remain_eval": split.loader("remain", scenario.eval_batch_size, shuffle=False, eval_transform=True, **kw),
        "test_eval": split.loader("test", scenario.eval_batch_size, shuffle=False, **kw),
    }


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not torch.is_tensor(v)}



@dataclass
class SeedBase:
    """The per-seed common ground of every method: the split, the original, RT and its evaluation."""

    seed: int
    split: Split
    device: torch.device
    original: torch.nn.Module
    original_metrics: dict
    rt_metrics: dict
    reference: torch.Tensor
    eval_loaders: tuple


def prepare_seed(scenario: Scenario, seed: int, *, device=None, progress=None, checkpoint_dir=None) -> SeedBase:
    """Train the original on all training data and RT on D_r only, and evaluate both."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    split = scenario.split(seed)

    def fresh_model(model_seed):
        torch.manual_seed(model_seed)
        return build_model(scenario.model, split.input_shape, split.num_classes, **scenario.model_kwargs).to(device)

    loaders = _loaders(split, scenario, seed)
    eval_loaders = (loaders["forget_eval"], loaders["remain_eval"], loaders["test_eval"])
    resume = checkpoint_dir is not None
    specs = _run_specs(scenario, loaders, ())
    original = fresh_model(seed)
    res = run(specs["original"][0], original, remain_loader=loaders["train"], seed=seed, progress=progress,
              desc=f"original s{seed}", checkpoint=checkpoints.path(checkpoint_dir, seed, "original"),
              resume=resume, checkpoint_key=run_key(scenario, split, seed, "original"), **specs["original"][1])
    original_seconds = res.seconds
    rt = fresh_model(seed + 10_000)
    res = run(specs["RT"][0], rt, remain_loader=loaders["remain"], seed=seed + 10_000, progress=progress,
              desc=f"RT s{seed}", checkpoint=checkpoints.path(checkpoint_dir, seed, "RT"), resume=resume,
              checkpoint_key=run_key(scenario, split, seed, "RT"), **specs["RT"][1])
    rt_metrics = M.evaluate(rt, *eval_loaders, device=device, mia_seed=seed)
    reference = rt_metrics.pop("forget_logits")
    rt_metrics.update({"KL": 0.0, "JS": 0.0, "Avg.D": 0.0, "RTE": res.seconds})
    base = M.evaluate(original, *eval_loaders, reference_forget_logits=reference, device=device, mia_seed=seed)
    base.pop("forget_logits")
    base.update({"Avg.D": M.avg_gap(base, rt_metrics), "RTE": math.nan, "train_seconds": original_seconds})
    return SeedBase(seed, split, device, original, base, rt_metrics, reference, eval_loaders)


def evaluate_method(scenario: Scenario, base: SeedBase, label: str, spec: dict, *, progress=None,
                    checkpoint_dir=None) -> dict:
    """Unlearn a copy of the seed's original with ``spec`` (``{"method": name, **hparams}``) and evaluate it."""
    spec = dict(spec)
    name = spec.pop("method")
    model = copy.deepcopy(base.original)
    loaders = _loaders(base.split, scenario, base.seed)  # every method sees the same batches
    res = run(name, model, loaders["forget"], loaders["remain"], device=base.device, seed=base.seed,
              progress=progress, desc=f"{label} s{base.seed}",
              checkpoint=checkpoints.path(checkpoint_dir, base.seed, label),
              checkpoint_key=run_key(scenario, base.split, base.seed, label), resume=checkpoint_dir is not None,
              **spec)
    m = M.evaluate(model, *base.eval_loaders, reference_forget_logits=base.reference, device=base.device,
                   mia_seed=base.seed)
    m.pop("forget_logits")
    m.update({"Avg.D": M.avg_gap(m, base.rt_metrics), "RTE": res.seconds, "info": res.info})
    return m


def run_key(scenario: Scenario, split: Split, seed: int, tag: str) -> dict:
    """What determines the run ``tag`` ("original", "RT" or a method label) of ``seed`` besides its method and
    hyperparameters (which the runner adds): the data's content and how it is read, the seed, the model and
    how the original is trained; for RT and the methods also the forget set, and for the methods the batch
    sizes of their loaders. A checkpoint resumes only a run with the same key, so an original is shared by
    every forget set of the same data, and nothing else is shared."""
    key = {"run": tag, "seed": seed, "data": split.identity(),
           "model": {"name": scenario.model, **scenario.model_kwargs},
           "training": {**scenario.train, "epochs": scenario.epochs, "batch_size": scenario.batch_size}}
    if tag != "original":
        key["forget"] = split.forget_identity()
    if tag not in ("original", "RT"):
        key["loaders"] = {"batch_size": scenario.batch_size, "forget_batch_size": scenario.forget_batch_size}
    return key


def _labels(scenario: Scenario, methods) -> list:
    labels = list(scenario.methods) if methods is None else list(methods)
    unknown = [m for m in labels if m not in scenario.methods]
    if unknown:
        raise ValueError(f"Invalid method: {unknown[0]!r}; scenario {scenario.name!r} has {list(scenario.methods)}")
    return labels


def _run_specs(scenario: Scenario, loaders: dict, labels) -> dict:
    """``tag -> (method name, hyperparameters, the runner's loaders)`` for the original, RT and ``labels``."""
    specs = {tag: ("train", dict(scenario.train, iterations=scenario.epochs * len(loaders[which])),
                   {"remain": loaders[which]}) for tag, which in (("original", "train"), ("RT", "remain"))}
    for label in labels:
        spec = dict(scenario.methods[label])
        specs[label] = (spec.pop("method"), spec, {"forget": loaders["forget"], "remain": loaders["remain"]})
    return specs


class RunConfigError(ValueError):
    """A run (``tag``: "original", "RT" or a method label) whose method or hyperparameters cannot be used."""

    def __init__(self, tag: str, error: Exception):
        super().__init__(f"{tag}: {error}")
        self.tag = tag


def build_methods(specs: dict, model=None, loss_fn=None) -> dict:
    """``tag -> Method`` for ``specs`` (``tag -> (method name, hyperparameters, the runner's loaders)``); with
    ``model``, every method is also planned on its loaders and set up on ``model`` with ``loss_fn`` (its
    optimizer and schedule), which finds what only the real model and data reveal. Nothing trains. Raises a
    :class:`RunConfigError` naming the first run whose method or hyperparameters cannot be used."""
    built = {}
    for step in ("build", "setup") if model is not None else ("build",):  # every run's values first: that is cheap
        for tag, (name, hparams, run_loaders) in specs.items():
            try:
                if step == "build":
                    built[tag] = make_method(name, **hparams)
                else:
                    built[tag].plan(run_loaders)
                    built[tag].setup(model, loss_fn, None, fresh=False)
            except (ValueError, TypeError) as e:
                raise RunConfigError(tag, e) from None
    return built


def check_runs(scenario: Scenario, seeds, methods=None, *, device=None, checkpoint_dir: str | None = None) -> list:
    """Check before training what can be checked: every seed's split (the data files, the forget set), every
    run's method and hyperparameters on the scenario's model and loaders, and the checkpoints already under
    ``checkpoint_dir``. Raises a :class:`~sfron_ops.unlearn.data.DataError` for the data, a ``ValueError``
    for the forget set and a :class:`RunConfigError` for a method; returns a
    :class:`~sfron_ops.unlearn.checkpoints.CheckpointError` for every checkpoint that cannot be resumed
    (unreadable, or of another run), touching none of them."""
    labels = _labels(scenario, methods)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    problems, model = [], None
    for seed in seeds:
        split = scenario.split(seed)
        if len(split.remain_idx) == 0:
            raise ValueError(f"seed {seed}: every training sample is in the forget set, none remains")
        loaders = _loaders(split, scenario, seed)
        first = model is None
        if first:
            model = build_model(scenario.model, split.input_shape, split.num_classes, **scenario.model_kwargs)
            model = model.to(device)
        built = build_methods(_run_specs(scenario, loaders, labels), model if first else None, loss_fn)
        problems += checkpoints.check((checkpoints.path(checkpoint_dir, seed, tag),
                                       checkpoints.run_key(method, run_key(scenario, split, seed, tag)))
                                      for tag, method in built.items())
    return problems


def tune(scenario: Scenario, grids: dict, seeds=None, *, max_fa=None, device=None, progress=None,
         echo=print) -> dict:
    """Pick, for every method label, the configuration of ``grids[label]`` with the lowest Avg.D to RT
    (mean over ``seeds``, default ``scenario.tuning_seeds``; keep them apart from the seeds you report).

    With ``max_fa`` (default ``scenario.tuning_max_fa``), only configurations whose FA is at most
    ``max_fa`` % on every seed are eligible, so that a class-wise pick really forgets the class; when
    none is, the label falls back to the lowest Avg.D of all. A run whose metrics are not finite ranks
    last. Returns ``{"best": {label: config}, "trials": [...], "seeds": [...], "max_fa": max_fa}``."""
    seeds = tuple(scenario.tuning_seeds if seeds is None else seeds)
    max_fa = scenario.tuning_max_fa if max_fa is None else max_fa
    bases = [prepare_seed(scenario, s, device=device, progress=progress) for s in seeds]
    best, trials = {}, []
    for label, grid in grids.items():
        scored = []
        for config in grid:
            rows = [evaluate_method(scenario, b, label, config, progress=progress) for b in bases]
            score = sum(r["Avg.D"] for r in rows) / len(rows)
            kl = sum(r.get("KL", math.nan) for r in rows) / len(rows)
            if not math.isfinite(score):
                score = math.inf
            fas = [r["FA"] for r in rows]
            worst_fa = math.nan if any(math.isnan(f) for f in fas) else max(fas)
            eligible = max_fa is None or worst_fa <= max_fa  # a NaN FA is never eligible
            trials.append({"label": label, "config": config, "Avg.D": score, "KL": kl, "max FA": worst_fa,
                           "eligible": eligible, "rows": [_plain(r) for r in rows]})
            scored.append((not eligible, score, len(scored), config))
            echo(f"[tune {scenario.name}] {label} {config}: Avg.D={score:.3f} KL={kl:.4f} max FA={worst_fa:.1f}"
                 + ("" if eligible else " (not eligible)"))
        best[label] = min(scored, key=lambda t: t[:3])[3]
    return {"best": best, "trials": trials, "seeds": list(seeds), "max_fa": max_fa}


def run_scenario(scenario: Scenario, seeds=(0, 1, 2), methods=None, *, device=None, progress: bool | None = None,
                 checkpoint_dir: str | None = None, echo=print) -> dict:
    """Run ``scenario`` for every seed and return the results (per seed and mean ± std over seeds).

    ``methods``: labels of ``scenario.methods`` to run (default: all). With ``checkpoint_dir`` every
    training and unlearning run checkpoints there and a second call resumes where the first stopped.
    """
    labels = _labels(scenario, methods)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    per_seed = {}
    started = time.perf_counter()
    for seed in seeds:
        base = prepare_seed(scenario, seed, device=device, progress=progress, checkpoint_dir=checkpoint_dir)
        rows = {"RT": base.rt_metrics, "Original": base.original_metrics}
        echo(f"[{scenario.name} seed {seed}] original: " + _row_text(base.original_metrics) + " | RT: "
             + _row_text(base.rt_metrics))
        for label in labels:
            m = evaluate_method(scenario, base, label, scenario.methods[label], progress=progress,
                                checkpoint_dir=checkpoint_dir)
            rows[label] = m
            echo(f"[{scenario.name} seed {seed}] {label}: " + _row_text(m))
        per_seed[seed] = rows
    order = ["Original", "RT"] + labels
    summary = {label: {k: M.mean_std([per_seed[s][label][k] for s in seeds]) for k in METRIC_KEYS}
               for label in order}
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "seeds": list(seeds),
        "methods": {label: scenario.methods[label] for label in labels},
        "model": scenario.model,
        "train": dict(scenario.train, epochs=scenario.epochs, batch_size=scenario.batch_size),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "per_seed": {str(s): {label: _plain(v) for label, v in rows.items()} for s, rows in per_seed.items()},
        "summary": summary,
        "order": order,
        "wall_seconds": time.perf_counter() - started,
    }


def _row_text(m):
    return " ".join(f"{k}={m[k]:.2f}" for k in METRIC_KEYS if k in m and not math.isnan(m[k]))


# ---------------------------------------------------------------------------------------------- reporting
COLUMNS = (("FA", "FA", 2), ("RA", "RA", 2), ("TA", "TA", 2), ("MIA", "MIA", 2), ("Avg.D", "Avg.D ↓", 2),
           ("KL", "KL ↓", 4), ("JS", "JS ↓", 4), ("RTE", "RTE (s)", 2))


def _cell(mean, std, digits):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if math.isinf(mean):  # a diverged model on some seed: the mean says it all, the std is undefined
        return f"{mean}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(results: dict, *, markdown: bool = True) -> str:
    """The paper-style table: mean ± std over seeds; FA/RA/TA/MIA in %, Avg.D against RT, KL/JS to RT on D_f."""
    header = ["Method"] + [c[1] for c in COLUMNS]
    body = []
    for label in results["order"]:
        s = results["summary"][label]
        body.append([label] + [_cell(*s[key], digits) for key, _, digits in COLUMNS])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(r) for r in body])


def save_json(results: dict, path: str) -> None:
    """``results`` as strict JSON at ``path``, through a temporary file (an interrupted write leaves the old one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def clean(x):  # strict JSON: no NaN or Infinity literals
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, float) and math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(clean(results), fh, indent=1, allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_results(results_list: list, path: str, *, past_ceiling=()) -> None:
    """One row per scenario: FA/TA/MIA next to RT's, Avg.D, and KL to RT, each mean ± std over seeds.

    Every panel names its scenario; a mean of exactly 0 gets a mark on the axis in its series' colour (so an
    all-zero FA is visible); the rows in ``past_ceiling`` (methods given more compute than the others) are
    hatched and set apart by a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def finite(x):  # results read back from JSON carry None for NaN
        return x is not None and math.isfinite(x)

    def bars(ax, xs, values, stds, labels, **kw):
        """Bars with error bars that stop at zero; a non-finite mean (a method whose model diverged)
        gets no bar but a "not finite" mark, so that one run cannot break the axis."""
        keep = [i for i, v in enumerate(values) if finite(v)]
        sd = [stds[i] if finite(stds[i]) else 0.0 for i in keep]
        width = kw.pop("width", 0.8)
        drawn = ax.bar([xs[i] for i in keep], [values[i] for i in keep], width,
                       yerr=[[min(e, values[i]) for i, e in zip(keep, sd)], sd], **kw)
        color = drawn.patches[0].get_facecolor() if drawn.patches else None
        for i, patch in zip(keep, drawn.patches):
            if labels[i] in past_ceiling:
                patch.set_hatch("//")
                patch.set_edgecolor("white")
            if values[i] == 0:  # a bar of height 0 is invisible: mark the spot on the axis
                ax.plot([xs[i] - width / 2, xs[i] + width / 2], [0, 0], color=color, lw=3, clip_on=False,
                        solid_capstyle="butt", zorder=3)
        for i in set(range(len(values))) - set(keep):
            ax.annotate("not finite", (xs[i], 0), xycoords=("data", "axes fraction"), rotation=90, ha="center",
                        va="bottom", fontsize=7)
        return dict(zip(keep, drawn))

    marked = []

    def mark_ceiling(ax, labels):
        beyond = [i for i, lab in enumerate(labels) if lab in past_ceiling]
        if beyond:
            ax.axvline(min(beyond) - 0.5, color="0.4", ls="--", lw=0.8)
            marked.extend(labels[i] for i in beyond if labels[i] not in marked)

    fig, axes = plt.subplots(len(results_list), 3, figsize=(16, 3.8 * len(results_list)), squeeze=False)
    for row, results in zip(axes, results_list):
        name = results.get("scenario", "")
        labels = [lab for lab in results["order"] if lab != "Original"]
        s = results["summary"]
        x = np.arange(len(labels))
        width = 0.27
        for j, key in enumerate(("FA", "TA", "MIA")):
            bars(row[0], x + (j - 1) * width, [s[lab][key][0] for lab in labels], [s[lab][key][1] for lab in labels],
                 labels, width=width, label=key, capsize=2)
        row[0].set_xticks(x, labels, rotation=30)
        row[0].set_ylabel("%")
        row[0].set_title(f"{name}: FA, TA, MIA (mean ± std)")
        row[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        mark_ceiling(row[0], labels)
        meth = [lab for lab in labels if lab != "RT"]
        xm = np.arange(len(meth))
        for ax, key, title, log in ((row[1], "Avg.D", "Avg.D to RT, % points ↓", False),
                                    (row[2], "KL", "KL(p_RT || p) on D_f, nats ↓", True)):
            values = [s[lab][key][0] for lab in meth]
            drawn = bars(ax, xm, values, [s[lab][key][1] for lab in meth], meth, capsize=3, color="tab:gray")
            if "SFR-on" in meth and meth.index("SFR-on") in drawn:
                drawn[meth.index("SFR-on")].set_color("tab:red")
            if log:
                # plain numbers at 1, 2 and 5 times each power of ten, instead of 6 x 10^-1
                ax.set_yscale("log")
                shown = [v for v in values if finite(v) and v > 0]
                if shown:  # room below the lowest bar, so that a labelled tick lies under it
                    ax.set_ylim(min(shown) / 1.6, max(shown) * 1.3)
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(xm, meth, rotation=30)
            ax.set_title(f"{name}: {title}")
            mark_ceiling(ax, meth)
    footnote = 0.0
    if marked:
        footnote = 0.25 / (3.8 * len(results_list))
        fig.text(0.5, 0.004, f"Hatched, right of the dashed line: {', '.join(marked)}, which runs past the compute "
                 "ceiling the other methods share.", ha="center", va="bottom", fontsize=9, color="0.25")
    fig.tight_layout(rect=(0, footnote, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
