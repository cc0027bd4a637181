"""Benchmarks: each subcommand of ``python -m benchmarks`` is a module here with ``main(argv) -> dict``.

Shared CPUs are noisy (+-10 % between runs), so every bench times its variants *interleaved* in one
process: round after round, each variant runs once per round (in a rotating order), after warm-up
rounds that are not counted. Results are medians over the rounds with their spread, and ratios to a
baseline variant measured in the same rounds; absolute times only describe the machine they ran on.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock reads the work's end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_HELP = (
    "wall: elapsed time. cpu: this process's CPU time, for a CPU shared with other jobs: with one "
    "intra-op thread (--threads 1) it counts the work a variant does and not the time other jobs take "
    "the core away, which on a loaded machine swings wall-clock medians by 2x"
)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds per call of each function over ``repeats`` rounds, after ``warmup`` uncounted rounds.

    Round ``i`` starts at variant ``i mod len(fns)``, so no variant always runs first after a round's
    bookkeeping (caches, allocator and clock states carry from one call into the next). The order
    within a round is kept, so each variant follows the same neighbour in all but one round of
    ``len(fns)``.
    """
    if clock == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu measures host CPU time; use wall on a GPU")
    now = CLOCKS[clock]
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = now()
            fns[name]()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(now() - start)
    return times


def add_clock_args(parser) -> None:
    """``--clock`` and ``--threads``, shared by the benches that time one process."""
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help=CLOCK_HELP)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(times: dict[str, list[float]], baseline: str) -> dict:
    """Medians, spread and ratios to ``baseline`` from :func:`interleaved`'s rounds.

    ``ratios[v]`` is median(v) / median(baseline), the number the issue's goals are stated in.
    ``paired_ratio_iqr[v]`` is the 25th-75th percentile of v / baseline *within each round*, which
    drift between rounds does not widen: where two variants' intervals overlap, their difference is
    noise; ``paired_ratio_median`` is its median. ``spread_iqr_s`` is each variant's own 25th-75th
    percentile time, and ``times_s`` keeps every round's time for anyone who wants another statistic.
    """
    base = times[baseline]
    medians = {name: statistics.median(values) for name, values in times.items()}
    paired = {name: [v / b for v, b in zip(values, base)] for name, values in times.items()}
    return {
        "ratios": {name: round(medians[name] / medians[baseline], 4) for name in times},
        "medians_s": {name: round(m, 6) for name, m in medians.items()},
        "spread_iqr_s": {name: [round(_quantile(v, 0.25), 6), round(_quantile(v, 0.75), 6)] for name, v in times.items()},
        "paired_ratio_iqr": {
            name: [round(_quantile(p, 0.25), 4), round(_quantile(p, 0.75), 4)] for name, p in paired.items()
        },
        "paired_ratio_median": {name: round(statistics.median(p), 4) for name, p in paired.items()},
        "rounds": len(base),
        "times_s": {name: [round(v, 6) for v in values] for name, values in times.items()},
    }


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def print_table(result: dict, baseline: str) -> None:
    """One line per variant: median, its IQR, ratio to the baseline, the paired ratios' median and IQR."""
    print(f"{'variant':<12} {'median':>10} {'iqr':>21} {'/' + baseline:>8} {'paired median [iqr]':>23}")
    for name, median in result["medians_s"].items():
        lo, hi = result["spread_iqr_s"][name]
        plo, phi = result["paired_ratio_iqr"][name]
        print(f"{name:<12} {median * 1e3:>8.2f}ms [{lo * 1e3:>8.2f}, {hi * 1e3:>8.2f}] "
              f"{result['ratios'][name]:>8.3f} {result['paired_ratio_median'][name]:>7.3f} [{plo:.3f}, {phi:.3f}]")


def write_profile(path: str, fns: dict, device: torch.device, medians: dict) -> None:
    """One profiled step per variant: the busiest ops by device and by host time, and how much of the
    step the device spent in kernels (device-busy fraction; low means the host is the limit)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with open(path, "w") as f:
        for name, fn in fns.items():
            with profile(activities=activities) as prof:
                fn()
                synchronize(device)
            events = prof.key_averages()
            busy_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)  # kernels only
            f.write(f"===== {name}: step median {medians[name] * 1e3:.1f} ms, device busy {busy_us / 1e3:.1f} ms "
                    f"({busy_us / 1e4 / medians[name]:.1f} %)\n")
            if device.type == "cuda":
                f.write(events.table(sort_by="self_device_time_total", row_limit=25) + "\n")
            f.write(events.table(sort_by="self_cpu_time_total", row_limit=25) + "\n")
