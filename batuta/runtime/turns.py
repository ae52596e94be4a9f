"""A budget of coordinator work per event-loop iteration, shared by every host's reader.

asyncio runs every callback that is ready when an iteration begins before it looks at its
timers again, so the loop's lag (a heartbeat answer, a liveness deadline, a dashboard
frame) is the length of its longest iteration. With hundreds of hosts under load, every
host's reader has a batch of results ready at once, and one iteration processes them all:
measured with 64 local hosts (`bench/many_hosts.py`), 27 iterations made the whole load
phase, about 800 callbacks and 50 ms of CPU each, and the lag probe woke 9 times in 2.9 s.

Each reader asks `spent()` before it handles a batch: once this iteration has done
`budget_s` of such work, the reader waits for the next iteration (`next_turn`), where it
goes first (the loop's ready queue is first in, first out), and timers run in between. The
work is the same; it is cut into iterations no longer than about the budget plus one batch.

Work that must run when it comes (the scheduling pass of a turn's submissions: placed in one
pass, in order) goes through `run`: it is not deferred, but its time counts, so the readers
after it in the same iteration wait for the next one sooner.

A producer that runs until the budget is spent and then lets the loop turn (`Pool.submit` in a
loop, `as_completed` filling its window) does so with `yield_turn`, which also lets the
readers it deferred go first. With a bare `sleep(0)` it woke ahead of them in the next
iteration (it went to sleep first), spent that iteration's budget again, and they were
deferred again: a loop of 100,000 `await pool.submit(...)` read nothing from the hosts until
it ended, no heartbeat either, so the local host was suspected after 3 s and, at 300,000,
lost after 8 s and its agent restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

# An iteration runs its budget, then the scheduling pass of what was submitted meanwhile and the
# last reader's batch, and the lag probe waits up to two iterations (its timer, then its task's
# wake-up): 128 local hosts on ci-2core, alternated, load lag p99 51 and 42 ms at 10 ms, 36 and
# 31 at 5, 35 and 23 at 3, with no loss of throughput (12,300-15,900 tasks/s).
TURN_BUDGET_S = 0.003

# `Pool.submit` places and sends the 1st, 2nd, 4th... task of a burst into an idle pool at once,
# up to this many, letting the loop turn each time; after that, once a turn's budget is spent.
# Before, the hosts waited for the whole burst: 2,400 submissions on 16 slots (h200) started the
# first task 50 ms after the first submission, where ProcessPoolExecutor's started in 7 ms.
EARLY_SENDS_UP_TO = 512


def sends_early(count: int) -> bool:
    """Whether the `count`th submission of a burst into an idle pool goes out at once."""
    return count <= EARLY_SENDS_UP_TO and count & (count - 1) == 0


class LoopTurns:
    """How long the current loop iteration has been doing budgeted work (see the module docstring)."""

    def __init__(self, budget_s: float = TURN_BUDGET_S) -> None:
        self.budget_s = budget_s
        self.deferred = 0  # batches moved to a later iteration
        self._began: float | None = None  # when this iteration's first budgeted work began
        self._waiting = 0  # readers in `next_turn` now

    def spent(self) -> bool:
        """True once this iteration has used its budget; the first call in an iteration starts it."""
        now = time.perf_counter()
        if self._began is None:
            self._began = now
            # runs first in the next iteration: everything deferred from this one comes after it
            asyncio.get_running_loop().call_soon(self._next_iteration)
            return False
        return now - self._began >= self.budget_s

    def run(self, callback: Callable[..., None], *args: Any) -> None:
        """`callback(*args)` now, its time counted in this iteration's budget."""
        self.spent()
        callback(*args)

    async def next_turn(self) -> None:
        """Wait for the next loop iteration (timers run before it)."""
        self.deferred += 1
        self._waiting += 1
        try:
            await asyncio.sleep(0)
        finally:
            self._waiting -= 1

    async def yield_turn(self) -> None:
        """Let the loop turn, and wake only once the readers deferred meanwhile have had theirs
        (see the module docstring): without touching the budget, so theirs is a fresh one."""
        await asyncio.sleep(0)
        while self._waiting:
            await asyncio.sleep(0)

    def _next_iteration(self) -> None:
        self._began = None
