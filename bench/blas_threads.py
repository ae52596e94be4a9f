"""BLAS oversubscription: matrix products on every core, with and without per-slot budgets.

A slot per core, each running NumPy matmul (OpenBLAS/MKL). Without a budget, every slot's
BLAS starts a thread per core: 16 slots on 16 cores run 256 threads. batuta gives each CPU
slot `cores // slots` BLAS and numba threads (batuta/agent/threads.py). Three runs of the
same seeded tasks, in one process, side by side:

- `batuta`: a local pool with the default budgets;
- `batuta_unbudgeted`: the same pool with `OPENBLAS_NUM_THREADS` etc. set to the core count
  (what slots did before budgets: a user-set value is kept);
- `process_pool`: `concurrent.futures.ProcessPoolExecutor` with a worker per core and
  NumPy's default threads, the obvious peer.

    python bench/blas_threads.py [--slots N] [--tasks 64] [--n 512] [--reps 4]

The last line is one JSON object with tasks/s for each and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # run from a checkout
sys.path.insert(0, str(BENCH))

from batuta import Backend  # noqa: E402
from batuta.agent.threads import BLAS_THREADS_ENV  # noqa: E402
from batuta.runtime.pool import Pool, PoolConfig, local_host  # noqa: E402

BUDGET_ENV = ("NUMBA_NUM_THREADS", *BLAS_THREADS_ENV)


def _gemm(args: tuple[int, int, int]) -> float:
    from _blas_kernels import bench_gemm

    return float(bench_gemm.reference(*args))


async def run_batuta(slots: int, tasks: list[tuple[int, int, int]], env: dict[str, str]) -> tuple[float, list[float]]:
    pythonpath = os.pathsep.join([str(BENCH), str(BENCH.parent), os.environ.get("PYTHONPATH", "")])
    host = local_host(slots, gpus="none", kernel_modules=["_blas_kernels"], env={"PYTHONPATH": pythonpath, **env})
    async with Pool([host], PoolConfig()) as pool:
        await pool.map("bench_gemm", [(64, 1, seed) for seed in range(slots * 2)])  # warm every slot
        start = time.perf_counter()
        values = await pool.map("bench_gemm", tasks, backend=Backend.CPU)
        return time.perf_counter() - start, values


def run_process_pool(slots: int, tasks: list[tuple[int, int, int]]) -> tuple[float, list[float]]:
    with ProcessPoolExecutor(slots) as executor:
        list(executor.map(_gemm, [(64, 1, seed) for seed in range(slots * 2)]))
        start = time.perf_counter()
        values = list(executor.map(_gemm, tasks))
        return time.perf_counter() - start, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="CPU slots (default: cores)")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--n", type=int, default=512, help="matrix order")
    parser.add_argument("--reps", type=int, default=4, help="products per task")
    args = parser.parse_args(argv)
    for name in BUDGET_ENV:  # measure the defaults, not this shell's settings
        os.environ.pop(name, None)
    cores = os.cpu_count() or 1
    tasks = [(args.n, args.reps, seed) for seed in range(args.tasks)]
    seconds: dict[str, float] = {}
    results: dict[str, list[float]] = {}
    seconds["batuta"], results["batuta"] = asyncio.run(run_batuta(args.slots, tasks, {}))
    unbudgeted = {name: str(cores) for name in BUDGET_ENV}
    seconds["batuta_unbudgeted"], results["batuta_unbudgeted"] = asyncio.run(run_batuta(args.slots, tasks, unbudgeted))
    seconds["process_pool"], results["process_pool"] = run_process_pool(args.slots, tasks)
    for name, value in seconds.items():
        print(f"{name:>18}: {args.tasks / value:8.2f} tasks/s ({value:.2f} s)", file=sys.stderr)
    agree = all(
        abs(x - y) <= 1e-6 * max(1.0, abs(y))
        for values in results.values()
        for x, y in zip(values, results["process_pool"], strict=True)
    )
    out: dict[str, Any] = {
        "machine": f"{platform.node()} ({cores} cores)",
        "slots": args.slots,
        "tasks": args.tasks,
        "n": args.n,
        "reps": args.reps,
        "tasks_per_s": {name: round(args.tasks / value, 2) for name, value in seconds.items()},
        "ratio_vs_unbudgeted": round(seconds["batuta_unbudgeted"] / seconds["batuta"], 2),
        "ratio_vs_process_pool": round(seconds["process_pool"] / seconds["batuta"], 2),
        "results_agree": agree,
    }
    print(json.dumps(out))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
