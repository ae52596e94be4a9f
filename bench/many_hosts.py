"""Many hosts: one coordinator over 256 hosts of 1 slot each, against 2 hosts of 1 slot.

Each host is a local agent process (`local_host(1)`, plus its slot process) standing in for
a machine: the coordinator sees what it would see from 256 machines (256 streams, a
heartbeat with telemetry from each every `heartbeat_interval`, results from 256 slots),
while every agent shares this machine's cores. How many fit is measured first: a few
hosts are started and their processes' proportional memory (PSS) taken; the run uses
`--hosts` or as many as fit in 70% of the available memory, whichever is fewer.

For each pool (the baseline, then the big one), after every host is up:

* idle: `--idle-s` seconds with nothing to do: coordinator CPU time over wall time (this
  process only; the agents are other processes); then `--idle-s` more for the event-loop
  lag (a 10 ms sleeper's overshoot, every sample kept; measured apart, as it costs CPU);
* load: `--tasks` trivial tasks (`noop`) streamed through `pool.as_completed` (at most its
  default window unresolved): tasks/s, and event-loop lag meanwhile; the coordinator's CPU
  and the time its thread was runnable but waiting for a core (`load_cpu_wait_fraction`),
  which tells a coordinator starved by the stand-ins from one busy with its own work; and
  the garbage collector's pauses meanwhile (`load_gc_pause_max_ms`, the longest, and
  `load_gc_collections`, how many of each generation: gc.callbacks, cheap).

Once they are up, the stand-in hosts move off the coordinator's core (it keeps core 0, they
get the others, at nice 19; `--together` leaves them): on a cluster each host has its own
cores, while here 512 processes would share the coordinator's.
An observer is subscribed, as the dashboard or the metrics server would be, so that every
heartbeat becomes a telemetry event. The last line is one JSON object: `hosts`,
`tasks_per_s`, `loop_lag_p99_ms` (the worse of idle and load), `idle_cpu_fraction`, and the
same for the baseline (`baseline_*`), with the details.

Targets (issue 17): idle coordinator under 5% of a core with 256 hosts, loop lag p99 under 50 ms.

    python bench/many_hosts.py [--hosts 256] [--baseline-hosts 2] [--tasks 20000] [--idle-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import logging
import os
import platform
import pstats
import time
from dataclasses import dataclass

import psutil

from batuta import Task
from batuta.runtime import events as pe
from batuta.runtime.builder import PoolConfig, local_host
from batuta.runtime.pool import Pool

LAG_INTERVAL_S = 0.01
PROBE_HOSTS = 4
MEMORY_SHARE = 0.7  # of what is available, for the stand-in hosts


@dataclass
class Measured:
    hosts: int
    start_s: float
    idle_cpu_fraction: float
    idle_lag_p99_ms: float
    load_lag_p99_ms: float
    tasks_per_s: float
    telemetry_per_s: float
    load_cpu_fraction: float  # coordinator CPU over wall time while the tasks ran
    load_cpu_wait_fraction: float  # the loop's thread runnable but waiting for a core, over wall time
    load_lag_samples: int  # lag probes that woke during the load (few: the loop's iterations were long)
    load_gc_pause_max_ms: float  # the longest garbage collection during the load
    load_gc_collections: tuple[int, int, int]  # collections of generations 0, 1 and 2 during the load


class LagMonitor:
    """How late a 10 ms sleep wakes up: the event loop's lag, every sample kept."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.samples = []
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> float:
        """The p99 of the samples since `start`, in ms."""
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        ordered = sorted(self.samples)
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            before = clock()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.samples.append(max(0.0, clock() - before - LAG_INTERVAL_S))


class GcPauses:
    """Every garbage collection's pause (gc.callbacks) while recording: a full collection walks
    the whole heap and the event loop waits meanwhile, so it shows in the lag."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self.collections = [0, 0, 0]
        self._began = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._observe)

    def stop(self) -> None:
        gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        self.longest_s = max(self.longest_s, time.perf_counter() - self._began)
        self.collections[info["generation"]] += 1


def runqueue_wait_s() -> float:
    """Seconds this thread has been runnable but waiting for a core (Linux schedstat; 0 where
    absent): under load it tells a coordinator starved of CPU from one busy with its own work."""
    try:
        with open("/proc/thread-self/schedstat") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def pool_of(hosts: int, max_parallel_starts: int) -> Pool:
    specs = [local_host(1, gpus="none", name=f"h{i:03d}") for i in range(hosts)]
    return Pool(specs, PoolConfig(max_parallel_starts=max_parallel_starts, start_timeout=300.0))


def set_hosts_apart(cores: list[int]) -> None:
    """On a cluster each host has its own cores; here 512 stand-ins share the coordinator's,
    and under load they would measure the machine's scheduler rather than the coordinator.
    So the coordinator keeps the first of `cores` and every agent and slot below it goes to
    the others, at nice 19 (slots forked later inherit both). `cores` is what the process
    had at start: the coordinator's own affinity is one core once this has run, and agents
    it starts later inherit that (`run` gives it back before the next pool starts)."""
    if len(cores) < 2:
        return
    os.sched_setaffinity(0, {cores[0]})
    for child in psutil.Process().children(recursive=True):
        try:
            child.cpu_affinity(cores[1:])
            child.nice(19)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def host_memory(pool_hosts: int) -> float:
    """Bytes of PSS per host: the agents and slots below this process, shared pages split."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / pool_hosts


async def probe_fit(max_parallel_starts: int) -> tuple[int, float]:
    async with pool_of(PROBE_HOSTS, max_parallel_starts) as pool:
        await pool.map("noop", list(range(100)))
        per_host = host_memory(PROBE_HOSTS)
    available = psutil.virtual_memory().available
    return int(available * MEMORY_SHARE / per_host), per_host


async def measure(
    hosts: int, tasks: int, idle_s: float, max_parallel_starts: int, *, apart: bool, cores: list[int], profile: str = ""
) -> Measured:
    pool = pool_of(hosts, max_parallel_starts)
    telemetry = 0

    def observe(event: pe.PoolEvent) -> None:
        nonlocal telemetry
        if isinstance(event, pe.HostTelemetry):
            telemetry += 1

    pool.subscribe(observe)
    lag = LagMonitor()
    started = time.perf_counter()
    async with pool:
        async with asyncio.timeout(600):
            while sum(1 for h in pool.hosts() if h.state == "up") < hosts:
                await asyncio.sleep(0.2)  # polling the hosts' states while they start
        start_s = time.perf_counter() - started
        await pool.map("noop", list(range(2 * hosts)))  # every slot forked and warm
        if apart:
            set_hosts_apart(cores)
        await asyncio.sleep(2.0)  # let the start-up settle before the idle window

        # CPU first, without the lag monitor (its 100 wake-ups a second cost CPU themselves)
        telemetry_before = telemetry
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        await asyncio.sleep(idle_s)
        idle_cpu = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
        telemetry_rate = (telemetry - telemetry_before) / idle_s
        lag.start()
        await asyncio.sleep(idle_s)
        idle_lag = await lag.stop()

        lag.start()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        begun, cpu_before, wait_before = time.perf_counter(), time.process_time(), runqueue_wait_s()
        values = []
        pauses = GcPauses()
        pauses.start()
        # Streamed (the way to run many tasks): submitting a whole list at once would hold the
        # loop for the burst, and the lag measured would be the caller's, not the coordinator's.
        stream = pool.as_completed(Task.kernel("noop", i) for i in range(tasks))
        async with contextlib.aclosing(stream) as finished:
            async for future in finished:
                values.append(future.result().value)
        rate = tasks / (time.perf_counter() - begun)
        load_cpu = (time.process_time() - cpu_before) / (time.perf_counter() - begun)
        load_wait = (runqueue_wait_s() - wait_before) / (time.perf_counter() - begun)
        lag_samples = len(lag.samples)
        pauses.stop()
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").dump_stats(profile)
        load_lag = await lag.stop()
        assert sorted(values) == list(range(tasks))
    return Measured(
        hosts,
        start_s,
        idle_cpu,
        idle_lag,
        load_lag,
        rate,
        telemetry_rate,
        load_cpu,
        load_wait,
        lag_samples,
        1000 * pauses.longest_s,
        (pauses.collections[0], pauses.collections[1], pauses.collections[2]),
    )


def report(m: Measured) -> None:
    print(
        f"{m.hosts} hosts: up in {m.start_s:.1f}s; idle: coordinator {100 * m.idle_cpu_fraction:.1f}% of a core, "
        f"loop lag p99 {m.idle_lag_p99_ms:.1f} ms, {m.telemetry_per_s:.0f} telemetry events/s; "
        f"load: {m.tasks_per_s:,.0f} tasks/s, loop lag p99 {m.load_lag_p99_ms:.1f} ms, "
        f"coordinator {100 * m.load_cpu_fraction:.0f}% of a core, "
        f"waiting for one {100 * m.load_cpu_wait_fraction:.0f}% of the time ({m.load_lag_samples} lag samples), "
        f"longest collection {m.load_gc_pause_max_ms:.1f} ms "
        f"({'/'.join(map(str, m.load_gc_collections))} of generations 0/1/2)",
        flush=True,
    )


async def run(args: argparse.Namespace) -> dict[str, object]:
    fit, per_host = await probe_fit(args.max_parallel_starts)
    hosts = min(args.hosts, fit)
    print(f"{per_host / 2**20:.0f} MiB per host (PSS); {fit} fit in {MEMORY_SHARE:.0%} of free memory", flush=True)
    cores = sorted(os.sched_getaffinity(0))
    apart = not args.together
    baseline = await measure(
        args.baseline_hosts, args.tasks, args.idle_s, args.max_parallel_starts, apart=apart, cores=cores
    )
    report(baseline)
    # The baseline left this process on one core; agents started now would inherit it, and
    # set_hosts_apart could not move them off it (before this, the big pool's stand-ins all
    # shared the coordinator's one core, on the h200 too)
    os.sched_setaffinity(0, cores)
    big = await measure(
        hosts, args.tasks, args.idle_s, args.max_parallel_starts, apart=apart, cores=cores, profile=args.profile
    )
    report(big)
    return {
        "hosts": big.hosts,
        "tasks_per_s": round(big.tasks_per_s, 1),
        "loop_lag_p99_ms": round(max(big.idle_lag_p99_ms, big.load_lag_p99_ms), 2),
        "idle_cpu_fraction": round(big.idle_cpu_fraction, 4),
        "idle_loop_lag_p99_ms": round(big.idle_lag_p99_ms, 2),
        "load_loop_lag_p99_ms": round(big.load_lag_p99_ms, 2),
        "start_s": round(big.start_s, 1),
        "telemetry_per_s": round(big.telemetry_per_s, 1),
        "load_cpu_fraction": round(big.load_cpu_fraction, 3),
        "load_cpu_wait_fraction": round(big.load_cpu_wait_fraction, 3),
        "load_lag_samples": big.load_lag_samples,
        "load_gc_pause_max_ms": round(big.load_gc_pause_max_ms, 1),
        "load_gc_collections": list(big.load_gc_collections),
        "hosts_fit": fit,
        "mib_per_host": round(per_host / 2**20, 1),
        "baseline_hosts": baseline.hosts,
        "baseline_tasks_per_s": round(baseline.tasks_per_s, 1),
        "baseline_loop_lag_p99_ms": round(max(baseline.idle_lag_p99_ms, baseline.load_lag_p99_ms), 2),
        "baseline_idle_cpu_fraction": round(baseline.idle_cpu_fraction, 4),
        "tasks": args.tasks,
        "hosts_apart": not args.together,
        "load_average_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=256)
    parser.add_argument("--baseline-hosts", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--max-parallel-starts", type=int, default=64)
    parser.add_argument(
        "--together", action="store_true", help="leave the stand-in hosts on the coordinator's cores and priority"
    )
    parser.add_argument("--profile", default="", metavar="FILE", help="cProfile the big pool's load phase into FILE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
