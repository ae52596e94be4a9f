"""Trivial-task throughput: batuta vs ProcessPoolExecutor vs Dask LocalCluster, one run.

Each system gets 2 worker processes and the same number of trivial tasks (return the
argument), submitted one by one and then gathered; start-up and a warm-up round are not
timed. The last line printed is one JSON object:

    batuta_tasks_per_s, ppe_tasks_per_s, dask_tasks_per_s, ratio_vs_ppe, ratio_vs_dask

Targets (issue 2): ratio_vs_ppe >= 2 and ratio_vs_dask >= 20.

    python bench/throughput.py [--tasks 20000] [--workers 2] [--skip-dask]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import platform
import time

from _peers import check_dask


def noop(x: int) -> int:
    return x


async def batuta_rate(tasks: int, workers: int) -> float:
    from batuta import Pool, Task

    async with Pool.local(workers, gpu_workers="none") as pool:
        warm = [await pool.submit(Task.kernel("noop", i)) for i in range(2000)]
        for fut in warm:
            await fut
        start = time.perf_counter()
        futures = [await pool.submit(Task.kernel("noop", i)) for i in range(tasks)]
        results = [await fut for fut in futures]
        elapsed = time.perf_counter() - start
        assert all(r.is_success() for r in results)
        assert [r.value for r in results] == list(range(tasks))
    return tasks / elapsed


def ppe_rate(tasks: int, workers: int) -> float:
    with concurrent.futures.ProcessPoolExecutor(workers) as ex:
        list(ex.map(noop, range(2000)))
        start = time.perf_counter()
        futures = [ex.submit(noop, i) for i in range(tasks)]
        values = [f.result() for f in futures]
        elapsed = time.perf_counter() - start
    assert values == list(range(tasks))
    return tasks / elapsed


def dask_rate(tasks: int, workers: int) -> float:
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.gather([client.submit(noop, i, pure=False) for i in range(500)])
        start = time.perf_counter()
        futures = [client.submit(noop, i, pure=False) for i in range(tasks)]
        values = client.gather(futures)
        elapsed = time.perf_counter() - start
    assert values == list(range(tasks))
    return tasks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    check_dask(parser, args.skip_dask)

    batuta = asyncio.run(batuta_rate(args.tasks, args.workers))
    print(f"batuta: {batuta:,.0f} tasks/s", flush=True)
    ppe = ppe_rate(args.tasks, args.workers)
    print(f"ProcessPoolExecutor: {ppe:,.0f} tasks/s", flush=True)
    dask = None if args.skip_dask else dask_rate(args.tasks, args.workers)
    if dask is not None:
        print(f"Dask LocalCluster: {dask:,.0f} tasks/s", flush=True)
    summary = {
        "tasks": args.tasks,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "batuta_tasks_per_s": round(batuta, 1),
        "ppe_tasks_per_s": round(ppe, 1),
        "dask_tasks_per_s": round(dask, 1) if dask is not None else None,
        "ratio_vs_ppe": round(batuta / ppe, 3),
        "ratio_vs_dask": round(batuta / dask, 3) if dask is not None else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
