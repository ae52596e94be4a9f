"""Shipping arrays: batuta vs ProcessPoolExecutor vs Dask LocalCluster, one run.

Each system gets `--workers` worker processes and `--tasks` tasks that each receive one
float64 array of `--mb` megabytes and return its sum (the work is small next to moving the
data, so this measures the data path: encoding, pipes or sockets, decoding). Start-up and a
warm-up round are not timed; every sum is checked. Dask is given the array as an argument
per task, as `client.submit(f, x)` does (no scatter: batuta and the executor do not cache
either). Then the reuse case: every task sums the *same* array, shipped with each task,
or put once (`pool.put`, Dask's `scatter(broadcast=True)`); its MB/s is effective (array
bytes x tasks / time). The last line printed is one JSON object with MB/s for each and the
ratios.

    python bench/data_path.py [--tasks 64] [--mb 16] [--workers 2] [--skip-dask]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _peers import check_dask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def array_sum(x: np.ndarray) -> float:
    return float(x.sum())


def make_arrays(tasks: int, megabytes: float) -> list[np.ndarray]:
    length = int(megabytes * 1e6 / 8)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(length)
    return [base + i for i in range(tasks)]  # distinct arrays, so no system can reuse one


def check(values: list[float], arrays: list[np.ndarray]) -> None:
    expected = [float(a.sum()) for a in arrays]
    assert np.allclose(values, expected, rtol=1e-9), "a sum came back wrong"


async def batuta_rate(arrays: list[np.ndarray], workers: int) -> float:
    from batuta import Backend, Pool

    async with Pool.local(workers, gpu_workers="none") as pool:
        await pool.map("sum", [(a,) for a in arrays[: workers * 2]], backend=Backend.CPU)
        start = time.perf_counter()
        values = await pool.map("sum", [(a,) for a in arrays], backend=Backend.CPU)
        elapsed = time.perf_counter() - start
    check(values, arrays)
    return sum(a.nbytes for a in arrays) / elapsed / 1e6


def ppe_rate(arrays: list[np.ndarray], workers: int) -> float:
    with concurrent.futures.ProcessPoolExecutor(workers) as ex:
        list(ex.map(array_sum, arrays[: workers * 2]))
        start = time.perf_counter()
        values = list(ex.map(array_sum, arrays))
        elapsed = time.perf_counter() - start
    check(values, arrays)
    return sum(a.nbytes for a in arrays) / elapsed / 1e6


def dask_rate(arrays: list[np.ndarray], workers: int) -> float:
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.gather([client.submit(array_sum, a, pure=False) for a in arrays[: workers * 2]])
        start = time.perf_counter()
        values = client.gather([client.submit(array_sum, a, pure=False) for a in arrays])
        elapsed = time.perf_counter() - start
    check(values, arrays)
    return sum(a.nbytes for a in arrays) / elapsed / 1e6


async def batuta_reuse_rate(array: np.ndarray, tasks: int, workers: int, put: bool) -> float:
    """Every task sums the same array: shipped with each task, or `pool.put` once."""
    from batuta import Backend, Pool, Task

    expected = float(array.sum())
    async with Pool.local(workers, gpu_workers="none") as pool:
        # every slot compiles the kernel before the clock starts (numba JIT), as in batuta_rate
        await pool.map("sum", [(np.ones(8),) for _ in range(workers * 4)], backend=Backend.CPU)
        start = time.perf_counter()
        arg = pool.put(array) if put else array
        results = await asyncio.gather(*(pool.run(Task.kernel("sum", arg, backend=Backend.CPU)) for _ in range(tasks)))
        elapsed = time.perf_counter() - start
    assert all(r.is_success() and abs(r.value - expected) <= 1e-9 * abs(expected) for r in results)
    return tasks * array.nbytes / elapsed / 1e6


def dask_reuse_rate(array: np.ndarray, tasks: int, workers: int) -> float:
    """Dask's way to reuse one array: `scatter(broadcast=True)` once, then name the future."""
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    expected = float(array.sum())
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.gather([client.submit(array_sum, np.ones(4), pure=False) for _ in range(workers * 4)])
        start = time.perf_counter()
        scattered = client.scatter(array, broadcast=True)
        values = client.gather([client.submit(array_sum, scattered, pure=False) for _ in range(tasks)])
        elapsed = time.perf_counter() - start
    assert all(abs(v - expected) <= 1e-9 * abs(expected) for v in values)
    return tasks * array.nbytes / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--mb", type=float, default=16.0, help="megabytes per task's array")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    check_dask(parser, args.skip_dask)
    arrays = make_arrays(args.tasks, args.mb)

    rates = {"batuta": asyncio.run(batuta_rate(arrays, args.workers))}
    print(f"batuta: {rates['batuta']:,.0f} MB/s", file=sys.stderr, flush=True)
    rates["ppe"] = ppe_rate(arrays, args.workers)
    print(f"ProcessPoolExecutor: {rates['ppe']:,.0f} MB/s", file=sys.stderr, flush=True)
    if not args.skip_dask:
        rates["dask"] = dask_rate(arrays, args.workers)
        print(f"Dask LocalCluster: {rates['dask']:,.0f} MB/s", file=sys.stderr, flush=True)
    # one array, every task: the effective MB/s (array bytes x tasks / time)
    reused = arrays[0]
    reuse = {
        "batuta_ship_each": asyncio.run(batuta_reuse_rate(reused, args.tasks, args.workers, put=False)),
        "batuta_put": asyncio.run(batuta_reuse_rate(reused, args.tasks, args.workers, put=True)),
    }
    if not args.skip_dask:
        reuse["dask_scatter"] = dask_reuse_rate(reused, args.tasks, args.workers)
    for name, rate in reuse.items():
        print(f"reuse, {name}: {rate:,.0f} MB/s effective", file=sys.stderr, flush=True)
    summary = {
        "tasks": args.tasks,
        "mb_per_task": args.mb,
        "workers": args.workers,
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        **{f"{name}_mb_per_s": round(rate, 1) for name, rate in rates.items()},
        "ratio_vs_ppe": round(rates["batuta"] / rates["ppe"], 3),
        "ratio_vs_dask": round(rates["batuta"] / rates["dask"], 3) if "dask" in rates else None,
        **{f"reuse_{name}_mb_per_s": round(rate, 1) for name, rate in reuse.items()},
        "reuse_put_vs_ship_each": round(reuse["batuta_put"] / reuse["batuta_ship_each"], 2),
        "reuse_put_vs_dask_scatter": (
            round(reuse["batuta_put"] / reuse["dask_scatter"], 2) if "dask_scatter" in reuse else None
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
