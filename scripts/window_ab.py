"""`min_window` side by side: batuta's local pool with each window given, alternated with the
shared queue (ProcessPoolExecutor) on `bench/imbalance.py`'s workloads and durations.

    python scripts/window_ab.py [--workers 2] [--tasks 300] [--repeat 7] [--work wall|cpu] [--windows 2,3,4]

Prints each workload's medians and rounds (makespan over the lower bound); the last line is one
JSON object. An experiment's harness (bench/RESULTS.md, session 17), not a benchmark of record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import imbalance as imb  # importable by name: the shared queue's workers unpickle its functions


async def batuta_makespan(durations: list[float], workers: int, work: str, min_window: int) -> float:
    from batuta import Pool, Task

    kernel = imb.KERNEL[work]
    pool = Pool.builder().cpu_workers(workers).gpu_workers("none").window(min_window=min_window).build()
    async with pool:
        await pool.map(kernel, [0.001] * (4 * workers))  # warm the slots, as imbalance.py does
        start = time.perf_counter()
        futures = [await pool.submit(Task.kernel(kernel, d)) for d in durations]
        for future in futures:
            result = await future
            assert result.is_success(), result.error
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--work", choices=sorted(imb.KERNEL), default="wall")
    parser.add_argument("--windows", default="2,3,4", help="the min_window values to run, comma-separated")
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    workloads = {
        "lognormal": imb.lognormal_durations(args.tasks, 0.004, 1.0, 0),
        "growing": imb.growing_durations(args.tasks, 0.004, 0),
    }
    out: dict[str, dict[str, object]] = {}
    for name, durations in workloads.items():
        bound = imb.lower_bound(durations, args.workers)
        runs: dict[str, list[float]] = {f"min_window_{w}": [] for w in windows} | {"shared_queue": []}
        for _ in range(args.repeat):
            for w in windows:
                elapsed = asyncio.run(batuta_makespan(durations, args.workers, args.work, w))
                runs[f"min_window_{w}"].append(round(elapsed / bound, 3))
            shared = imb.shared_queue_makespan(durations, args.workers, args.work)
            runs["shared_queue"].append(round(shared / bound, 3))
        out[name] = {key: {"median": statistics.median(v), "runs": v} for key, v in runs.items()}
        print(name, out[name], flush=True)
    print(json.dumps({"workers": args.workers, "tasks": args.tasks, "work": args.work, **out}))


if __name__ == "__main__":
    main()
