"""Streaming submission: run an iterable of tasks of any length with bounded memory.

`Pool.map` keeps one future per item until the end, which is right for a few thousand
items and wrong for a million: the caller's memory then grows with the list. `as_completed`
pulls tasks from the iterable only while fewer than `window` are unresolved and hands each
future back as it finishes, so the coordinator holds O(window) tasks whatever the length
(even an endless generator). The default window keeps every slot's in-flight window full,
with room to spare, so streaming costs no throughput.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import AsyncGenerator, Iterable
from typing import TYPE_CHECKING

from batuta.errors import UsageError

if TYPE_CHECKING:
    from batuta.core.task import Task
    from batuta.runtime.pool import Pool, TaskFuture


class _End(enum.Enum):
    """Marks the end of the tasks (an enum member, so that `is` tells the type checker too)."""

    END = enum.auto()


MIN_WINDOW = 1024  # keeps a pool that is still starting (no slots yet) busy once they join
# Filling a window, or handing finished futures to the caller, gives the loop a turn after
# this many, or sooner once the iteration's budget is spent (`runtime/turns.py`): with
# hundreds of slots the default window is tens of thousands of tasks, and submitting them all
# in one turn would hold heartbeats, results and every other host's bytes for the burst.
FILL_TURN = 1024


def default_window(pool: Pool) -> int:
    """Four times what every slot may hold in flight: the slots never wait for the caller,
    and the transient peak of objects stays small (see bench/soak.py on why that matters)."""
    return max(MIN_WINDOW, 4 * pool.config.scheduler.max_window * pool.slot_count)


async def as_completed(
    pool: Pool, tasks: Iterable[Task], window: int | None = None
) -> AsyncGenerator[TaskFuture, None]:
    """Submit `tasks` lazily, at most `window` unresolved at a time; yield each future as it
    finishes. Leaving the loop early (break, exception, cancellation) cancels the tasks still
    unresolved and submits no more; wrap the call in `contextlib.aclosing` to have that
    happen at once rather than when the generator is collected."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UsageError(f"as_completed: window must be a positive integer, not {window!r}")
    source = iter(tasks)
    finished: deque[TaskFuture] = deque()
    unresolved: dict[int, TaskFuture] = {}
    wake = asyncio.Event()
    exhausted = False
    turns = pool._turns  # the loop iteration's budget, shared with the hosts' readers (turns.py)

    def on_done(future: TaskFuture) -> None:
        # a future resolves once, so this runs once per task (TaskFuture's contract)
        if unresolved.pop(future.task_id, None) is not None:
            finished.append(future)
            wake.set()

    try:
        while True:
            limit = window if window is not None else default_window(pool)
            filled = 0
            while not exhausted and len(unresolved) + len(finished) < limit:
                if filled and (filled % FILL_TURN == 0 or turns.spent()):
                    await turns.yield_turn()  # a turn for the loop and the readers (see FILL_TURN), not a wait
                filled += 1
                task = next(source, _End.END)
                if task is _End.END:
                    exhausted = True
                    break
                future = await pool.submit(task)  # a non-Task is refused there, by name
                unresolved[future.task_id] = future
                future.add_done_callback(on_done)
            if finished:
                handed = 0
                while finished:
                    if handed and (handed % FILL_TURN == 0 or turns.spent()):
                        await turns.yield_turn()  # the caller's work on each future counts too
                    handed += 1
                    yield finished.popleft()
                continue
            if exhausted and not unresolved:
                return
            wake.clear()
            await wake.wait()
    finally:
        for future in list(unresolved.values()):
            future.cancel()
