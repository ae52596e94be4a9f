"""`Pool.as_completed`: long task lists streamed with bounded memory, on real local agents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from batuta import Pool, Task, TaskStatus
from batuta.errors import UsageError
from batuta.runtime import events as pe
from batuta.runtime.stream import MIN_WINDOW, default_window
from tests.test_pool import make_pool


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    async with make_pool() as p:
        yield p


class UnresolvedHighWater:
    """Largest number of tasks queued but not yet finished, as the pool's events tell it."""

    def __init__(self, pool: Pool) -> None:
        self.unresolved = 0
        self.high_water = 0
        self.unsubscribe = pool.subscribe(self._on_event)

    def _on_event(self, event: pe.PoolEvent) -> None:
        if isinstance(event, pe.TaskQueued):
            self.unresolved += 1
            self.high_water = max(self.high_water, self.unresolved)
        elif isinstance(event, pe.TaskFinished):
            self.unresolved -= 1


async def test_every_task_comes_back_once_with_at_most_window_unresolved(pool: Pool) -> None:
    pulled = 0

    def tasks() -> Iterator[Task]:
        nonlocal pulled
        for index in range(500):
            pulled += 1
            yield Task.kernel("noop", index)

    watch = UnresolvedHighWater(pool)
    values = []
    async for future in pool.as_completed(tasks(), window=16):
        assert future.done() and future.result().status is TaskStatus.SUCCEEDED
        values.append(future.result().value)
    watch.unsubscribe()
    assert sorted(values) == list(range(500))
    assert pulled == 500
    assert 1 <= watch.high_water <= 16


async def test_the_source_is_pulled_lazily(pool: Pool) -> None:
    pulled = 0

    def endless() -> Iterator[Task]:
        nonlocal pulled
        while True:
            pulled += 1
            yield Task.kernel("noop", pulled)

    async with contextlib.aclosing(pool.as_completed(endless(), window=8)) as finished:
        async for _future in finished:
            break
    assert pulled <= 8


async def test_leaving_early_cancels_the_unresolved_and_submits_no_more(pool: Pool) -> None:
    pulled = 0

    def tasks() -> Iterator[Task]:
        nonlocal pulled
        pulled += 1
        yield Task.kernel("noop", 0)
        for index in range(1, 10):
            pulled += 1
            yield Task.kernel("test_echo_after", index, 60.0)

    cancelled: set[int] = set()
    all_cancelled = asyncio.Event()

    def on_event(event: pe.PoolEvent) -> None:
        if isinstance(event, pe.TaskFinished) and event.result.status is TaskStatus.CANCELLED:
            cancelled.add(event.result.task_id)
            if len(cancelled) == 2:
                all_cancelled.set()

    unsubscribe = pool.subscribe(on_event)
    async with contextlib.aclosing(pool.as_completed(tasks(), window=3)) as finished:
        async for future in finished:
            assert future.result().value == 0
            break
    await asyncio.wait_for(all_cancelled.wait(), timeout=30)
    unsubscribe()
    assert pulled == 3
    assert len(cancelled) == 2
    assert pool.stats().queued == 0


async def test_an_empty_source_yields_nothing(pool: Pool) -> None:
    assert [f async for f in pool.as_completed([])] == []


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
async def test_a_bad_window_is_a_usage_error(pool: Pool, window: object) -> None:
    with pytest.raises(UsageError, match="window must be a positive integer"):
        async for _ in pool.as_completed([Task.kernel("noop", 1)], window=window):  # type: ignore[arg-type]
            pass


async def test_a_non_task_in_the_source_is_a_usage_error_and_earlier_results_survive(pool: Pool) -> None:
    seen = []
    source: list[Task] = [Task.kernel("noop", 1), "not a task"]  # type: ignore[list-item]  # on purpose
    with pytest.raises(UsageError, match=r"batuta\.Task"):
        async for future in pool.as_completed(source, window=1):
            seen.append(future.result().value)
    assert seen == [1]


async def test_the_default_window_fills_every_slot(pool: Pool) -> None:
    config = pool.config.scheduler
    assert default_window(pool) == max(MIN_WINDOW, 4 * pool.slot_count * config.max_window)
    values = [f.result().value async for f in pool.as_completed(Task.kernel("noop", i) for i in range(50))]
    assert sorted(values) == list(range(50))
