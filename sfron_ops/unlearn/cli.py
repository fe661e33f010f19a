"""``sfron-unlearn`` (also ``python -m sfron_ops.unlearn``): one scenario end to end from the command line.

    sfron-unlearn run --scenario digits-random --seeds 0 1 2 --out runs/digits-random
    sfron-unlearn run --dataset cifar10 --root ~/data --forget random:0.1 --model resnet18 --seeds 0
    sfron-unlearn tune --scenario digits-class
    sfron-unlearn run --scenario digits-ddpm-class --seeds 0 1 2     # class forgetting in a diffusion model
    sfron-unlearn run --scenario facts-lm --seeds 0 1 2              # facts forgotten by a causal LM, TOFU-style
    sfron-unlearn presets

Everything the command is given is checked before anything trains: the flags, the output and
checkpoint folders, every data file, every method's hyperparameters and the checkpoints already
there. A mistake is reported in one line that names the flag, file or value, with exit status 2.
Ctrl-C stops at the end of the current iteration, saves its checkpoint and exits with status 130;
the same command then resumes. The diffusion scenario goes through the same checks and the same
run; only what runs it (:mod:`~sfron_ops.unlearn.generation` instead of
:mod:`~sfron_ops.unlearn.experiment`) and its tables differ, and so for the language-model scenario
(:mod:`~sfron_ops.unlearn.language`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

DIGITS = ("digits-random", "digits-class")
GENERATION = ("digits-ddpm-class",)
LANGUAGE = ("facts-lm",)
CLASSIFIERS = ("mlp", "cnn", "resnet18")
DENOISERS = ("mlp", "unet", "dit")
RUN_OUTPUTS = ("results.json", "table.md", "results.png")
TUNE_OUTPUTS = ("tuning.json",)


class UsageError(Exception):
    """A mistake in the command line or in what it points to: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other usage error, instead of usage + message
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------- flags
def _value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, dict)):
        return all(_finite(v) for v in (value.values() if isinstance(value, dict) else value))
    return True


def _parse_set(items):
    """``LABEL.key=value`` items as ``(item, label, key, value)``; ``*`` as the label means every method."""
    parsed = []
    for item in items or []:
        target, sep, text = item.partition("=")
        label, dot, key = target.rpartition(".")
        if not sep or not dot or not key or not label:
            raise UsageError(f"--set expects LABEL.key=value, got {item!r}")
        value = _value(text)
        if not _finite(value):
            raise UsageError(f"--set {item!r}: {text} is not a finite number")
        parsed.append((item, label, key, value))
    return parsed


def _overrides(items, methods):
    """``LABEL.key=value`` (or ``*.key=value`` for every method) applied to a copy of ``methods``."""
    out = {k: dict(v) for k, v in methods.items()}
    for item, label, key, value in _parse_set(items):
        if label != "*" and label not in out:
            raise UsageError(f"--set {item!r}: no method {label!r} (have {list(out)})")
        for lab in list(out) if label == "*" else [label]:
            out[lab][key] = value
    return out


def _forget(text):
    """``--forget``: ``(kind, value)`` with ``value`` None when not given (for ``class``, a tuple of class
    indices), or None without the flag."""
    if text is None:
        return None
    kind, _, value = text.partition(":")
    if kind == "random":
        if not value:
            return kind, None
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not 0 < fraction < 1:
            raise UsageError(f"--forget {text}: the fraction must be a number between 0 and 1 (exclusive)")
        return kind, fraction
    if kind == "class":
        if not value:
            return kind, None
        if not all(v.isdigit() for v in value.split(",")):
            raise UsageError(f"--forget {text}: the class must be a class index (0, 1, ...)")
        classes = tuple(int(v) for v in value.split(","))
        if len(set(classes)) != len(classes):
            raise UsageError(f"--forget {text} repeats a class")
        return kind, classes
    raise UsageError(f"--forget must be random:FRACTION or class:INDEX, got {text!r}")


def _check_flags(args):
    """The flags that need nothing else to be checked."""
    if args.scenario in LANGUAGE and args.model is not None:
        raise UsageError(f"--model does not apply to --scenario {args.scenario}: its model is the GPT-2 of "
                         "presets.facts_lm_scenario")
    if args.scenario in GENERATION and args.epochs is not None:
        raise UsageError(f"--epochs does not apply to --scenario {args.scenario}: the denoiser trains for a number "
                         "of iterations (presets.DDPM_TRAIN)")
    for flag, value, low in (("--threads", args.threads, 1), ("--epochs", args.epochs, 1),
                             ("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if args.seeds is not None:
        negative = [s for s in args.seeds if s < 0]
        if negative:
            raise UsageError(f"--seeds must be non-negative, got {negative[0]}")
        if len(set(args.seeds)) != len(args.seeds):
            raise UsageError(f"--seeds repeats a seed: {' '.join(map(str, args.seeds))}")
    if args.methods is not None and not all(m.strip() for m in args.methods.split(",")):
        raise UsageError(f"--methods expects comma-separated labels, got {args.methods!r}")


def _device(text):
    import torch

    if text is None:
        return None
    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else "not available"
        raise UsageError(f"--device {text}: {reason}") from None
    return device


def _model(args, choices, what):
    if args.model is not None and args.model not in choices:
        raise UsageError(f"--model {args.model}: {what} is one of {', '.join(choices)}")
    return args.model


def _scenario(args):
    from . import presets

    forget = _forget(args.forget)
    if args.dataset == "digits":
        for flag, value in (("--root", args.root), ("--test-root", args.test_root),
                            ("--num-workers", args.num_workers)):
            if value is not None:
                raise UsageError(f"{flag} is for --dataset cifar10, cifar100 or imagefolder; the digits are built in")
    if args.scenario in LANGUAGE:
        _own_data(args, forget, "random", "random:FRACTION (the share of the people forgotten)")
        kw = dict(fractions=(forget[1],)) if forget else {}
        if args.epochs is not None:
            kw["train"] = dict(presets.FACTS_TRAIN, epochs=args.epochs)
        scenario = presets.facts_lm_scenario(**kw)
    elif args.scenario in GENERATION:
        _own_data(args, forget, "class", "class:INDEX[,INDEX...] (the classes forgotten one at a time)")
        kw = dict(classes=forget[1]) if forget else {}
        if _model(args, DENOISERS, f"the denoiser of {args.scenario}"):
            kw["denoiser"] = args.model
        scenario = presets.digits_ddpm_scenario(**kw)
    elif args.dataset == "digits":
        name = args.scenario or (f"digits-{forget[0]}" if forget else "digits-random")
        mode = name.split("-")[1]
        kw = {}
        if forget:
            kind, value = forget
            if kind != mode:
                raise UsageError(f"--forget {args.forget} does not match --scenario {name}")
            if value is not None:
                kw["fraction" if kind == "random" else "forget_class"] = _one_class(args, value)
        if args.epochs is not None:
            kw["epochs"] = args.epochs
        if _model(args, CLASSIFIERS, "the classifier"):
            kw["model"] = args.model
        scenario = presets.digits_scenario(mode, **kw)
    else:
        if args.scenario:
            raise UsageError(f"--scenario {args.scenario} is a digits scenario; it does not go with --dataset "
                             f"{args.dataset}")
        if args.root is None:
            raise UsageError(f"--dataset {args.dataset} needs --root")
        if (args.dataset == "imagefolder") != (args.test_root is not None):
            raise UsageError("--dataset imagefolder needs --test-root" if args.test_root is None else
                             f"--test-root is for --dataset imagefolder, not {args.dataset}")
        kind, value = forget or ("random", None)
        kw = dict(mode=kind)
        if value is not None:
            kw["fraction" if kind == "random" else "forget_class"] = _one_class(args, value)
        _model(args, CLASSIFIERS, "the classifier")
        for key in ("epochs", "model", "num_workers", "test_root"):
            if getattr(args, key, None) is not None:
                kw[key] = getattr(args, key)
        scenario = presets.image_scenario(args.dataset, args.root, **kw)
    if args.batch_size is not None:
        scenario.batch_size = args.batch_size
    return scenario


def _own_data(args, forget, kind, form):
    """The checks of a built-in scenario with data of its own: no ``--dataset``, and ``--forget`` (if given) of
    ``kind`` with a value, as ``form`` says."""
    if args.dataset != "digits":
        raise UsageError(f"--scenario {args.scenario} is a built-in scenario with its own data; it does not go "
                         f"with --dataset {args.dataset}")
    if forget and (forget[0] != kind or forget[1] is None):
        raise UsageError(f"--forget for --scenario {args.scenario} must be {form}, got {args.forget!r}")


def _one_class(args, value):
    """A fraction as it is, or the one class of a class-wise classification scenario."""
    if not isinstance(value, tuple):
        return value
    if len(value) > 1:
        raise UsageError(f"--forget {args.forget}: a classifier forgets one class per run (a list of classes, "
                         f"forgotten one at a time, is for --scenario {GENERATION[0]})")
    return value[0]


def _runner(scenario):
    """The module that checks, runs and tunes ``scenario``, and its tuning grids."""
    from . import experiment, presets

    if scenario.name in GENERATION:
        from . import generation

        return generation, presets.DDPM_TUNING_GRIDS
    if scenario.name in LANGUAGE:
        from . import language

        return language, presets.LM_TUNING_GRIDS
    return experiment, presets.TUNING_GRIDS


# ---------------------------------------------------------------------------------------------- folders
def _check_folder(path, flag):
    """``path`` is a folder that files can be written to, or can be created as one (nothing is created)."""
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor is where the folder would be created
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == os.path.abspath(probe):
            break
        probe = parent
    if not os.path.isdir(probe):
        what = "exists and is not a folder" if probe == path else f"cannot be created: {probe} is not a folder"
        raise UsageError(f"{flag} {path}: {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write to {probe} (permission denied or read-only)")


def _make_folder(path, flag):
    """Create ``path`` and prove that a file can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def _refuse_overwrite(out, names, overwrite):
    existing = [n for n in names if os.path.exists(os.path.join(out, n))]
    if existing and not overwrite:
        raise UsageError(f"--out {out} already holds {existing[0]}; pass --overwrite to replace it, or choose "
                         "another --out")


@dataclass
class Plan:
    """What a checked command line will do."""

    scenario: object
    labels: list | None
    seeds: list
    out: str
    device: object
    checkpoint_dir: str | None = None
    stale: list = field(default_factory=list)  # checkpoints of other runs that --overwrite replaces
    grids: dict | None = None


def prepare(args) -> Plan:
    """Check the whole command line and everything it points to; raise :class:`UsageError` for the first
    mistake. Creates the output and checkpoint folders (empty) and changes nothing else."""
    from . import experiment
    from .data import DataError

    _check_flags(args)
    device = _device(args.device)
    scenario = _scenario(args)
    module, tuning_grids = _runner(scenario)
    labels = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if args.command == "tune":
        grids = {k: v for k, v in tuning_grids.items() if labels is None or k in labels}
        unknown = [m for m in labels or [] if m not in tuning_grids]
        if unknown:
            raise UsageError(f"--methods: no tuning grid for {unknown[0]!r} in {scenario.name} (have "
                             f"{list(tuning_grids)})")
        parsed = _parse_set(args.set)
        for item, label, _, _ in parsed:
            if label != "*" and label not in grids:
                raise UsageError(f"--set {item!r}: no method {label!r} to tune (have {list(grids)})")
        grids = {label: [dict(config, **{k: v for _, lab, k, v in parsed if lab in ("*", label)}) for config in grid]
                 for label, grid in grids.items()}
        # every configuration of every grid is checked as a method of its own
        scenario.methods = {f"{label} #{i + 1}": c for label, grid in grids.items() for i, c in enumerate(grid)}
        check_labels, seeds = None, list(args.seeds or scenario.tuning_seeds)
    else:
        scenario.methods = _overrides(args.set, scenario.methods)
        # the diffusion scenario retrains RT only when asked (it costs as much as the original)
        known = list(scenario.methods) + (["RT"] if module.__name__.endswith(".generation") else [])
        unknown = [m for m in labels or [] if m not in known]
        if unknown:
            raise UsageError(f"--methods: no method {unknown[0]!r} in {scenario.name} (have {known})")
        for item, label, _, _ in _parse_set(args.set):
            if labels is not None and label != "*" and label not in labels:
                raise UsageError(f"--set {item!r}: {label} is not among --methods {args.methods}")
        check_labels, seeds, grids = labels, list(args.seeds), None
    out = args.out or os.path.join("runs", scenario.name if args.command == "run" else f"tune-{scenario.name}")
    _check_folder(out, "--out")
    _refuse_overwrite(out, RUN_OUTPUTS if args.command == "run" else TUNE_OUTPUTS, args.overwrite)
    checkpoint_dir = None
    if args.command == "run" and args.no_checkpoints and args.checkpoint_dir:
        raise UsageError("--no-checkpoints and --checkpoint-dir contradict each other")
    if args.command == "run" and not args.no_checkpoints:
        checkpoint_dir = args.checkpoint_dir or os.path.join(out, "checkpoints")
        _check_folder(checkpoint_dir, "--checkpoint-dir")
    try:
        stale = module.check_runs(scenario, seeds, check_labels, device=device, checkpoint_dir=checkpoint_dir)
    except DataError as e:
        raise UsageError(f"data: {e}") from None
    except experiment.RunConfigError as e:
        given = [item for item, label, _, _ in _parse_set(args.set) if label in ("*", e.tag.split(" #")[0])]
        flag = f"--model {args.model}: " if e.tag == "denoiser" and args.model else ""
        raise UsageError(f"{flag}{e}" + (f" (with --set {' '.join(given)})" if given else "")) from None
    except ValueError as e:  # what is left is the forget set
        raise UsageError(f"--forget {args.forget or scenario.name}: {e}") from None
    if stale and not args.overwrite:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise UsageError(f"{stale[0]}{more}; pass --overwrite to replace it, or use another --checkpoint-dir")
    _make_folder(out, "--out")
    if checkpoint_dir is not None:
        _make_folder(checkpoint_dir, "--checkpoint-dir")
    return Plan(scenario, labels, seeds, out, device, checkpoint_dir, [e.path for e in stale], grids)


# ---------------------------------------------------------------------------------------------- commands
def _common(p):
    p.add_argument("--scenario", choices=DIGITS + GENERATION + LANGUAGE,
                   help="a built-in digits scenario (default: digits-random); digits-ddpm-class forgets a class "
                        "in a class-conditional diffusion model; facts-lm forgets fictitious people's facts from "
                        "a causal LM")
    p.add_argument("--dataset", choices=("digits", "cifar10", "cifar100", "imagefolder"), default="digits")
    p.add_argument("--root", help="data folder (CIFAR: the folder holding cifar-10-batches-py; ImageFolder: train)")
    p.add_argument("--test-root", help="ImageFolder test folder")
    p.add_argument("--forget", help="random:FRACTION or class:INDEX (digits-ddpm-class: class:INDEX[,INDEX...], "
                   "forgotten one at a time; facts-lm: random:FRACTION of the people, default 0.01, 0.05 and 0.1)")
    p.add_argument("--model", choices=tuple(dict.fromkeys(CLASSIFIERS + DENOISERS)),
                   help="classifier (mlp, cnn, resnet18) or, for digits-ddpm-class, denoiser (mlp, unet, dit)")
    p.add_argument("--epochs", type=int, help="epochs to train the original and RT (at least 1; not for "
                   "digits-ddpm-class, whose denoiser trains for a number of iterations)")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--num-workers", type=int, dest="num_workers")
    p.add_argument("--methods", help="comma-separated labels (default: all of the scenario)")
    p.add_argument("--set", action="append", metavar="LABEL.key=value",
                   help="override a hyperparameter, e.g. SFR-on.forget_alpha=50 or '*.iterations=100'")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out, and checkpoints written for another run")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="log forget/remain loss and accuracy while running")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sfron-unlearn", description="Machine unlearning with SFR-on and "
                     "baselines: train the original, retrain RT, unlearn, evaluate against RT.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a scenario and print the paper-style table")
    _common(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="folder for results.json, table.md and results.png (default: runs/<scenario>)")
    p.add_argument("--checkpoint-dir", help="checkpoint every run here (default: <out>/checkpoints); the same "
                   "command resumes from them")
    p.add_argument("--no-checkpoints", action="store_true", help="keep no checkpoints (an interrupted run "
                   "starts over)")
    t = sub.add_parser("tune", help="pick each method's preset from its grid: the lowest Avg.D on the tuning "
                       "seeds (class-wise: among the configurations that forget the class on every seed)")
    _common(t)
    t.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="tuning seeds (default: the scenario's: 100-102 random, 100-109 class-wise)")
    t.add_argument("--out", help="where to write tuning.json (default: runs/tune-<scenario>)")
    sub.add_parser("presets", help="print the presets as JSON")
    return parser


def main(argv=None) -> int:
    """The command line; returns the exit status (2: a usage error, 130: interrupted)."""
    try:
        return _main(argv)
    except UsageError as e:
        print(f"sfron-unlearn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before anything ran (a run's own interrupts are reported in _main)
        print("sfron-unlearn: interrupted before training started", file=sys.stderr)
        return 130


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        from . import presets

        print(json.dumps({"sfron_paper": presets.SFRON_PAPER, "digits-random": presets.DIGITS_RANDOM,
                          "digits-class": presets.DIGITS_CLASS,
                          "sfron_paper_generation": presets.SFRON_PAPER_GENERATION,
                          "digits-ddpm-class": presets.DIGITS_DDPM, "facts-lm": presets.FACTS_LM,
                          "facts-lm training": presets.FACTS_TRAIN}, indent=1))
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    plan = prepare(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return _tune(args, plan) if args.command == "tune" else _run(args, plan)


def _tune(args, plan) -> int:
    from . import experiment

    started = time.perf_counter()
    try:
        result = _runner(plan.scenario)[0].tune(plan.scenario, plan.grids, seeds=plan.seeds, device=plan.device,
                                                progress=args.progress)
    except KeyboardInterrupt:
        print("sfron-unlearn: interrupted; tuning keeps no checkpoints, so the same command starts over",
              file=sys.stderr)
        return 130
    print(json.dumps(result["best"], indent=1))
    path = os.path.join(plan.out, "tuning.json")
    try:
        experiment.save_json(result, path)
    except OSError as e:
        print(f"sfron-unlearn: error: cannot write {path} ({e.strerror or e}); the picks are printed above",
              file=sys.stderr)
        return 1
    print(f"wrote {path} in {time.perf_counter() - started:.1f}s")
    return 0


def _run(args, plan) -> int:
    from . import experiment
    from .checkpoints import CheckpointError
    from .runner import RunInterrupted

    for path in plan.stale:  # --overwrite: checkpoints (or run folders) of another run make way
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    scenario = plan.scenario
    module = _runner(scenario)[0]
    generative = module.__name__.endswith(".generation")
    language = module.__name__.endswith(".language")
    started = time.perf_counter()
    try:
        results = module.run_scenario(scenario, seeds=plan.seeds, methods=plan.labels, device=plan.device,
                                      progress=args.progress, checkpoint_dir=plan.checkpoint_dir,
                                      **(dict(out=plan.out) if generative else {}))
    except KeyboardInterrupt as e:
        where = f": {e}" if isinstance(e, RunInterrupted) else ""
        if plan.checkpoint_dir is None:
            print(f"sfron-unlearn: interrupted{where}; no checkpoints were kept (--no-checkpoints), so the same "
                  "command starts over", file=sys.stderr)
        else:
            print(f"sfron-unlearn: interrupted{where}; run the same command to resume from the checkpoints in "
                  f"{plan.checkpoint_dir}", file=sys.stderr)
        return 130
    except CheckpointError as e:  # a file damaged after the check before training
        print(f"sfron-unlearn: error: {e}; delete it to run that part again", file=sys.stderr)
        return 2
    print()
    if generative:
        print_generation(results)
    elif language:
        module.print_results(results)
    else:
        print(f"## {scenario.name}: {scenario.description}")
        print(f"seeds {plan.seeds}; mean ± std; FA/RA/TA/MIA in %, Avg.D = mean |gap to RT| over FA/RA/TA/MIA, "
              "KL/JS to RT on D_f in nats, RTE in seconds")
        print(experiment.format_table(results, markdown=False))
    try:
        if generative or language:
            module.write_outputs(results, plan.out)
        else:
            write_outputs([results], plan.out)
    except OSError as e:
        print(f"sfron-unlearn: error: cannot write to {plan.out} ({e.strerror or e}); the table is printed above"
              + (f" and the runs are checkpointed in {plan.checkpoint_dir}" if plan.checkpoint_dir else ""),
              file=sys.stderr)
        return 1
    print(f"\nwrote {plan.out}/results.json, table.md, results.png" + (" and grids/" if generative else "")
          + f" in {time.perf_counter() - started:.1f}s")
    return 0


def print_generation(results, echo=print):
    """The tables and the quality bar of a diffusion scenario's results."""
    from . import generation

    echo(f"## {results['scenario']}: {results['description']}")
    echo(f"seeds {results['seeds']} x classes {results['classes']}; mean ± std over cases. FA = share (%) of the "
         "images asked for the forgotten class that the judge assigns to it, p(c_f) its mean probability (%), H the "
         "judge's mean entropy; kept acc and FID over the nine kept classes; iters to FA ≤ 5 %: first point of the "
         "run's FA trace at or below 5 %; RTE in seconds")
    echo(generation.format_table(results, markdown=False))
    echo("\nFA (%) per forgotten class, mean over seeds (worst seed):")
    echo(generation.format_class_table(results, markdown=False))
    echo("\nQuality bar:")
    for met, sentence in generation.quality_bar(results):
        echo(f"  [{'met' if met else 'NOT met'}] {sentence}")


def write_outputs(results_list, out):
    """results.json, table.md and results.png for one or more scenarios in ``out``."""
    from . import experiment, presets

    os.makedirs(out, exist_ok=True)
    payload = results_list[0] if len(results_list) == 1 else {r["scenario"]: r for r in results_list}
    experiment.save_json(payload, os.path.join(out, "results.json"))
    with open(os.path.join(out, "table.md"), "w") as fh:
        for r in results_list:
            fh.write(f"### {r['scenario']}\n\n{r['description']}. Seeds {r['seeds']}, mean ± std.\n\n")
            fh.write(experiment.format_table(r) + "\n\n")
    experiment.plot_results(results_list, os.path.join(out, "results.png"), past_ceiling=presets.PAST_CEILING)


if __name__ == "__main__":
    sys.exit(main())
