"""Trivial-task throughput over SSH: batuta versus Dask's SSH deployment, same hosts, one run.

4 test hosts (network namespaces, each with a real OpenSSH sshd; see tests/support/hosts.py),
2 single-threaded worker processes per host. Each system gets the same number of trivial
tasks (return the argument), submitted one by one and then gathered; start-up and a warm-up
round are not timed.

- batuta: a cluster file -> `build_pool`; `Task.kernel("noop", i)` x N via `pool.submit`,
  then every future awaited. Windows per slot adapt to run time and round trip.
- Dask: the pieces `SSHCluster` is made of (`SpecCluster`, `distributed.deploy.ssh.Worker`,
  `n_workers=2`, `nthreads=1`, the default Nanny) with the scheduler in this process, where
  batuta's coordinator is (see bench/ssh_startup.py for why and for the namespace routes);
  `client.submit(noop, i, pure=False)` x N, then `client.gather`.

The box has 2 cores for everything (coordinator, scheduler, sshds, agents, worker processes),
so absolute numbers are modest; `*_cpu_s` is machine-wide busy CPU while the clock ran.
The last line printed is one JSON object:

    batuta_tasks_per_s, dask_tasks_per_s, ratio (batuta / dask), plus details

Target: ratio >= 10.

    python bench/ssh_throughput.py [--tasks 20000] [--hosts 4] [--slots 2] [--skip-dask]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _peers import check_dask  # noqa: E402

from bench.ssh_startup import (  # noqa: E402
    busy_cpu_s,
    cluster_text,
    dask_specs,
    quiet_logs,
    route_to_scheduler,
    settle,
)
from tests.support.hosts import TestHosts  # noqa: E402

RUN_TIMEOUT_S = 300.0  # one system's start, warm-up and timed round


def noop(x: Any) -> Any:
    return x


async def batuta_rate(hosts: TestHosts, slots: int, tasks: int, warmup: int) -> dict[str, Any]:
    from batuta import Task
    from batuta.runtime.cluster import build_pool, parse_cluster

    pool = build_pool(parse_cluster(cluster_text(hosts, slots), source="bench/ssh_throughput.py"))
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await pool.start()
            warm = [await pool.submit(Task.kernel("noop", i)) for i in range(warmup)]
            for fut in warm:
                await fut
            cpu0 = busy_cpu_s()
            start = time.perf_counter()
            futures = [await pool.submit(Task.kernel("noop", i)) for i in range(tasks)]
            submitted = time.perf_counter() - start
            results = [await fut for fut in futures]
            elapsed = time.perf_counter() - start
            cpu_s = busy_cpu_s() - cpu0
            stats = pool.stats()
    finally:
        await pool.close()
    failed = [r for r in results if not r.is_success()]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks failed; first: {failed[0].describe_failure()}")
    if [r.value for r in results] != list(range(tasks)):
        raise RuntimeError("batuta returned wrong values")
    per_slot = Counter(str(r.slot) for r in results)
    return {
        "tasks_per_s": tasks / elapsed,
        "elapsed_s": round(elapsed, 4),
        "submit_s": round(submitted, 4),
        "cpu_s": round(cpu_s, 3),
        "per_slot": dict(sorted(per_slot.items())),
        "steals": stats.steals,
        "steal_backs": stats.steal_backs,
    }


async def dask_rate(hosts: TestHosts, slots: int, tasks: int, warmup: int, scheduler_host: str) -> dict[str, Any]:
    from distributed import Client, SpecCluster

    expected = len(hosts) * slots
    workers, scheduler = dask_specs(hosts, slots, scheduler_host)
    cluster: Any = None
    client: Any = None
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            cluster = SpecCluster(workers=workers, scheduler=scheduler, asynchronous=True, name="SSHCluster")
            await cluster
            client = await Client(cluster, asynchronous=True)
            await client.wait_for_workers(expected)
            await client.gather([client.submit(noop, i, pure=False) for i in range(warmup)])
            cpu0 = busy_cpu_s()
            start = time.perf_counter()
            futures = [client.submit(noop, i, pure=False) for i in range(tasks)]
            submitted = time.perf_counter() - start
            values = await client.gather(futures)
            elapsed = time.perf_counter() - start
            cpu_s = busy_cpu_s() - cpu0
            where = await client.run(_executed_count)
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                await cluster.close()
    if values != list(range(tasks)):
        raise RuntimeError("Dask returned wrong values")
    return {
        "tasks_per_s": tasks / elapsed,
        "elapsed_s": round(elapsed, 4),
        "submit_s": round(submitted, 4),
        "cpu_s": round(cpu_s, 3),
        "per_worker": dict(sorted(where.items())),
    }


def _executed_count(dask_worker: Any = None) -> int:
    """Tasks this worker has executed so far (run on every worker by `client.run`)."""
    return int(dask_worker.state.executed_count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000, help="untimed tasks first (Dask: a quarter)")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2, help="worker processes per host")
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    check_dask(parser, args.skip_dask)
    if not 1 <= args.tasks <= 1_000_000:
        parser.error("--tasks must be 1..1,000,000")
    import batuta.runtime.cluster  # noqa: F401

    if not args.skip_dask:
        import distributed.deploy.ssh  # noqa: F401
    quiet_logs()

    load_start = os.getloadavg()[0]  # other work on this machine skews every number here
    with TestHosts(args.hosts) as hosts:
        ours = asyncio.run(batuta_rate(hosts, args.slots, args.tasks, args.warmup))
        print(f"batuta: {ours['tasks_per_s']:,.0f} tasks/s", flush=True)
        theirs = None
        if not args.skip_dask:
            settle(hosts)
            scheduler_host = route_to_scheduler(hosts)
            theirs = asyncio.run(dask_rate(hosts, args.slots, args.tasks, args.warmup // 4, scheduler_host))
            print(f"Dask (SSH workers): {theirs['tasks_per_s']:,.0f} tasks/s", flush=True)
    summary = {
        "tasks": args.tasks,
        "hosts": args.hosts,
        "slots_per_host": args.slots,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # before, after: others' load
        "batuta_tasks_per_s": round(ours["tasks_per_s"], 1),
        "dask_tasks_per_s": round(theirs["tasks_per_s"], 1) if theirs else None,
        "ratio": round(ours["tasks_per_s"] / theirs["tasks_per_s"], 3) if theirs else None,
        "batuta": {k: v for k, v in ours.items() if k != "tasks_per_s"},
        "dask": {k: v for k, v in theirs.items() if k != "tasks_per_s"} if theirs else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
