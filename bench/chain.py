"""Tasks that feed tasks: a three-stage pipeline per chain, batuta keep=True vs Dask futures vs
batuta without keep, one run.

Each chain: stage 1 makes a `--mb` MB float64 array from its seed (`chain_make`), stage 2
consumes it and makes another (`chain_step`, x * 2 + 1), stage 3 consumes that and returns its
sum (`chain_sum`): the only value that comes back. `--chains` chains run with at most
`--window` of them in flight, and each chain's intermediates are dropped as soon as its last
stage finished (batuta: `pool.drop`; Dask: the futures are released), so memory is bounded
by the window, not the chain count. Every sum is checked.

* batuta, keep: stages 1 and 2 with `keep=True`; each next stage names the previous future,
  so it waits for it and runs on the host holding the bytes.
* Dask: `client.submit(f, previous_future)`, Dask's way (the data stays on the workers).
* batuta, no keep: every stage's value comes back to the coordinator and goes out again as
  the next stage's argument (what batuta did before kept results).

Both systems get two workers: batuta two local agents of one slot each (so that locality has
a choice to make), Dask a LocalCluster of two processes of one thread. Start-up and a warm-up
chain are not timed. `bytes_through_coordinator` counts, for the keep run, the kept bytes the
coordinator relayed or fetched (`PoolStats.relayed_bytes + fetched_bytes`); the no-keep run
moves `3 * chains * mb` MB through it. The last line printed is one JSON object.

    python bench/chain.py [--chains 200] [--mb 50] [--window 4] [--skip-dask] [--skip-no-keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout

from _peers import check_dask  # noqa: E402

from bench._chain_kernels import make, reduce_sum, step  # noqa: E402

MODULE = "bench._chain_kernels"


def expected(seed: int, n: int) -> float:
    return 2.0 * (1e-6 * n * (n - 1) / 2 + seed * n) + n


def check(seed: int, n: int, value: float) -> None:
    want = expected(seed, n)
    assert abs(value - want) <= 1e-9 * abs(want), f"chain {seed}: {value} != {want}"


def two_hosts() -> Any:
    from batuta.runtime.builder import local_host

    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return [local_host(1, gpus="none", kernel_modules=[MODULE], env=env, name=f"h{i}") for i in range(2)]


async def batuta_run(chains: int, n: int, window: int, keep: bool) -> tuple[float, int]:
    from batuta import Backend, Pool, Task

    async def chain(pool: Pool, seed: int) -> None:
        if keep:
            first = await pool.submit(Task.kernel("chain_make", seed, n, backend=Backend.CPU), keep=True)
            second = await pool.submit(Task.kernel("chain_step", first, 2.0, backend=Backend.CPU), keep=True)
            total = await (await pool.submit(Task.kernel("chain_sum", second, backend=Backend.CPU)))
            assert total.is_success(), total.error
            for done in (first, second):
                pool.drop((await done).value)
        else:
            a = await pool.run(Task.kernel("chain_make", seed, n, backend=Backend.CPU))
            b = await pool.run(Task.kernel("chain_step", a.value, 2.0, backend=Backend.CPU))
            total = await pool.run(Task.kernel("chain_sum", b.value, backend=Backend.CPU))
            assert total.is_success(), total.error
        check(seed, n, total.value)

    async with Pool(two_hosts()) as pool:
        await chain(pool, 0)  # warm-up
        before = pool.stats()
        gate = asyncio.Semaphore(window)

        async def bounded(seed: int) -> None:
            async with gate:
                await chain(pool, seed)

        start = time.perf_counter()
        await asyncio.gather(*(bounded(seed) for seed in range(1, chains + 1)))
        elapsed = time.perf_counter() - start
        after = pool.stats()
    through = (after.relayed_bytes + after.fetched_bytes) - (before.relayed_bytes + before.fetched_bytes)
    return elapsed, through


def dask_run(chains: int, n: int, window: int) -> float:
    from dask.distributed import Client, LocalCluster, as_completed

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):

        def submit(seed: int) -> Any:
            first = client.submit(make, seed, n, pure=False)
            second = client.submit(step, first, 2.0, pure=False)
            return client.submit(reduce_sum, second, pure=False), seed

        warm, _ = submit(0)
        check(0, n, warm.result())
        start = time.perf_counter()
        seeds = iter(range(1, chains + 1))
        in_flight = {}
        for seed in seeds:
            future, _ = submit(seed)
            in_flight[future] = seed
            if len(in_flight) >= window:
                break
        finished = as_completed(list(in_flight))
        for future in finished:
            check(in_flight.pop(future), n, future.result())
            future.release()  # its chain's intermediates go with it
            nxt = next(seeds, None)
            if nxt is not None:
                new, _ = submit(nxt)
                in_flight[new] = nxt
                finished.add(new)
        elapsed = time.perf_counter() - start
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=200)
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--skip-no-keep", action="store_true", help="leave out the slow run without keep")
    args = parser.parse_args()
    check_dask(parser, args.skip_dask)
    n = int(args.mb * 1e6 / 8)
    batuta_s, through = asyncio.run(batuta_run(args.chains, n, args.window, keep=True))
    print(f"batuta keep=True: {batuta_s:.2f} s ({through:,} bytes through the coordinator)", file=sys.stderr)
    dask_s = None
    if not args.skip_dask:
        dask_s = dask_run(args.chains, n, args.window)
        print(f"Dask futures: {dask_s:.2f} s", file=sys.stderr)
    no_keep_s = None
    if not args.skip_no_keep:
        no_keep_s, _ = asyncio.run(batuta_run(args.chains, n, args.window, keep=False))
        print(f"batuta without keep: {no_keep_s:.2f} s", file=sys.stderr, flush=True)
    result = {
        "chains": args.chains,
        "mb": args.mb,
        "window": args.window,
        "batuta_s": round(batuta_s, 3),
        "dask_s": round(dask_s, 3) if dask_s is not None else None,
        "no_keep_s": round(no_keep_s, 3) if no_keep_s is not None else None,
        "ratio_vs_dask": round(dask_s / batuta_s, 3) if dask_s is not None else None,
        "ratio_vs_no_keep": round(no_keep_s / batuta_s, 3) if no_keep_s is not None else None,
        "bytes_through_coordinator": through,
        "no_keep_bytes_through_coordinator": int(3 * args.chains * n * 8),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
