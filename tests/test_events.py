"""The pool's event bus (`pool.subscribe`): what a subscriber that raises costs the others and the console."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from batuta import Pool, Task
from batuta.runtime import events as pe


def queued(task_id: int) -> pe.TaskQueued:
    return pe.TaskQueued(task_id=task_id, name="k", backend="cpu", at=0.0)


def test_a_subscriber_that_keeps_raising_is_logged_once_per_failure_not_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A progress callback with a bug (`event.result` on every event) wrote a traceback for
    each task queued: 21,000 tracebacks, 170,000 lines, for a map of 20,000 tasks."""
    caplog.set_level(logging.DEBUG, logger="batuta.runtime.events")
    bus = pe.EventBus()
    seen: list[pe.PoolEvent] = []

    def buggy(event: pe.PoolEvent) -> None:
        if isinstance(event, pe.TaskQueued) and event.task_id % 2:
            raise KeyError(event.task_id)
        print(event.result)  # type: ignore[union-attr]  # AttributeError on every event but TaskFinished

    bus.subscribe(buggy)
    bus.subscribe(seen.append)
    for task_id in range(1000):
        bus.publish(queued(task_id))
    assert len(seen) == 1000  # the others still see every event
    assert bus.errors == 1000  # every failure is counted
    records = [r for r in caplog.records if r.name == "batuta.runtime.events"]
    # one traceback for each way it fails (here two), saying that the rest are only counted
    assert sorted(type(r.exc_info[1]).__name__ for r in records if r.exc_info) == ["AttributeError", "KeyError"]
    assert len(records) == 2
    assert all("counted, not logged" in r.getMessage() and "pool.events.errors" in r.getMessage() for r in records)


async def test_a_pool_whose_subscriber_raises_runs_its_tasks() -> None:
    async with Pool.local(1) as pool:

        def buggy(event: pe.PoolEvent) -> None:
            raise ZeroDivisionError(type(event).__name__)

        pool.subscribe(buggy)
        assert await pool.map("sum", [np.arange(4.0)] * 50) == [6.0] * 50
        assert (await pool.run(Task.kernel("sum", np.arange(3.0)))).value == 3.0
        assert pool.events.errors > 0
