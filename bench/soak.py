"""Soak: a million trivial tasks through a local pool; nothing lost, nothing twice, flat memory.

Phase 1 streams `--tasks` (default 1,000,000) `Task.kernel("noop", i)` through
`Pool.local(...).as_completed` (the API for long task lists: at most `--window` unresolved at
a time, the pool's default unless given), and checks every result: each index comes back
exactly once, with its own value. The coordinator's resident memory is read (after a
full garbage collection, with nothing in flight) once the first 100,000 tasks are done and
again at the end: `rss_growth_fraction` is the growth between the two.

Phase 2 measures what a queued task costs the coordinator: the pool is paused
(`pool.pause()`), `--queued` (default 1,000,000) tasks are submitted and their futures kept
(as a caller would), and the RSS delta after a full collection, divided by the count, is
`bytes_per_queued_task`. Those tasks are then cancelled by closing the pool, and each must
resolve exactly once. With `--profile` (or when the figure is over 1024 bytes), a second
measurement under `tracemalloc` with `--profile-tasks` tasks says which allocation sites
cost what per task.

    python bench/soak.py [--tasks 1000000] [--queued 1000000] [--workers 2] [--window N] [--profile]

Why the window matters for RSS: CPython's small-object allocator (pymalloc) returns a 1 MiB
arena to the OS only when every block in it is free. With 20,000 tasks in flight the
transient peak spans ~16 arenas, and the handful of objects alive when the pool drains
(a telemetry record, the last batch's messages) keep a varying number of them resident:
RSS then moves between checkpoints by a few MiB with Python's own usage flat. `--window
20000` shows that; the default window keeps the peak, and so the swing, small.

Progress goes to stderr; the last line printed is one JSON object with `tasks`, `lost`,
`duplicated`, `rss_growth_fraction`, `bytes_per_queued_task` and the details.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import psutil

from batuta import Pool, Task, TaskStatus
from batuta.runtime.pool import TaskFuture
from batuta.runtime.stream import default_window

TARGETS = {"lost": 0, "duplicated": 0, "rss_growth_fraction": 0.05, "bytes_per_queued_task": 1024}
MEMORY_CHECKPOINT = 100_000


def rss() -> int:
    """Resident bytes of this process after a full collection."""
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def trimmed_rss() -> int | None:
    """Resident bytes after glibc has handed freed heap pages back (`malloc_trim(0)`): what
    is still in use, without what fragmentation keeps resident. None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Ledger:
    """Every index's result count and value check, in 2 bytes per task."""

    def __init__(self, count: int) -> None:
        self.seen = bytearray(count)
        self.wrong_value = 0
        self.not_succeeded: dict[str, int] = {}
        self.done = 0

    def callback(self, expect_status: TaskStatus | None) -> Callable[[TaskFuture], None]:
        seen = self.seen

        def on_done(future: TaskFuture) -> None:
            result = future.result()
            index = future.task.call.args[0]  # type: ignore[union-attr]
            if seen[index] < 255:
                seen[index] += 1
            self.done += 1
            if expect_status is TaskStatus.SUCCEEDED:
                if result.status is not TaskStatus.SUCCEEDED:
                    key = f"{result.status.value}: {result.error}"[:120]
                    self.not_succeeded[key] = self.not_succeeded.get(key, 0) + 1
                elif result.value != index:
                    self.wrong_value += 1

        return on_done

    def lost(self) -> int:
        return self.seen.count(0)

    def duplicated(self) -> int:
        return len(self.seen) - self.seen.count(0) - self.seen.count(1)


async def phase_throughput(pool: Pool, tasks: int, window: int | None, malloc_trim: bool = False) -> dict[str, Any]:
    """Stream `tasks` noop tasks through `pool.as_completed` (at most `window` unresolved,
    the pool's default when None), 100,000 at a time; check each result."""
    ledger = Ledger(tasks)
    on_done = ledger.callback(TaskStatus.SUCCEEDED)
    rss_checkpoint = None
    blocks_checkpoint = 0  # live Python objects' blocks: a leak shows here, fragmentation does not
    series: list[float] = []  # MiB after each 100,000 tasks, nothing in flight
    trimmed: list[int | None] = []
    start = time.perf_counter()
    last = start
    for first in range(0, tasks, MEMORY_CHECKPOINT):
        batch = (Task.kernel("noop", index) for index in range(first, min(first + MEMORY_CHECKPOINT, tasks)))
        async with contextlib.aclosing(pool.as_completed(batch, window=window)) as finished:
            async for future in finished:
                on_done(future)
                now = time.perf_counter()
                if now - last > 10:
                    last = now
                    log(f"{ledger.done} tasks done ({ledger.done / (now - start):,.0f} tasks/s)")
        # the batch has drained: nothing in flight
        resident = rss()
        series.append(round(resident / 2**20, 1))
        if rss_checkpoint is None:
            rss_checkpoint = resident
            blocks_checkpoint = sys.getallocatedblocks()
            if malloc_trim:
                trimmed.append(trimmed_rss())
        log(f"{ledger.done} tasks done; RSS {resident / 2**20:.1f} MiB")
    elapsed = time.perf_counter() - start
    rss_end = rss()
    blocks_end = sys.getallocatedblocks()
    if malloc_trim:
        trimmed.append(trimmed_rss())
    assert rss_checkpoint is not None
    log(f"{tasks} tasks done in {elapsed:.1f}s; RSS {rss_end / 2**20:.1f} MiB")
    return {
        "tasks": tasks,
        "window": window if window is not None else default_window(pool),
        "lost": ledger.lost(),
        "duplicated": ledger.duplicated(),
        "wrong_values": ledger.wrong_value,
        "not_succeeded": ledger.not_succeeded,
        "seconds": round(elapsed, 1),
        "tasks_per_s": round(tasks / elapsed),
        "rss_after_first_100k_mib": round(rss_checkpoint / 2**20, 1),
        "rss_after_run_mib": round(rss_end / 2**20, 1),
        "rss_growth_fraction": round((rss_end - rss_checkpoint) / rss_checkpoint, 4),
        "rss_mib_every_100k": series,
        "allocated_blocks_after_first_100k": blocks_checkpoint,
        "allocated_blocks_growth": blocks_end - blocks_checkpoint,
        "rss_growth_fraction_after_malloc_trim": (
            round((trimmed[1] - trimmed[0]) / trimmed[0], 4)  # type: ignore[operator]
            if len(trimmed) == 2 and None not in trimmed
            else None
        ),
    }


async def phase_queued(pool: Pool, count: int) -> tuple[dict[str, Any], Ledger, list[TaskFuture]]:
    """Submit `count` tasks to the paused pool; RSS delta per task with their futures held."""
    pool.pause()
    futures: list[TaskFuture] = []
    futures_list_bytes = 0
    before = rss()
    start = time.perf_counter()
    for index in range(count):
        futures.append(pool.submit_nowait(Task.kernel("noop", index)))
    await asyncio.sleep(0)  # the pool schedules a loop turn's submissions together: let it
    submit_s = time.perf_counter() - start
    after = rss()
    futures_list_bytes = sys.getsizeof(futures)
    ledger = Ledger(count)
    on_done = ledger.callback(None)
    for future in futures:
        future.add_done_callback(on_done)
    per_task = (after - before) / count
    log(f"{count} tasks queued in {submit_s:.1f}s: {per_task:.0f} bytes per queued task")
    return (
        {
            "queued": count,
            "bytes_per_queued_task": round(per_task),
            "bytes_per_queued_task_without_callers_list": round((after - before - futures_list_bytes) / count),
            "submit_s": round(submit_s, 1),
        },
        ledger,
        futures,
    )


async def profile_queued(workers: int, count: int) -> list[dict[str, Any]]:
    """Where a queued task's bytes go: tracemalloc sites, in bytes per task."""
    async with Pool.local(workers, gpu_workers="none", max_queued=max(count * 2, 10)) as pool:
        pool.pause()
        futures: list[TaskFuture] = []
        gc.collect()
        tracemalloc.start(1)
        first = tracemalloc.take_snapshot()
        for index in range(count):
            futures.append(pool.submit_nowait(Task.kernel("noop", 10**6 + index)))  # ints outside the cache
        gc.collect()
        second = tracemalloc.take_snapshot()
        tracemalloc.stop()
        rows = []
        for stat in second.compare_to(first, "lineno")[:25]:
            if stat.size_diff < count * 2:
                continue
            frame = stat.traceback[0]
            rows.append(
                {
                    "site": f"{_short(frame.filename)}:{frame.lineno}",
                    "bytes_per_task": round(stat.size_diff / count, 1),
                    "blocks_per_task": round(stat.count_diff / count, 2),
                    "code": _line(frame.filename, frame.lineno),
                }
            )
        del futures
    return rows


def _short(filename: str) -> str:
    for marker in ("/batuta/", "/asyncio/", "/lib/python3"):
        if marker in filename:
            return filename[filename.index(marker) + 1 :]
    return filename


def _line(filename: str, lineno: int) -> str:
    try:
        return Path(filename).read_text().splitlines()[lineno - 1].strip()[:100]
    except (OSError, IndexError):
        return ""


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": f"{platform.node()} ({psutil.cpu_count()} cores)", "workers": args.workers}
    max_queued = max(args.queued * 2, (args.window or 0) * 2, 1000)
    pool = Pool.local(args.workers, gpu_workers="none", max_queued=max_queued)
    async with pool:
        result.update(await phase_throughput(pool, args.tasks, args.window, args.malloc_trim))
        stats = pool.stats()
        result["dropped_results"] = stats.dropped_results
        result["retries"] = stats.retries
        queued, ledger, futures = await phase_queued(pool, args.queued)
        result.update(queued)
    # closing the pool resolved every queued task (CANCELLED); the callbacks run now
    deadline = time.monotonic() + 120
    while ledger.done < args.queued and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    del futures
    result["queued_lost"] = ledger.lost()
    result["queued_duplicated"] = ledger.duplicated()
    if args.profile or result["bytes_per_queued_task"] > TARGETS["bytes_per_queued_task"]:
        log(f"profiling {args.profile_tasks} queued tasks with tracemalloc")
        result["profile_per_queued_task"] = await profile_queued(args.workers, args.profile_tasks)
    result["targets"] = TARGETS
    result["met"] = (
        result["lost"] == 0
        and result["duplicated"] == 0
        and result["rss_growth_fraction"] <= TARGETS["rss_growth_fraction"]
        and result["bytes_per_queued_task"] <= TARGETS["bytes_per_queued_task"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000, help="tasks to run (phase 1)")
    parser.add_argument("--queued", type=int, default=1_000_000, help="tasks to queue on a paused pool (phase 2)")
    parser.add_argument("--workers", type=int, default=2, help="CPU slots of the local agent")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="most unresolved tasks at once in phase 1 (default: the pool's as_completed default)",
    )
    parser.add_argument(
        "--malloc-trim",
        action="store_true",
        help="also measure growth after glibc's malloc_trim(0) (diagnosis: leak or fragmentation?); "
        "it changes what the plain figure measures, so it is off by default",
    )
    parser.add_argument("--profile", action="store_true", help="always profile a queued task with tracemalloc")
    parser.add_argument("--profile-tasks", type=int, default=100_000, help="tasks queued under tracemalloc")
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args))
    print(json.dumps(result))
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
