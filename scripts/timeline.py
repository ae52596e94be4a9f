"""Where a makespan goes: batuta's local pool and a shared queue, timed from inside each task.

`bench/imbalance.py` gives one number per run. This runs its workloads (same seeded
durations) with a kernel that returns when it started and ended and in which process (the
monotonic clock is shared by every process of the machine), through `Pool.local` and
ProcessPoolExecutor, and splits each makespan over its lower bound into: the wait before the
first task, the time workers stood still between two tasks (by phase: the first quarter of
the tasks by index, then the rest; and again by the task before the gap, shorter than
`--short-ms` or not: after a short one the next task may not have arrived yet), the idle
workers at the end, and the overrun: the tasks' own time beyond their durations. With `--work
cpu` the tasks burn CPU time (as `imbalance.py --work cpu`), so CPU that other processes take
from a worker mid-task shows there, where with `wall` (the default) it costs nothing.

    python scripts/timeline.py [--workload growing|lognormal] [--workers 16] [--tasks 2400] [--repeat 3]
                               [--work wall|cpu] [--short-ms 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timeline_kernels import burn_t, spin_t  # noqa: E402  (the peers run the same functions)

Span = tuple[int, float, float, int]  # (task index, start, end, pid)


def _imbalance() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_imbalance", HERE.parent / "bench" / "imbalance.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KERNELS = {"wall": spin_t, "cpu": burn_t}  # bench/imbalance.py's --work: wait on the clock, or burn CPU time


async def batuta_spans(durations: list[float], workers: int, work: str) -> tuple[float, list[Span]]:
    from batuta import Pool, Task

    pool = Pool.builder().cpu_workers(workers).gpu_workers("none").modules([HERE / "_timeline_kernels.py"]).build()
    async with pool:
        name = KERNELS[work].__name__
        await pool.map(name, [(0.001,)] * (4 * workers))
        start = time.perf_counter()
        futures = [await pool.submit(Task.kernel(name, d)) for d in durations]
        values = [(await fut).unwrap() for fut in futures]
    return start, [(i, float(a), float(b), int(p)) for i, (a, b, p) in enumerate(values)]


def shared_spans(durations: list[float], workers: int, work: str) -> tuple[float, list[Span]]:
    with concurrent.futures.ProcessPoolExecutor(workers) as ex:
        list(ex.map(KERNELS[work], [0.001] * (4 * workers)))
        start = time.perf_counter()
        values = list(ex.map(KERNELS[work], durations))
    return start, [(i, a, b, p) for i, (a, b, p) in enumerate(values)]


def breakdown(
    start: float, spans: list[Span], durations: list[float], bound: float, short_s: float = 0.0015
) -> dict[str, float]:
    """Each part as a fraction of the lower bound, summed over workers and divided by their
    count, so that with the bound at total work / workers they add up to makespan / bound - 1:
    waits before the first task, gaps between tasks, idle workers at the end, and `overrun`,
    the tasks' own time beyond their durations (a worker preempted in the middle of one)."""
    by_worker: dict[int, list[Span]] = {}
    for span in spans:
        by_worker.setdefault(span[3], []).append(span)
    end = max(s[2] for s in spans)
    quarter = len(spans) // 4
    first_wait = early_gaps = late_gaps = end_idle = after_short = 0.0
    gaps: list[float] = []
    for worker_spans in by_worker.values():
        worker_spans.sort(key=lambda s: s[1])
        first_wait += worker_spans[0][1] - start
        for before, after in itertools.pairwise(worker_spans):
            gap = after[1] - before[2]
            gaps.append(gap)
            if after[0] < quarter:
                early_gaps += gap
            else:
                late_gaps += gap
            if before[2] - before[1] < short_s:
                after_short += gap
        end_idle += end - worker_spans[-1][2]
    n = len(by_worker)
    overrun = sum(s[2] - s[1] for s in spans) - sum(durations)
    return {
        "makespan_over_bound": round((end - start) / bound, 4),
        "first_wait": round(first_wait / n / bound, 4),
        "gaps_first_quarter": round(early_gaps / n / bound, 4),
        "gaps_rest": round(late_gaps / n / bound, 4),
        "gaps_after_short": round(after_short / n / bound, 4),
        "gaps_after_long": round((early_gaps + late_gaps - after_short) / n / bound, 4),
        "idle_at_end": round(end_idle / n / bound, 4),
        "overrun": round(overrun / n / bound, 4),
        "gap_p50_us": round(statistics.median(gaps) * 1e6, 1),
        "gap_p90_us": round(statistics.quantiles(gaps, n=10)[-1] * 1e6, 1),
        "workers_seen": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("growing", "lognormal"), default="growing")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=2400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--short-ms", type=float, default=1.5, help="a task shorter than this is short")
    args = parser.parse_args()
    imbalance = _imbalance()
    if args.workload == "growing":
        durations = imbalance.growing_durations(args.tasks, 0.004, 0)
    else:
        durations = imbalance.lognormal_durations(args.tasks, 0.004, 1.0, 0)
    bound = imbalance.lower_bound(durations, args.workers)
    short = args.short_ms / 1000
    rows: dict[str, list[dict[str, float]]] = {"batuta": [], "shared_queue": []}
    n, work = args.workers, args.work
    for _ in range(args.repeat):
        rows["batuta"].append(breakdown(*asyncio.run(batuta_spans(durations, n, work)), durations, bound, short))
        rows["shared_queue"].append(breakdown(*shared_spans(durations, n, work), durations, bound, short))
    for name, runs in rows.items():
        for run in runs:
            print(name, json.dumps(run))
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rows.items()}
    print(json.dumps({"workload": args.workload, "work": work, "workers": n, "tasks": args.tasks, **medians}))


if __name__ == "__main__":
    main()
