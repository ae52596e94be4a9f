"""Small array tasks end to end: batuta's per-task path vs ProcessPoolExecutor, one run (issue 16).

`--tasks` tasks each add two 4K-element float32 arrays (16 KiB each, `--elements`) and return
the sum, so the work is nothing next to the per-task path: submitting, encoding the arrays,
the pipe to the agent, the agent's forwarding, the slot's decoding and encoding of the result,
and the result's way back. Both sides submit every task and then gather:

* batuta: `pool.map("vadd", [(a, a)] * n, backend=...)` through `Pool.local(--workers)`
  (CPU backend, CPU slots), or, with `--backend gpu`, through the pool's one GPU slot
  (`Pool.local(1, gpu_workers="auto")`), as `bench/gpu_pool.py`'s tiny part does;
* ProcessPoolExecutor(--workers): `submit(vadd, a, a)` per task (NumPy add, pickled arrays).

Start-up and a warm-up round are not timed; the last result of each side is checked. Beside
the wall-clock rates, CPU time per task: `coordinator_cpu_us_per_task` (this process,
every thread: submitting, encoding, reading results), `agent_cpu_us_per_task` and
`slots_cpu_us_per_task` (the local agent and its slot processes, from /proc): CPU time, which
a shared, noisy machine disturbs less than wall time. `*_busy` is that CPU time over the wall
time: near 1.0, that process is what limits the rate. `slot_run_us`: the median time the
kernel itself takes in its slot (`TaskResult.duration`, untimed tasks after the timed ones),
to set against the period, 1e6 / `tasks_per_s`. With `--backend gpu`, also
`direct_calls_per_s`: the GPU variant called in this process, without the pool.

`--round-trip S` sets the scheduler's assumed round trip (`SchedulerConfig.default_round_trip`,
1 ms), which sizes each slot's window: 1 + round trip / mean run time tasks in flight. A GPU
vadd of about 35 us gets about 30; if a larger value raises the GPU rate, the one slot's
window, not the CPU work per task, is what limits it.

The last line printed is one JSON object: `tasks_per_s`, `ppe_tasks_per_s`, `ratio_vs_ppe`,
the CPU figures above. Target (issue 16): `tasks_per_s` >= 5,000 with `--backend gpu` on the
GPU host.

    python bench/small_tasks.py [--tasks 20000] [--workers 2] [--elements 4096]
    python bench/small_tasks.py --backend gpu          # on a GPU host
    python bench/small_tasks.py --backend gpu --round-trip 0.004
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

WARM = 500


def vadd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def _ticks_of(pid: int) -> int:
    """utime + stime of process `pid`, its reaped children not counted (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _children() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc (Linux); empty elsewhere."""
    parents: dict[int, int] = {}
    if not os.path.isdir("/proc"):
        return parents
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return parents


class ProcessCpu:
    """CPU seconds of this process and of its descendants (the local agent, its slots)."""

    def __init__(self) -> None:
        me = os.getpid()
        parents = _children()
        self.agents = [pid for pid, parent in parents.items() if parent == me]
        self.slots = [pid for pid, parent in parents.items() if parent in self.agents]
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> tuple[float, float, float]:
        def seconds(pids: list[int]) -> float:
            total = 0
            for pid in pids:
                try:
                    total += _ticks_of(pid)
                except OSError:
                    continue
            return total / self.tick

        return time.process_time(), seconds(self.agents), seconds(self.slots)


async def batuta_side(tasks: int, workers: int, elements: int, gpu: bool, round_trip: float | None) -> dict[str, float]:
    from dataclasses import replace

    from batuta import Pool, Task
    from batuta.core.placement import SchedulerConfig
    from batuta.core.task import Backend

    a = np.arange(elements, dtype=np.float32)
    items = [(a, a)] * tasks
    backend = Backend.GPU if gpu else Backend.CPU
    builder = Pool.builder().cpu_workers(1 if gpu else workers).gpu_workers("auto" if gpu else "none")
    if round_trip is not None:
        builder.scheduler(replace(SchedulerConfig(), default_round_trip=round_trip))
    pool = builder.build()
    async with pool:
        await pool.map("vadd", items[: min(WARM, tasks)], backend=backend)  # imports, compiles, warms the path
        cpu = ProcessCpu()
        before = cpu.sample()
        start = time.perf_counter()
        values = await pool.map("vadd", items, backend=backend)
        elapsed = time.perf_counter() - start
        after = cpu.sample()
        # untimed: the kernel's own time in the slot (TaskResult.duration), against the period
        futures = [await pool.submit(Task.kernel("vadd", a, a, backend=backend)) for _ in range(min(WARM, tasks))]
        durations = [(await future).duration for future in futures]
    np.testing.assert_array_equal(values[-1], a + a)
    cpu_s = [b - a_ for a_, b in zip(before, after, strict=True)]
    figures = {"tasks_per_s": tasks / elapsed, "slot_run_us": float(np.median(durations)) * 1e6}
    for name, seconds in zip(("coordinator", "agent", "slots"), cpu_s, strict=True):
        figures[f"{name}_cpu_us_per_task"] = seconds / tasks * 1e6
        figures[f"{name}_busy"] = seconds / elapsed
    return figures


def ppe_side(tasks: int, workers: int, elements: int) -> dict[str, float]:
    a = np.arange(elements, dtype=np.float32)
    with concurrent.futures.ProcessPoolExecutor(workers) as ex:
        list(ex.map(vadd, [a] * min(WARM, tasks), [a] * min(WARM, tasks)))
        cpu_before = time.process_time()
        start = time.perf_counter()
        futures = [ex.submit(vadd, a, a) for _ in range(tasks)]
        values = [f.result() for f in futures]
        elapsed = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_before
    np.testing.assert_array_equal(values[-1], a + a)
    return {"ppe_tasks_per_s": tasks / elapsed, "ppe_coordinator_cpu_us_per_task": cpu_s / tasks * 1e6}


def direct_gpu(tasks: int, elements: int) -> float:
    """Calls per second of the vadd GPU variant in this process, host arrays in and out."""
    from batuta.kernels import registry

    a = np.arange(elements, dtype=np.float32)
    for _ in range(10):
        registry.run("vadd", "gpu", (a, a))
    start = time.perf_counter()
    for _ in range(tasks):
        registry.run("vadd", "gpu", (a, a))
    return tasks / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="CPU slots, and the executor's processes")
    parser.add_argument("--elements", type=int, default=4096, help="float32 elements per array")
    parser.add_argument("--backend", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--round-trip", type=float, default=None, help="the scheduler's assumed round trip, s")
    parser.add_argument("--skip-ppe", action="store_true")
    args = parser.parse_args()
    gpu = args.backend == "gpu"

    ours = asyncio.run(batuta_side(args.tasks, args.workers, args.elements, gpu, args.round_trip))
    print(
        f"batuta ({args.backend}): {ours['tasks_per_s']:,.0f} tasks/s; CPU us/task: "
        f"coordinator {ours['coordinator_cpu_us_per_task']:.1f}, agent {ours['agent_cpu_us_per_task']:.1f}, "
        f"slots {ours['slots_cpu_us_per_task']:.1f}",
        flush=True,
    )
    summary: dict[str, Any] = {
        "tasks": args.tasks,
        "workers": args.workers,
        "elements": args.elements,
        "backend": args.backend,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "round_trip": args.round_trip,
        **{key: round(value, 3 if key.endswith("_busy") else 1) for key, value in ours.items()},
    }
    if not args.skip_ppe:
        ppe = ppe_side(args.tasks, args.workers, args.elements)
        print(f"ProcessPoolExecutor: {ppe['ppe_tasks_per_s']:,.0f} tasks/s", flush=True)
        summary.update({key: round(value, 1) for key, value in ppe.items()})
        summary["ratio_vs_ppe"] = round(ours["tasks_per_s"] / ppe["ppe_tasks_per_s"], 3)
    if gpu:
        summary["direct_calls_per_s"] = round(direct_gpu(args.tasks, args.elements), 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
