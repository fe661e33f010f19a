"""Measure every op on every case against the baselines; write JSON, Markdown and a chart.

    python -m benchmarks.run [--quick | --smoke] [--device cpu|cuda] [--out benchmarks/results]

``--quick`` runs smaller CPU cases with fewer repetitions (a few minutes on two
cores); ``--smoke`` is the test suite's check that the whole pipeline works (seconds).
Files are named after the device and mode: ``cpu.json`` (every number),
``cpu.md`` (every table), ``cpu-summary.md`` (targets, headline and end to
end, for the README), ``cpu.png``; ``cuda-quick.json`` and so on (``--tag``
overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import cases, e2e, host_bound, report, suite
from .measure import Timer, around, bandwidth_roofs, environment, stream_bound_s
from .ops import OPS

#: per mode and device type: budget seconds per measurement, min and max repetitions, warmup calls
SETTINGS = {
    ("full", "cpu"): dict(budget_s=0.6, min_reps=5, max_reps=50, warmup=2),
    ("full", "cuda"): dict(budget_s=0.2, min_reps=10, max_reps=100, warmup=2),
    ("quick", "cpu"): dict(budget_s=0.2, min_reps=3, max_reps=30, warmup=1),
    ("quick", "cuda"): dict(budget_s=0.1, min_reps=5, max_reps=50, warmup=2),
    ("smoke", "cpu"): dict(budget_s=0.0, min_reps=1, max_reps=1, warmup=1),
    ("smoke", "cuda"): dict(budget_s=0.0, min_reps=1, max_reps=1, warmup=1),
}
E2E_BATCH = {"full": 128, "quick": 128, "smoke": 2}
E2E_BATCH_CPU_QUICK = 16
# host_bound: (rounds, steps per round) per mode
HOST_BOUND = {"full": (15, 40), "quick": (8, 25), "smoke": (2, 3)}
VERIFY_RTOL = {"fp32": 1e-5}


def _csv(text):
    return [s for s in text.split(",") if s] if text else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller CPU cases, fewer repetitions")
    mode.add_argument("--smoke", action="store_true", help="tiny cases, two repetitions: checks the pipeline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", help="file name stem (default: device type, plus -quick/-smoke)")
    p.add_argument("--ops", type=_csv, help=f"comma-separated subset of {', '.join(OPS)}")
    p.add_argument("--cases", type=_csv, help=f"comma-separated subset of {', '.join(cases.CASE_NAMES)}")
    p.add_argument("--dtypes", type=_csv, help="comma-separated subset of fp32, bf16")
    p.add_argument("--contenders", type=_csv, help="comma-separated backends and baselines (default: all)")
    p.add_argument("--budget", type=float, help="seconds of repetitions per measurement")
    p.add_argument("--deadline", type=float, help="seconds for the whole run; later measurements are skipped")
    p.add_argument("--e2e-batch", type=int, help="batch size of the end-to-end iteration")
    p.add_argument("--resume", action="store_true",
                   help="continue the results saved under the same tag: keep what they hold, measure what they lack")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--no-host-bound", action="store_true", help="leave out the host cost of a step (host_bound)")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-flush", action="store_true", help="do not flush caches between repetitions")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 in smoke mode)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _check_names(kind, given, known):
    bad = [g for g in given or () if g not in known]
    if bad:
        raise SystemExit(f"unknown {kind}: {', '.join(bad)}; expected some of {', '.join(known)}")


def _add_ratios(rows):
    """``vs_<baseline>`` = baseline time / row time, within one (op, case, dtype) group."""
    baseline = {r["contender"]: r["median_s"] for r in rows if r["kind"] == "baseline" and r.get("median_s")}
    for r in rows:
        for name, t in baseline.items():
            if r.get("median_s"):
                r[f"vs_{name}"] = t / r["median_s"]


def _resume(results, path, env, log) -> set:
    """Take over a previous run's results (same device and mode); the (case, op, dtype) groups it completed.

    A group counts as done when every contender of this run measured it without error
    there; other groups are measured again in full, so that the ratios in a group
    always come from one process.
    """
    if not os.path.exists(path):
        log(f"  --resume: no {path} yet, starting afresh")
        return set()
    with open(path) as f:
        previous = json.load(f)
    if (previous["meta"]["device"], previous["meta"]["mode"]) != (env["device"], env["mode"]):
        raise SystemExit(f"--resume: {path} holds a {previous['meta']['mode']} run on {previous['meta']['device']}")
    groups = {}
    for r in previous["rows"]:
        groups.setdefault((r["case"], r["op"], r["dtype"]), []).append(r)
    wanted = set(results["contenders"])
    done = {key for key, rows in groups.items()
            if {r["contender"] for r in rows if "error" not in r} >= wanted}
    results["rows"] = [r for key in done for r in groups[key] if r["contender"] in wanted]
    if set(previous.get("contenders", ())) >= wanted:
        results["e2e"] = [r for r in previous.get("e2e", []) if r["contender"] in wanted | {"fwd_bwd"}]
        results["verification"] = previous.get("verification", {})
        results["verification_tolerance"] = previous.get("verification_tolerance")
        results["verification_failures"] = previous.get("verification_failures", [])
    results["runs"] = previous.get("runs", [])
    log(f"  --resume: kept {len(done)} measured groups from {path}")
    return done


def main(argv=None) -> dict:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    _check_names("ops", args.ops, list(OPS))
    _check_names("cases", args.cases, list(cases.CASE_NAMES))
    _check_names("dtypes", args.dtypes, list(cases.DTYPES))
    threads = args.threads or (1 if mode == "smoke" else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, mode, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args, mode, device) -> dict:
    started = time.perf_counter()
    deadline = started + args.deadline if args.deadline else None

    def log(msg):
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}" if msg else "", flush=True)

    env = environment(device)
    env["mode"] = mode
    log(f"sfron_ops benchmarks on {env['device_name']} ({device}), {mode} mode, torch {env['torch']}, "
        f"{env['torch_threads']} threads, load average {tuple(round(x, 2) for x in env['loadavg_start'])}")

    the_contenders, unavailable = suite.contenders(device, args.contenders)
    ours = [c.name for c in the_contenders if c.kind == "ours"]
    for impl, why in unavailable.items():
        log(f"  backend {impl} not measured: {why}")

    roofs = bandwidth_roofs(device, mode)
    log(f"  bandwidth: in-place a += s*b*b {roofs['inplace_gbs']:.1f} GB/s, copy {roofs['copy_gbs']:.1f} GB/s, "
        f"read {roofs['read_gbs']:.1f} GB/s")

    settings = dict(SETTINGS[mode, device.type])
    if args.budget is not None:
        settings["budget_s"] = args.budget
    timer = Timer(device, flush=not args.no_flush and mode != "smoke", **settings)
    results = {"meta": env, "runs": [], "roofs": roofs, "unavailable": unavailable, "settings": settings,
               "contenders": [c.name for c in the_contenders], "verification": {}, "rows": [], "e2e": [],
               "skipped": [], "ops": {name: {"title": s.title, "family": s.family, "bytes_formula": s.bytes_formula,
                                             "notes": s.notes} for name, s in OPS.items()}}
    op_names = args.ops or list(OPS)
    dtypes = args.dtypes or list(cases.DTYPES)
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or device.type + ("" if mode == "full" else f"-{mode}")
    paths = {ext: os.path.join(args.out, f"{tag}.{ext}") for ext in ("json", "md", "png")}
    paths["summary"] = os.path.join(args.out, f"{tag}-summary.md")  # written by report.write
    done = _resume(results, paths["json"], env, log) if args.resume else set()

    # every contender must compute what the reference computes, or the timings compare different work
    if not args.no_verify and "reference" in ours and not results["verification"]:
        small = cases.build_case("ragged", device, "smoke")
        failures = []
        for op in op_names:
            errors = suite.verify(op, small, torch.float32, device, the_contenders, seed=args.seed)
            results["verification"][op] = errors
            bad = {k: v for k, v in errors.items() if v is not None and v > VERIFY_RTOL["fp32"]}
            if bad:
                failures.append(f"{op}: {bad}")
        results["verification_tolerance"] = VERIFY_RTOL["fp32"]
        log("  verification against the reference: " + ("all agree" if not failures else "; ".join(failures)))
        results["verification_failures"] = failures

    if not args.no_e2e and not results["e2e"]:
        batch = args.e2e_batch or (E2E_BATCH_CPU_QUICK if mode == "quick" and device.type == "cpu" else E2E_BATCH[mode])
        e2e_timer = Timer(device, budget_s=settings["budget_s"] * 4, min_reps=settings["min_reps"] if mode != "full"
                          else 3, max_reps=20, warmup=1, flush=False)
        names = None if not args.contenders else set(args.contenders) | {"fwd_bwd"}
        log(f"end to end: one SFR-on iteration of ResNet-18, batch {batch}")
        results["e2e"] = e2e.run(device, batch, ours, e2e_timer, names=names, log=log, memory=not args.no_memory)
        _add_ratios(results["e2e"])

    if not args.no_host_bound and not results.get("host_bound"):
        log("host_bound: one step() of ResNet-18's 62 tensors with 8 elements each")
        rounds, steps = HOST_BOUND[mode]
        results["host_bound"] = host_bound.measure(device, rounds=rounds, steps=steps, threads=None)
        for name, us in results["host_bound"].items():
            log(f"  {name}: {us:,.0f} µs")

    for case_name in args.cases or cases.cases_for(device, mode):
        case = cases.build_case(case_name, device, mode)
        log(f"{case_name}: {case.description}, {case.n_tensors:,} tensors, {case.numel:,} elements")
        for op in op_names:
            spec = OPS[op]
            for dtype_name in (d for d in spec.dtypes if d in dtypes):
                if (case_name, op, dtype_name) in done:
                    continue
                if deadline is not None and time.perf_counter() > deadline:
                    results["skipped"].append({"case": case_name, "op": op, "dtype": dtype_name, "why": "deadline"})
                    continue
                dtype = cases.DTYPES[dtype_name]
                template = cases.make_state(case, dtype, device, spec.needs, args.seed)
                modelled = spec.modelled_bytes(case.numel, dtype)
                # the bytes of the masks our backends read (packed: one bit per element)
                mask_key = next((k for k in ("packed_masks", "masks") if k in spec.needs), None)
                mask_bytes = sum(m.nbytes for m in template.tensors[mask_key]) if mask_key else 0
                group = []
                read_bytes, copy_bytes = spec.read_bytes(case.numel, dtype), spec.copy_bytes(case.numel, dtype)
                for contender in the_contenders:
                    # each row's roofs: measured right before and right after it (the run's first are in "roofs")
                    before = bandwidth_roofs(device, mode, quick=True)
                    try:
                        row = suite.measure(op, template, contender, timer, memory=not args.no_memory)
                    except Exception as exc:  # one broken contender must not lose the others' results
                        row = {"contender": contender.name, "kind": contender.kind,
                               "error": f"{type(exc).__name__}: {exc}"}
                        suite.release(device, case.numel)
                    row.update(case=case_name, op=op, dtype=dtype_name, numel=case.numel, tensors=case.n_tensors,
                               modelled_bytes=modelled, mask_bytes=mask_bytes)
                    if row.get("median_s"):
                        local = around(before, bandwidth_roofs(device, mode, quick=True))
                        row["gbs"] = modelled / row["median_s"] / 1e9
                        row.update(local, roof_share=row["gbs"] / local["roof_gbs"], read_bytes=read_bytes,
                                   copy_bytes=copy_bytes)
                        row["bound_share"] = stream_bound_s(modelled, read_bytes, copy_bytes, local) / row["median_s"]
                    group.append(row)
                _add_ratios(group)
                for row in group:
                    log("  " + report.log_line(row))
                results["rows"].extend(group)
                del template
                suite.release(device, case.numel)
    if results["skipped"]:
        log(f"  {len(results['skipped'])} measurements skipped at the deadline")

    env["loadavg_end"] = os.getloadavg()
    env["wall_s"] = time.perf_counter() - started
    results["runs"].append({k: env[k] for k in ("date_utc", "commit", "loadavg_start", "loadavg_end", "wall_s")})
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    report.write(results, paths["json"])
    log("")
    log(report.markdown(results, chart_name=os.path.basename(paths["png"])))
    log(f"wrote {', '.join(paths.values())} in {env['wall_s']:.0f} s")
    return results


def failures(results) -> list[str]:
    """What went wrong in a run: contenders that disagree with the reference, and failed measurements."""
    out = list(results.get("verification_failures", []))
    out += [f"{r['op']}/{r['case']}/{r['dtype']}/{r['contender']}: {r['error']}"
            for r in results["rows"] if "error" in r]
    return out


if __name__ == "__main__":
    problems = failures(main())
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)
