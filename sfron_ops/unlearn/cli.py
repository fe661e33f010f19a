"""``sfron-unlearn`` (also ``python -m sfron_ops.unlearn``): one scenario end to end from the command line.

    sfron-unlearn run --scenario digits-random --seeds 0 1 2 --out runs/digits-random
    sfron-unlearn run --dataset cifar10 --root ~/data --forget random:0.1 --model resnet18 --seeds 0
    sfron-unlearn tune --scenario digits-class
    sfron-unlearn presets
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

DIGITS = ("digits-random", "digits-class")


def _value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(items, methods):
    """``LABEL.key=value`` (or ``*.key=value`` for every method) applied to a copy of ``methods``."""
    out = {k: dict(v) for k, v in methods.items()}
    for item in items or []:
        target, sep, value = item.partition("=")
        label, dot, key = target.rpartition(".")
        if not sep or not dot or not key:
            raise SystemExit(f"--set expects LABEL.key=value, got {item!r}")
        labels = list(out) if label == "*" else [label]
        for lab in labels:
            if lab not in out:
                raise SystemExit(f"--set {item!r}: no method {lab!r} (have {list(out)})")
            out[lab][key] = _value(value)
    return out


def _scenario(args):
    from . import presets

    if args.dataset == "digits" or args.scenario:
        name = args.scenario or "digits-random"
        if name not in DIGITS:
            raise SystemExit(f"--scenario must be one of {DIGITS}, got {name!r}")
        mode = name.split("-")[1]
        kw = {}
        if args.forget:
            kind, _, value = args.forget.partition(":")
            if kind != mode:
                raise SystemExit(f"--forget {args.forget!r} does not match --scenario {name!r}")
            if kind == "random" and value:
                kw["fraction"] = float(value)
            if kind == "class" and value:
                kw["forget_class"] = int(value)
        if args.epochs:
            kw["epochs"] = args.epochs
        if args.model:
            kw["model"] = args.model
        return presets.digits_scenario(mode, **kw)
    if args.root is None:
        raise SystemExit(f"--dataset {args.dataset} needs --root")
    kind, _, value = (args.forget or "random:0.1").partition(":")
    kw = dict(mode=kind)
    if kind == "random":
        kw["fraction"] = float(value or 0.1)
    elif kind == "class":
        kw["forget_class"] = int(value or 0)
    else:
        raise SystemExit(f"--forget must be random:FRACTION or class:INDEX, got {args.forget!r}")
    for key in ("epochs", "model", "batch_size", "num_workers", "test_root"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    return presets.image_scenario(args.dataset, args.root, **kw)


def _common(p):
    p.add_argument("--scenario", choices=DIGITS, help="a built-in digits scenario (default: digits-random)")
    p.add_argument("--dataset", choices=("digits", "cifar10", "cifar100", "imagefolder"), default="digits")
    p.add_argument("--root", help="data folder (CIFAR: the folder holding cifar-10-batches-py; ImageFolder: train)")
    p.add_argument("--test-root", help="ImageFolder test folder")
    p.add_argument("--forget", help="random:FRACTION or class:INDEX")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet18"))
    p.add_argument("--epochs", type=int, help="epochs to train the original and RT")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--num-workers", type=int, dest="num_workers")
    p.add_argument("--methods", help="comma-separated labels (default: all of the scenario)")
    p.add_argument("--set", action="append", metavar="LABEL.key=value",
                   help="override a hyperparameter, e.g. SFR-on.forget_alpha=50 or '*.iterations=100'")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="log forget/remain loss and accuracy while running")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfron-unlearn", description="Machine unlearning with SFR-on and "
                                     "baselines: train the original, retrain RT, unlearn, evaluate against RT.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a scenario and print the paper-style table")
    _common(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="folder for results.json, table.md and results.png (default: runs/<scenario>)")
    p.add_argument("--checkpoint-dir", help="checkpoint every run here; rerunning resumes")
    t = sub.add_parser("tune", help="pick each method's preset from its grid: the lowest Avg.D on the tuning "
                       "seeds (class-wise: among the configurations that forget the class on every seed)")
    _common(t)
    t.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="tuning seeds (default: the scenario's: 100-102 random, 100-109 class-wise)")
    t.add_argument("--out", help="where to write tuning.json (default: runs/tune-<scenario>)")
    sub.add_parser("presets", help="print the presets as JSON")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        from . import presets

        print(json.dumps({"sfron_paper": presets.SFRON_PAPER, "digits-random": presets.DIGITS_RANDOM,
                          "digits-class": presets.DIGITS_CLASS}, indent=1))
        return 0
    import torch

    from . import experiment, presets

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    scenario = _scenario(args)
    labels = args.methods.split(",") if args.methods else None
    scenario.methods = _overrides(args.set, scenario.methods)
    out = args.out or os.path.join("runs", scenario.name if args.command == "run" else f"tune-{scenario.name}")
    started = time.perf_counter()
    if args.command == "tune":
        grids = {k: v for k, v in presets.TUNING_GRIDS.items() if labels is None or k in labels}
        result = experiment.tune(scenario, grids, seeds=args.seeds, device=args.device, progress=args.progress)
        os.makedirs(out, exist_ok=True)
        experiment.save_json(result, os.path.join(out, "tuning.json"))
        print(json.dumps(result["best"], indent=1))
        print(f"wrote {os.path.join(out, 'tuning.json')} in {time.perf_counter() - started:.1f}s")
        return 0
    results = experiment.run_scenario(scenario, seeds=args.seeds, methods=labels, device=args.device,
                                      progress=args.progress, checkpoint_dir=args.checkpoint_dir)
    write_outputs([results], out)
    print()
    print(f"## {scenario.name}: {scenario.description}")
    print(f"seeds {args.seeds}; mean ± std; FA/RA/TA/MIA in %, Avg.D = mean |gap to RT| over FA/RA/TA/MIA, "
          "KL/JS to RT on D_f in nats, RTE in seconds")
    print(experiment.format_table(results, markdown=False))
    print(f"\nwrote {out}/results.json, table.md, results.png in {time.perf_counter() - started:.1f}s")
    return 0


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
