"""`Pool.map` and `Pool.map_chunked`: many tasks, values in order, the first failure fails fast."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from batuta.core.objects import ObjectRef
from batuta.core.task import Task, TaskResult
from batuta.errors import TaskFailedError, UsageError
from batuta.runtime.snapshot import InFlight, read_only

if TYPE_CHECKING:
    from batuta.runtime.future import TaskFuture
    from batuta.runtime.pool import Pool


async def map_tasks(pool: Pool, tasks: Iterable[Task], *, keep: bool = False) -> list[Any]:
    """Submit `tasks` and return their values in order. The first failed task cancels the
    rest (those not yet submitted are never submitted) and raises TaskFailedError with its
    result; a caller that gives up waiting cancels every task. `keep`: values are ObjectRefs
    to results left on the hosts that made them (see `Pool.submit`).

    One count and one asyncio future for the whole map, not one asyncio future per task
    gathered: for small tasks that per-task machinery was a share of the coordinator's work."""
    futures: list[TaskFuture] = []
    failure: list[TaskResult] = []
    all_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    unresolved = 0
    submitting = True

    def on_done(done: TaskFuture) -> None:
        nonlocal unresolved
        unresolved -= 1
        result = done.result()
        if not result.is_success() and not failure:
            failure.append(result)
            for other in futures:
                other.cancel()
        if not unresolved and not submitting and not all_done.done():
            all_done.set_result(None)

    try:
        for task in tasks:
            future = await pool.submit(task, keep=keep)
            unresolved += 1
            future.add_done_callback(on_done)
            futures.append(future)
            if failure:
                break
    except BaseException:  # a later item refused (a value that cannot be sent), or we were cancelled:
        for future in futures:  # the map raises, so nobody would ever wait for those submitted
            pool.cancel(future.task_id)
        _drop_kept(pool, futures)
        raise
    submitting = False
    if not unresolved:
        all_done.set_result(None)
    try:
        await all_done
    except asyncio.CancelledError:  # our caller gave up: so do the tasks
        for future in futures:
            pool.cancel(future.task_id)
        _drop_kept(pool, futures)
        raise
    if failure:
        _drop_kept(pool, futures)
        raise TaskFailedError(failure[0].describe_failure(raised=True), result=failure[0])
    return [future.result().value for future in futures]


def _drop_kept(pool: Pool, futures: list[TaskFuture]) -> None:
    """A map that raises returns no refs, so nobody could drop what its tasks kept: drop it
    here, now or as each task ends (one whose cancel came too late may still succeed), or the
    values stay on the hosts until the pool closes."""

    def drop(future: TaskFuture) -> None:
        if not pool._closed:
            pool.drop(ObjectRef(future._keep, pool=pool._objects.owner))

    for future in futures:
        if future._keep:
            future.add_done_callback(drop)


def chunks(arrays: Sequence[Any], chunk_size: int, extra_args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Equally long arrays cut into aligned chunks of `chunk_size`, each followed by `extra_args`."""
    if chunk_size < 1:
        raise UsageError(f"chunk_size must be >= 1, not {chunk_size}")
    if not arrays:
        raise UsageError("map_chunked needs at least one array")
    length = len(arrays[0])
    if any(len(a) != length for a in arrays):
        raise UsageError(f"map_chunked: arrays differ in length ({[len(a) for a in arrays]})")
    # read-only views: map_chunked awaits its tasks, so its chunks go without a copy (snapshot.py)
    return [
        tuple(read_only(a[start : start + chunk_size]) for a in arrays) + tuple(extra_args)
        for start in range(0, length, chunk_size)
    ]


@contextlib.contextmanager
def held_read_only(in_flight: InFlight, arrays: Sequence[Any]) -> Iterator[None]:
    """`map_chunked`'s arrays, read-only while it runs: its chunks are views sent without a
    copy, and a write to an array meanwhile (from another coroutine) gave some chunks the old
    values and some the new in one answer."""
    held = in_flight.hold([a for a in arrays if isinstance(a, np.ndarray) and a.flags.writeable])
    try:
        yield
    finally:
        in_flight.release(held)
