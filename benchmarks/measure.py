"""Timing, peak memory, bandwidth roofs and the environment record.

Timing. On CUDA every repetition is bracketed by CUDA events after a cache
flush (256 MiB zeroed, as ``triton.testing.do_bench`` does); the host time is
the wall time of submitting the call. On CPU a call is synchronous: its wall
time is both numbers, and the flush zeroes twice the last-level cache (at most
512 MiB) so that data comes from DRAM as it would in training. The number of
repetitions fits a time budget, bounded below and above; the median and the
20th/80th percentiles are reported.

Peak memory. The extra memory one call allocates at its peak, over what was
allocated before it. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the
allocation and free events that torch's CPU allocator reports to the profiler
(``profile_memory=True``), summed in order; this sees every tensor torch
allocates (also inside compiled kernels), but not memory held by Python
objects or by libraries outside torch.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from datetime import datetime, timezone

import numpy as np
import torch

GPU_FLUSH_BYTES = 256 << 20
SLOW_BUDGET_FACTOR = 5
SLOW_MIN_REPS = 3
CPU_FLUSH_MAX_BYTES = 512 << 20


def _llc_bytes() -> int:
    """The last-level cache size from sysfs (64 MiB if unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or (64 << 20)


class Timer:
    """Times a zero-argument callable on ``device``; see the module docstring."""

    def __init__(self, device, *, budget_s=0.5, min_reps=5, max_reps=100, warmup=2, flush=True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.budget_s, self.min_reps, self.max_reps, self.warmup = budget_s, min_reps, max_reps, warmup
        self._flush_buffer = None
        if flush:
            size = GPU_FLUSH_BYTES if self.cuda else min(2 * _llc_bytes(), CPU_FLUSH_MAX_BYTES)
            self._flush_buffer = torch.empty(size, dtype=torch.int8, device=self.device)

    def flush(self):
        if self._flush_buffer is not None:
            self._flush_buffer.zero_()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> dict:
        per_call = None
        for _ in range(max(self.warmup, 1)):
            start = time.perf_counter()
            fn()
            self._sync()
            per_call = time.perf_counter() - start
            if per_call > self.budget_s:  # a slow call: one warm-up is enough
                break
        reps = min(self.max_reps, max(self.min_reps, math.ceil(self.budget_s / max(per_call, 1e-7))))
        if per_call * reps > SLOW_BUDGET_FACTOR * self.budget_s:
            # slow calls get fewer repetitions (at least SLOW_MIN_REPS), so that they cannot eat a run's time
            floor = min(self.min_reps, SLOW_MIN_REPS)
            reps = min(reps, max(floor, math.ceil(SLOW_BUDGET_FACTOR * self.budget_s / per_call)))
        host, device = [], []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for begin, end in events:
                self.flush()
                begin.record()
                t0 = time.perf_counter()
                fn()
                host.append(time.perf_counter() - t0)
                end.record()
            self._sync()
            device = [begin.elapsed_time(end) / 1e3 for begin, end in events]
        else:
            for _ in range(reps):
                self.flush()
                t0 = time.perf_counter()
                fn()
                host.append(time.perf_counter() - t0)
            device = host
        p20, p50, p80 = np.percentile(device, [20, 50, 80])
        return {"median_s": float(p50), "p20_s": float(p20), "p80_s": float(p80),
                "host_median_s": float(np.median(host)), "reps": reps}


# ------------------------------------------------------------------ memory


def _profiled_peaks(fn) -> dict:
    """``{device type: peak of the running sum of allocations}`` over one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        fields = node.extra_fields
        if isinstance(fields, torch._C._profiler._ExtraFields_Allocation):
            events.append((node.start_time_ns, fields.alloc_size, fields.device.type))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    running, peaks = {}, {}
    for _, size, kind in sorted(events, key=lambda e: e[0]):
        running[kind] = running.get(kind, 0) + size
        peaks[kind] = max(peaks.get(kind, 0), running[kind])
    return peaks


def peak_extra_bytes(fn, device) -> dict:
    """Extra bytes one call of ``fn`` allocates at its peak: on the device and, separately, on the host."""
    device = torch.device(device)
    out = {"device_bytes": None, "host_bytes": None, "method": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            peaks = _profiled_peaks(fn)
            out["host_bytes"] = peaks.get("cpu", 0)
        except Exception as exc:  # the profiler's event tree is a private API; keep the CUDA number
            fn()
            out["host_error"] = f"{type(exc).__name__}: {exc}"
        torch.cuda.synchronize(device)
        out["device_bytes"] = torch.cuda.max_memory_allocated(device) - base
        out["method"] = "torch.cuda.max_memory_allocated (device); profiler allocation events (host)"
    else:
        peaks = _profiled_peaks(fn)
        out["device_bytes"] = out["host_bytes"] = peaks.get("cpu", 0)
        out["method"] = "torch profiler allocation events of the CPU allocator (running sum, peak)"
    return out


# ------------------------------------------------------------------ roofs


_ROOF_ARRAYS: dict = {}


def _roof_arrays(device, mode, quick):
    device = torch.device(device)
    log2 = 28 if device.type == "cuda" else {"full": 26, "quick": 26, "smoke": 22}[mode]
    n = 1 << log2
    # made once per device and size: the roofs are taken around every row, and filling 2^26 random
    # values costs more than measuring them
    if (device, n) not in _ROOF_ARRAYS:
        _ROOF_ARRAYS[device, n] = (torch.randn(n, device=device), torch.randn(n, device=device))
    if quick:  # arrays this large leave nothing useful in the caches: no flush needed
        timer = Timer(device, budget_s=0.25 if mode != "smoke" else 0.03, min_reps=3 if mode != "smoke" else 2,
                      max_reps=20, warmup=1, flush=False)
    else:
        timer = Timer(device, budget_s=1.0 if mode != "smoke" else 0.1, min_reps=5 if mode != "smoke" else 2,
                      max_reps=50, warmup=2, flush=mode != "smoke")
    return (*_ROOF_ARRAYS[device, n], timer)


def bandwidth_roofs(device, mode="full", *, quick=False) -> dict:
    """Streaming bandwidth measured in this process, in GB/s.

    ``inplace``: ``a += s * b * b`` (``addcmul_``) over two arrays larger than the
    caches, 12 bytes per element, the shape of our update kernels. ``copy``:
    ``a.copy_(b)``, 8 bytes per element. ``read``: ``a.sum()``, 4 bytes per element,
    the read-only stream of a norm. The reference roof (``roof_gbs``) is ``copy`` on
    CUDA and ``inplace`` on CPU. The benchmark measures these again (``quick``: a
    quarter second each) right before and right after every measurement, so that a
    drift of the machine's bandwidth during a long run (other work on a shared host,
    frequency changes) moves the roofs and the kernels together.
    """
    a, b, timer = _roof_arrays(device, mode, quick)
    n = a.numel()
    inplace = timer(lambda: a.addcmul_(b, b, value=1e-6))
    copy = timer(lambda: a.copy_(b))
    read = timer(lambda: a.sum())
    cuda = a.device.type == "cuda"
    result = {
        "elements": n,
        "inplace_gbs": 12 * n / inplace["median_s"] / 1e9,
        "copy_gbs": 8 * n / copy["median_s"] / 1e9,
        "read_gbs": 4 * n / read["median_s"] / 1e9,
        "threads": torch.get_num_threads(),
    }
    result["roof"] = "copy" if cuda else "inplace"
    result["roof_gbs"] = result["copy_gbs"] if cuda else result["inplace_gbs"]
    return result


def around(before: dict, after: dict) -> dict:
    """The roofs of one measurement: the mean of those taken right before and right after it, and
    how far they moved in between (``roof_drift``, relative)."""
    out = {k: (before[k] + after[k]) / 2 for k in before if k.endswith("_gbs")}
    out["roof_drift"] = abs(after["roof_gbs"] - before["roof_gbs"]) / out["roof_gbs"]
    return out


def stream_bound_s(modelled_bytes: float, read_bytes: float, copy_bytes: float, roofs: dict) -> float:
    """The time an op's modelled bytes take at the measured streams of their access pattern: bytes
    of passes that only read at the read-only rate, bytes of copy-like passes (read one array, write
    another) at the copy rate, the rest (read-modify-write) at the reference roof. A CPU core streams
    reads alone, or a copy, well below its in-place rate, so this is the physical limit of each op."""
    return (read_bytes / roofs["read_gbs"] + copy_bytes / roofs["copy_gbs"]
            + (modelled_bytes - read_bytes - copy_bytes) / roofs["roof_gbs"]) / 1e9


# ------------------------------------------------------------------ environment


def _git(*args) -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    device = torch.device(device)
    env = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # SFRON_OPS_COMMIT names the commit where the tree is a copy without .git
        "commit": _git("rev-parse", "HEAD") or os.environ.get("SFRON_OPS_COMMIT"),
        "commit_dirty": bool(_git("status", "--porcelain", "--", "sfron_ops", "csrc", "benchmarks", "setup.py")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "numpy": np.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_start": os.getloadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   device_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   sm_count=props.multi_processor_count)
    else:
        env["device_name"] = env["cpu"]
    return env
