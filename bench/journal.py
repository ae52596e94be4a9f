"""The job journal's cost: its size per record, a job's overhead with it, and a resume's time.

One local pool (`--workers` CPU slots) runs `--tasks` noop tasks, each with its own argument
(so each is its own record: noop is pure, keyed by content), three ways, one after another:

* without a journal (the baseline's wall time);
* with a journal (`Journal` + `JournalStore`, the API `batuta run --journal` uses), timed up
  to `close()`, which waits until every record is synced: `overhead_fraction` is that time
  over the baseline's, minus 1;
* resumed from that journal: `resume_open_s` is `Journal.open(..., resume=True)` (reading
  the file back), `resume_job_s` the same job submitted again, every task restored;
  `resume_s` is both, `resume_cpu_s` the CPU time this process spent on them (steadier than
  wall time on a shared machine: the resume runs nothing on the hosts).

`--kernel spin` journals tasks keyed by their place (`spin` is not pure) instead; `--labels`
gives each task its own label (`label=f"item-{i}"`: a string the journal has not seen, each
task); `--repeat`
runs the with/without pair that many times, alternated, and reports the medians (the
machine may be shared). With `--profile FILE`, the resume's open and job run under
cProfile, written to FILE.

The last line printed is one JSON object: `tasks`, `bytes_per_record`, `journal_bytes`,
`resume_s`, `resume_open_s`, `resume_job_s`, `resume_cpu_s`, `overhead_fraction`, `plain_tasks_per_s`,
`journaled_tasks_per_s`.

    python bench/journal.py [--tasks 100000] [--workers 2] [--labels] [--repeat 1] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from batuta import Pool, Task
from batuta.observers.journal import JOURNAL_FILE, Journal, JournalStore


def tasks_of(kernel: str, n: int, labels: bool = False) -> list[Task]:
    if labels:
        return [Task.kernel(kernel, 0.0 if kernel == "spin" else i, label=f"item-{i}") for i in range(n)]
    if kernel == "spin":
        return [Task.kernel("spin", 0.0)] * n  # equal tasks, each its own place
    return [Task.kernel("noop", i) for i in range(n)]


async def run_job(pool: Pool, tasks: list[Task]) -> float:
    start = time.perf_counter()
    with pool.job("bench"):
        futures = [await pool.submit(task) for task in tasks]  # as a job does: backpressure, the loop runs
    for future in futures:
        await future
    return time.perf_counter() - start


async def journaled_job(pool: Pool, folder: Path, tasks: list[Task]) -> float:
    start = time.perf_counter()
    journal = await Journal.open(folder, job="bench", resume=False)
    pool.set_result_store(JournalStore(journal, resume=False))
    try:
        await run_job(pool, tasks)
    finally:
        pool.set_result_store(None)
        await journal.close(finished=True)
    return time.perf_counter() - start


async def resumed_job(
    pool: Pool, folder: Path, tasks: list[Task], profile: str | None
) -> tuple[float, float, float, int]:
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    cpu = time.process_time()
    start = time.perf_counter()
    journal = await Journal.open(folder, job="bench", resume=True)
    opened = time.perf_counter() - start
    pool.set_result_store(JournalStore(journal, resume=True))
    before = pool.stats().restored
    try:
        job = await run_job(pool, tasks)
    finally:
        pool.set_result_store(None)
        await journal.close(finished=True)
    cpu = time.process_time() - cpu
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    return opened, job, cpu, pool.stats().restored - before


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tasks = tasks_of(args.kernel, args.tasks, args.labels)
    plain: list[float] = []
    journaled: list[float] = []
    with tempfile.TemporaryDirectory(prefix="batuta-bench-journal-") as tmp:
        folder = Path(tmp) / "journal"
        async with Pool.local(args.workers, gpu_workers="none") as pool:
            await run_job(pool, tasks[: min(2000, len(tasks))])  # warm: imports, slots
            for _ in range(args.repeat):
                plain.append(await run_job(pool, tasks))
                journaled.append(await journaled_job(pool, folder, tasks))
            size = (folder / JOURNAL_FILE).stat().st_size
            opened, job, cpu, restored = await resumed_job(pool, folder, tasks, args.profile)
    if restored != len(tasks):
        raise SystemExit(f"resume restored {restored} of {len(tasks)} tasks")
    base, with_journal = statistics.median(plain), statistics.median(journaled)
    return {
        "tasks": args.tasks,
        "kernel": args.kernel,
        "labels": args.labels,
        "workers": args.workers,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "journal_bytes": size,
        "bytes_per_record": round(size / args.tasks, 1),
        "plain_tasks_per_s": round(args.tasks / base),
        "journaled_tasks_per_s": round(args.tasks / with_journal),
        "overhead_fraction": round(with_journal / base - 1, 3),
        "resume_open_s": round(opened, 3),
        "resume_job_s": round(job, 3),
        "resume_s": round(opened + job, 3),
        "resume_cpu_s": round(cpu, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kernel", choices=("noop", "spin"), default="noop")
    parser.add_argument("--labels", action="store_true", help="each task its own label (a new string each)")
    parser.add_argument("--repeat", type=int, default=1, help="with/without pairs, alternated; medians reported")
    parser.add_argument("--profile", default=None, help="write the resume's cProfile stats here")
    args = parser.parse_args()
    summary = asyncio.run(main_async(args))
    print(
        f"{summary['tasks']:,} {args.kernel} tasks: {summary['bytes_per_record']} bytes/record, "
        f"{summary['plain_tasks_per_s']:,} tasks/s plain, {summary['journaled_tasks_per_s']:,} journaled "
        f"(overhead {summary['overhead_fraction']:+.1%}), resume {summary['resume_s']} s "
        f"(open {summary['resume_open_s']} s)",
        flush=True,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
