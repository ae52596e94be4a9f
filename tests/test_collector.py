"""The coordinator's collector policy (runtime/collector.py): held while a pool is up, given
back when the last pool closes, never applied over the user's own settings; and a pool's
steady work leaves no cyclic garbage for a full collection to find."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest

from batuta import Task
from batuta.runtime import collector
from batuta.runtime import events as pe
from batuta.runtime.pool import Pool


@pytest.fixture(autouse=True)
def interpreter_defaults() -> Iterator[None]:
    """Each test starts from CPython's own settings and leaves the process as it found it."""
    was_enabled, thresholds = gc.isenabled(), gc.get_threshold()
    gc.enable()
    gc.set_threshold(*collector.DEFAULT_THRESHOLDS)
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        (gc.enable if was_enabled else gc.disable)()


def server_thresholds() -> tuple[int, int, int]:
    _young, middle, old = collector.DEFAULT_THRESHOLDS
    return (collector.YOUNG_THRESHOLD, middle, old)


async def test_the_policy_is_held_while_the_pool_is_up_and_given_back() -> None:
    async with Pool.local(1, gpu_workers="none") as pool:
        assert (await pool.run(Task.kernel("noop", 1))).value == 1
        assert gc.get_threshold() == server_thresholds()
        assert gc.get_freeze_count() > 0  # the start-up heap
        assert collector.POLICY.holders == 1
    assert gc.get_threshold() == collector.DEFAULT_THRESHOLDS
    assert gc.get_freeze_count() == 0
    assert collector.POLICY.holders == 0


async def test_overlapping_pools_give_it_back_with_the_last() -> None:
    async with Pool.local(1, gpu_workers="none"):
        async with Pool.local(1, gpu_workers="none"):
            assert collector.POLICY.holders == 2
        assert gc.get_threshold() == server_thresholds()
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == collector.DEFAULT_THRESHOLDS
    assert gc.get_freeze_count() == 0


async def test_a_disabled_collector_is_left_alone() -> None:
    gc.disable()
    async with Pool.local(1, gpu_workers="none") as pool:
        assert (await pool.run(Task.kernel("noop", 1))).value == 1
        assert not gc.isenabled()
        assert gc.get_threshold() == collector.DEFAULT_THRESHOLDS
        assert gc.get_freeze_count() == 0
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0


async def test_the_users_own_thresholds_are_left_alone() -> None:
    gc.set_threshold(5_000, 20, 20)
    async with Pool.local(1, gpu_workers="none") as pool:
        assert (await pool.run(Task.kernel("noop", 1))).value == 1
        assert gc.get_threshold() == (5_000, 20, 20)
        assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (5_000, 20, 20)


async def test_thresholds_the_user_set_meanwhile_are_kept_at_close() -> None:
    async with Pool.local(1, gpu_workers="none"):
        gc.set_threshold(3_000, 10, 10)
    assert gc.get_threshold() == (3_000, 10, 10)
    assert gc.get_freeze_count() == 0


async def test_a_pools_load_leaves_no_cyclic_garbage() -> None:
    """What the policy relies on: every task's objects, messages and events die by reference
    count, so freezing the heap and rarer collections leak nothing of the pool's."""
    async with Pool.local(2, gpu_workers="none") as pool:
        events: list[int] = []
        pool.subscribe(lambda event: events.append(1) if isinstance(event, pe.TaskFinished) else None)
        await pool.map("noop", list(range(50)))  # warm: slots forked, code paths imported
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # unreachable objects go to gc.garbage instead of being freed
        try:
            tasks = (Task.kernel("noop", i) for i in range(500))
            async with contextlib.aclosing(pool.as_completed(tasks)) as finished:
                values = [future.result().value async for future in finished]
            await pool.map("noop", list(range(100)))
            gc.collect()
            garbage = sorted({f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert sorted(values) == list(range(500))
        assert len(events) >= 600
        assert garbage == []
