"""Markdown tables and a chart from a results JSON (``python -m benchmarks.report results.json``)."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict

HEADLINE_CASE = "resnet18_cifar"
BASELINES = ("torch", "official")
#: one colour per contender in both panels of the chart
CHART_ORDER = ("reference", "foreach", "fused", "triton", "torch", "official", "fwd_bwd")
#: the load average (per torch thread) above which a run is marked as measured on a busy machine
BUSY_LOAD_PER_THREAD = 0.25


def fmt_time(seconds) -> str:
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs" if seconds >= 1e-5 else f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    if n < 1 << 10:
        return f"{n} B"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:.0f}×"


def log_line(row) -> str:
    head = f"{row['op']:>14} {row['dtype']} {row['contender']:>9}"
    if "error" in row:
        return f"{head}: FAILED {row['error']}"
    ratios = "  ".join(f"{fmt_ratio(row.get('vs_' + b))} vs {b}" for b in BASELINES if row.get("vs_" + b))
    return (f"{head}: {fmt_time(row['median_s']):>9} [{fmt_time(row['p20_s'])}–{fmt_time(row['p80_s'])}]"
            f" {row['gbs']:7.1f} GB/s {100 * row['roof_share']:5.1f}% roof{_bound(row, ' %5.1f%% bound')}  {ratios}")


def _bound(row, fmt) -> str:
    """The row's share of its stream bound (measure.stream_bound_s), formatted, or "" for rows without one."""
    return fmt % (100 * row["bound_share"]) if row.get("bound_share") else ""


def _peak(row):
    mem = row.get("memory") or {}
    return mem.get("device_bytes")


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _best_ours(group):
    ours = [r for r in group if r.get("kind") == "ours" and r.get("median_s")]
    return min(ours, key=lambda r: r["median_s"]) if ours else None


def _busy(meta) -> bool:
    loads = [meta.get("loadavg_start", (0,))[0], (meta.get("loadavg_end") or (0,))[0]]
    return max(loads) > BUSY_LOAD_PER_THREAD * max(meta.get("torch_threads", 1), 1)


def headline(results, case=HEADLINE_CASE, dtype="fp32") -> list[dict]:
    """Per op on ``case``: the fastest of our backends and the baselines' times."""
    groups = defaultdict(list)
    for r in results["rows"]:
        if r["case"] == case and r["dtype"] == dtype:
            groups[r["op"]].append(r)
    out = []
    for op, group in groups.items():
        best = _best_ours(group)
        if best is None:
            continue
        base = {r["contender"]: r for r in group if r.get("kind") == "baseline" and r.get("median_s")}
        out.append({"op": op, "best": best, **{b: base.get(b) for b in BASELINES}})
    return out


def _header(results, chart_name) -> list[str]:
    meta, roofs = results["meta"], results["roofs"]
    lines = [f"# sfron_ops benchmarks: {meta['device_name']} ({meta['device']})", ""]
    commit = (meta.get("commit") or "unknown")[:10]
    dirty = " with uncommitted changes" if meta.get("commit_dirty") else ""
    lines.append(
        f"Measured {meta['date_utc']} at commit `{commit}`{dirty}, {meta['mode']} mode, "
        f"in {meta.get('wall_s', 0):.0f} s. "
        f"torch {meta['torch']}, torchvision {meta.get('torchvision')}, triton {meta.get('triton')}, "
        f"Python {meta['python']}; {meta['cpu_count']} CPUs ({meta['cpu']}), {meta['torch_threads']} torch threads"
        + (f"; compute capability {meta.get('capability')}, CUDA {meta.get('cuda')}" if meta.get("cuda") else "")
        + ".")
    runs = results.get("runs", [])
    if len(runs) > 1:
        lines += ["", f"Collected over {len(runs)} runs (`--resume`); each (op, case, dtype) table comes from one "
                  "process, and its \"% roof\" from that process's own bandwidth measurement: "
                  + "; ".join(f"{r['date_utc']} at `{(r.get('commit') or 'unknown')[:10]}` ({r['wall_s']:.0f} s, "
                              f"load {r['loadavg_start'][0]:.2f}–{r['loadavg_end'][0]:.2f})" for r in runs) + "."]
    if meta.get("torch_threads", 0) < (meta.get("cpu_count") or 0) and not meta["device"].startswith("cuda"):
        lines += ["", f"The CPU ops ran on {meta['torch_threads']} of the machine's {meta['cpu_count']} cores "
                  "(`--threads`); the bandwidth roof was measured with the same number of threads."]
    la0 = ", ".join(f"{x:.2f}" for x in meta["loadavg_start"])
    la1 = ", ".join(f"{x:.2f}" for x in meta.get("loadavg_end") or ())
    lines += ["", f"Load average (1, 5, 15 min) at the start: {la0}; at the end: {la1}."
              + (" **The machine was shared with other work during this run: expect noisier and slower numbers "
                 "than on an idle machine.**" if _busy(meta) else "")]
    measured = [c for c in results["contenders"] if c not in BASELINES]
    lines += ["", f"Our backends measured: {', '.join(measured)}. Baselines: `torch` (best stock-PyTorch composition) "
              "and `official` (the authors' per-parameter loop)."]
    if results.get("unavailable"):
        lines += ["Not measured here: " + "; ".join(f"`{k}` ({v})" for k, v in results["unavailable"].items()) + "."]
    roof_name = "device-to-device copy" if roofs["roof"] == "copy" else "in-place stream `a += s*b*b`"
    read = f", read-only `a.sum()` {roofs['read_gbs']:.1f} GB/s" if roofs.get("read_gbs") else ""
    local = [r["roof_gbs"] for r in results["rows"] if r.get("roof_gbs")]
    drift = [r["roof_drift"] for r in results["rows"] if r.get("roof_drift") is not None]
    again = (f", measured again right before and right after every row (the row uses their mean): "
             f"{min(local):.1f}–{max(local):.1f} GB/s over this run, and it moved by up to {100 * max(drift):.0f} % "
             f"(median {100 * statistics.median(drift):.0f} %) during one row; each table's *roof* column gives the "
             "row's own" if drift else f" ({roofs['roof_gbs']:.1f} GB/s)")
    lines += ["", f"Bandwidth measured in the same process over {roofs['elements']:,}-element fp32 arrays at the "
              f"start: in-place stream `a += s*b*b` {roofs['inplace_gbs']:.1f} GB/s, copy {roofs['copy_gbs']:.1f} GB/s"
              f"{read}. \"% roof\" is relative to the {roof_name}{again}."]
    lines += ["", "*% bound* is the share of the op's stream bound: the bytes of its read-only passes (a norm, a "
              "finiteness check, the saliency ratio's reads) at the read-only stream, those of copy-like passes at "
              "the copy stream, the rest at the roof, all measured around the row. A CPU core streams reads "
              "alone, or a copy, well below its in-place rate, so this is the physical limit of each op."]
    lines += ["", "How to read the tables: *time* is the median over the repetitions with the 20th–80th percentile "
              "range; *host* is the wall time of submitting one call (on CPU, calls are synchronous and host = time); "
              "*GB/s* is the minimal byte model of the op divided by the median time, the same bytes for every "
              "contender (a share of the roof above 100 % means part of the data stayed in a cache despite the "
              "flush, or the contender moved fewer bytes than the model); *peak* is the extra memory one call "
              "allocates at its peak; *×torch* and *×official* are the baseline's time over this row's time "
              "(above 1: faster than that baseline)."]
    if chart_name:
        lines += ["", f"![benchmark chart]({chart_name})"]
    return lines


def _find(results, op, case, dtype, contender):
    return next((r for r in results["rows"] if (r["op"], r["case"], r["dtype"], r["contender"])
                 == (op, case, dtype, contender) and r.get("median_s")), None)


def targets(results) -> list[list[str]]:
    """The kernel issues' targets that this run can check: ``[target, measured, goal, status]`` rows."""
    meta, roofs = results["meta"], results["roofs"]
    cuda = meta["device"].startswith("cuda")
    missing = results.get("unavailable", {})
    ops_ = list(dict.fromkeys(r["op"] for r in results["rows"]))
    out = []

    def status(ok):
        return "met" if ok else "**not met**"

    def absent(backend, what):
        out.append([what, f"`{backend}` not measured ({missing.get(backend, 'not in this run')})", "", "—"])

    flat = [r for r in results["rows"] if r["case"] == "flat"]
    flat_size = f"flat {flat[0]['numel']:,}" if flat else "flat"
    if not cuda:
        if not _find(results, "forget_full", "flat", "fp32", "fused"):
            absent("fused", f"C++ ≥ 80 % of the in-place bandwidth ({flat_size}, every op, fp32)")
            return out
        for op in ops_:
            r = _find(results, op, "flat", "fp32", "fused")
            if r:
                out.append([f"C++ `{op}` bandwidth, {flat_size}, fp32", f"{100 * r['roof_share']:.0f} % of in-place"
                            + _bound(r, " (%.0f %% of its stream bound)"), "≥ 80 %", status(r["roof_share"] >= 0.8)])
        fused, foreach = (_find(results, "forget_full", "flat", "fp32", c) for c in ("fused", "foreach"))
        if fused and foreach:
            ratio = foreach["median_s"] / fused["median_s"]
            out.append([f"C++ forget step (clip + momentum + wd) vs `foreach`, {flat_size}, fp32", f"{ratio:.2f}×",
                        "≥ 1.5×", status(ratio >= 1.5)])
        return out
    for backend, goal in (("fused", 0.9), ("triton", 0.85)):
        if not _find(results, "forget_full", "flat", "fp32", backend):
            absent(backend, f"`{backend}` ≥ {100 * goal:.0f} % of the copy bandwidth ({flat_size}, every op)")
            continue
        for op in ops_:
            r = _find(results, op, "flat", "fp32", backend)
            if r:
                out.append([f"`{backend}` `{op}` bandwidth, {flat_size}, fp32",
                            f"{100 * r['roof_share']:.0f} % of copy", f"≥ {100 * goal:.0f} %",
                            status(r["roof_share"] >= goal)])
    for op in ops_:
        fused, triton = (_find(results, op, "flat", "fp32", c) for c in ("fused", "triton"))
        if fused and triton:
            ratio = triton["median_s"] / fused["median_s"]
            out.append([f"`triton` vs `fused` `{op}`, {flat_size}, fp32", f"{ratio:.2f}× the time", "≤ 1.10×",
                        status(ratio <= 1.10)])
    fused = _find(results, "forget_full", HEADLINE_CASE, "fp32", "fused")
    if fused:
        floor = fused["modelled_bytes"] / (roofs["copy_gbs"] * 1e9)
        out.append([f"`fused` forget step, {HEADLINE_CASE}, fp32, against its byte-model floor ({fmt_time(floor)})",
                    f"{fused['median_s'] / floor:.2f}×", "≤ 1.5×", status(fused["median_s"] <= 1.5 * floor)])
        for name, goal in (("torch", 1.6), ("official", 3.0)):
            if fused.get(f"vs_{name}"):
                out.append([f"`fused` forget step vs `{name}`, {HEADLINE_CASE}, fp32", fmt_ratio(fused[f"vs_{name}"]),
                            f"≥ {goal}×", status(fused[f"vs_{name}"] >= goal)])
    else:
        absent("fused", f"`fused` forget step on {HEADLINE_CASE}: floor, ×torch, ×official")
    return out


def _targets_section(results) -> list[str]:
    rows = targets(results)
    if not rows:
        return []
    return ["", "## Targets of the kernel issues", ""] + _table(["target", "measured", "goal", ""], rows)


def _headline_section(results) -> list[str]:
    heads = headline(results)
    if not heads:
        return []
    lines = ["", f"## Headline: {HEADLINE_CASE} parameters, fp32", ""]
    rows = []
    for h in heads:
        best = h["best"]
        rows.append([f"`{h['op']}`", f"{best['contender']}", fmt_time(best["median_s"]),
                     fmt_time(h["torch"]["median_s"]) if h["torch"] else "—",
                     fmt_time(h["official"]["median_s"]) if h["official"] else "—",
                     fmt_ratio(best.get("vs_torch")), fmt_ratio(best.get("vs_official")),
                     f"{100 * best['roof_share']:.0f}%", fmt_bytes(_peak(best))])
    return lines + _table(["op", "our best", "time", "torch", "official", "×torch", "×official", "% roof", "peak"],
                          rows)


def _e2e_section(results) -> list[str]:
    if not results.get("e2e"):
        return []
    batch = results["e2e"][0]["batch"]
    lines = ["", f"## End to end: one SFR-on iteration (forget + remain step), ResNet-18, batch {batch}", "",
             "Forward and backward included; `fwd_bwd` is the two passes without any optimizer work. *peak* is "
             "the extra memory of one iteration at its peak, activations included (the same for every contender).",
             ""]
    rows = [[r["contender"], fmt_time(r["median_s"]), f"{fmt_time(r['p20_s'])} – {fmt_time(r['p80_s'])}",
             fmt_ratio(r.get("vs_torch")), fmt_ratio(r.get("vs_official")), fmt_bytes(_peak(r)), r["reps"]]
            for r in results["e2e"]]
    return lines + _table(["contender", "time", "p20 – p80", "×torch", "×official", "peak", "reps"], rows)


def _host_bound_section(results) -> list[str]:
    rows = results.get("host_bound")
    if not rows:
        return []
    from .host_bound import table

    lines = ["", "## Host cost of one step (`host_bound`)", "",
             "ResNet-18's 62 parameter shapes with 8 elements each, so that only the host's work counts: median "
             "µs per `step()` over interleaved rounds, fresh gradients before every step "
             "(`python -m benchmarks.host_bound`). The targets are ratios inside this run.", ""]
    return lines + table(rows).split("\n")


def _verification_section(results) -> list[str]:
    if not results.get("verification"):
        return []
    names = [c for c in results["contenders"] if c != "reference"]
    lines = ["", "## Same math", "",
             "Before timing, every contender made one call from the same state on the small ragged case (fp32); "
             "the worst relative difference from the reference backend (bool outputs: mismatching elements), "
             f"checked against {results.get('verification_tolerance')}:", ""]
    rows = [[f"`{op}`"] + [("—" if errs.get(n) is None else f"{errs[n]:.1e}") for n in names]
            for op, errs in results["verification"].items()]
    return lines + _table(["op"] + names, rows)


def _per_op_section(results) -> list[str]:
    lines = ["", "## Per op and case"]
    by_op = defaultdict(lambda: defaultdict(list))
    for r in results["rows"]:
        by_op[r["op"]][r["case"]].append(r)
    for op, per_case in by_op.items():
        info = results["ops"][op]
        compositions = {r["contender"]: r["note"] for rows_ in per_case.values() for r in rows_
                        if r.get("kind") == "baseline" and r.get("note")}
        lines += ["", f"### `{op}`: {info['title']}", "",
                  f"Kernel family `{info['family']}`; byte model {info['bytes_formula']} bytes per parameter "
                  "(P = parameter element size)." + (f" {info['notes'][0].upper()}{info['notes'][1:]}."
                                                     if info["notes"] else "")
                  + "".join(f" `{k}`: {v}." for k, v in compositions.items())]
        for case, rows_ in per_case.items():
            first = rows_[0]
            masks = (f"; the masks our backends read: {fmt_bytes(first['mask_bytes'])}"
                     if first.get("mask_bytes") else "")
            lines += ["", f"**{case}** ({first['tensors']:,} tensors, {first['numel']:,} elements{masks})", ""]
            rows = []
            for r in rows_:
                if "error" in r:
                    rows.append([r["dtype"], r["contender"], "failed: " + r["error"][:80]] + [""] * 9)
                    continue
                rows.append([r["dtype"], r["contender"], fmt_time(r["median_s"]),
                             f"{fmt_time(r['p20_s'])} – {fmt_time(r['p80_s'])}", fmt_time(r["host_median_s"]),
                             f"{r['gbs']:.1f}", f"{r['roof_gbs']:.1f}", f"{100 * r['roof_share']:.0f}%",
                             _bound(r, "%.0f%%") or "—", fmt_bytes(_peak(r)), fmt_ratio(r.get("vs_torch")),
                             fmt_ratio(r.get("vs_official"))])
            lines += _table(["dtype", "contender", "time", "p20 – p80", "host", "GB/s", "roof", "% roof", "% bound",
                             "peak", "×torch", "×official"], rows)
    if results["skipped"]:
        lines += ["", f"{len(results['skipped'])} measurements were skipped at the run's deadline: "
                  + ", ".join(sorted({f"{s['case']}/{s['op']}" for s in results["skipped"]})) + "."]
    mem = next((r["memory"]["method"] for r in results["rows"] if r.get("memory")), None)
    if mem:
        lines += ["", f"Peak memory: {mem}."]
    return lines


def markdown(results, chart_name=None, summary=False) -> str:
    """The report: header, targets, headline and end to end; unless ``summary``, also the checks and every table."""
    lines = _header(results, chart_name) + _targets_section(results) + _headline_section(results)
    lines += _e2e_section(results) + _host_bound_section(results)
    if summary:
        lines += ["", "Every op and case, the baselines' exact compositions and the correctness check: "
                  "see the full report next to this file."]
    else:
        lines += _verification_section(results) + _per_op_section(results)
    return "\n".join(lines) + "\n"


def chart(results, path) -> None:
    """Two panels: per-op time on the headline case, and the end-to-end iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in results["rows"] if r["case"] == HEADLINE_CASE and r["dtype"] == "fp32" and r.get("median_s")]
    if not rows:  # smoke runs have no ResNet case: use the first case measured
        first = next((r["case"] for r in results["rows"] if r.get("median_s")), None)
        rows = [r for r in results["rows"] if r["case"] == first and r["dtype"] == "fp32" and r.get("median_s")]
    case = rows[0]["case"] if rows else HEADLINE_CASE
    ops_ = list(dict.fromkeys(r["op"] for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    palette = plt.get_cmap("tab10")
    color = {name: palette(i) for i, name in enumerate(CHART_ORDER)}
    color["fwd_bwd"] = "tab:gray"
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    height = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        times = {r["op"]: r["median_s"] * 1e3 for r in rows if r["contender"] == name}
        ys = [i + j * height for i in range(len(ops_))]
        ax.barh(ys, [times.get(op, 0) for op in ops_], height=height, label=name, color=color.get(name))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(ops_))], ops_)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel("median time per call (ms, log scale)")
    ax.set_title(f"{case}, fp32, {results['meta']['device_name']}")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    e2e_rows = [r for r in results.get("e2e", []) if r.get("median_s")]
    if e2e_rows:
        ax.bar([r["contender"] for r in e2e_rows], [r["median_s"] * 1e3 for r in e2e_rows],
               yerr=[[(r["median_s"] - r["p20_s"]) * 1e3 for r in e2e_rows],
                     [(r["p80_s"] - r["median_s"]) * 1e3 for r in e2e_rows]], capsize=3,
               color=[color.get(r["contender"], "tab:gray") for r in e2e_rows])
        ax.set_ylabel("ms per iteration")
        ax.set_title(f"one SFR-on iteration, ResNet-18, batch {e2e_rows[0]['batch']}")
        ax.tick_params(axis="x", rotation=30)
    else:
        ax.axis("off")
    meta = results["meta"]
    fig.suptitle(f"sfron_ops on {meta['device']} — {meta['date_utc']}, commit {(meta.get('commit') or '?')[:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results, json_path) -> dict:
    """Write the report, its summary and the chart next to ``json_path`` (``cpu.json`` -> ``cpu.md`` ...)."""
    stem = json_path[: -len(".json")] if json_path.endswith(".json") else json_path
    paths = {"md": f"{stem}.md", "summary": f"{stem}-summary.md", "png": f"{stem}.png"}
    chart_name = os.path.basename(paths["png"])
    with open(paths["md"], "w") as f:
        f.write(markdown(results, chart_name=chart_name))
    with open(paths["summary"], "w") as f:
        f.write(markdown(results, chart_name=chart_name, summary=True))
    chart(results, paths["png"])
    return paths


def main(argv=None):
    """``python -m benchmarks.report RESULTS.json``: render the Markdown, summary and chart again from the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.report RESULTS.json")
    with open(argv[0]) as f:
        results = json.load(f)
    print("wrote " + ", ".join(write(results, argv[0]).values()))


if __name__ == "__main__":
    main()
