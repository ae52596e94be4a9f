"""Feed-ahead through a real pool (core/feedahead.py): a chain of kept results submitted at once
goes to one slot stage behind stage, without waiting for each result to reach the coordinator,
and computes what it would have computed waiting; a producer that fails fails the stages fed
behind it, naming it. On a local agent with a CPU slot and a GPU slot running numba's CUDA
simulator (`BATUTA_REAL_GPU=1` runs them on a card), as in test_pool_gpu_values.py."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from batuta import ObjectRef, Pool, Task, TaskStatus
from batuta.runtime.future import TaskFuture
from tests.test_pool_deps import N as DEPS_N
from tests.test_pool_deps import fill, stage, two_host_pool
from tests.test_pool_gpu_values import N, gpu_pool, on_cpu, on_gpu, value

STAGES = 6


async def chain(
    pool: Pool, start: object, make: Callable[..., Task], stages: int
) -> tuple[list[TaskFuture], TaskFuture]:
    """`stages` kept stages, each scaling the one before by 2, then their total; all submitted
    in one turn of the loop, as a pipeline is, before any of them ran."""
    futures: list[TaskFuture] = []
    y = start
    for _ in range(stages):
        y = await pool.submit(make("test_scale", y, 2.0), keep=True)
        futures.append(y)
    total = await pool.submit(make("test_total", y))
    return futures, total


async def test_a_kept_gpu_chain_runs_fed_ahead_on_the_gpu_slot_and_each_stage_reads_the_one_before() -> None:
    async with gpu_pool() as pool:
        x = np.linspace(0.0, 1.0, N)
        ref = pool.put(x)
        await value(pool, on_gpu("test_scale", ref, 1.0))  # the slot imports numba.cuda and compiles
        before = pool.stats().fed_ahead
        futures, total = await chain(pool, ref, on_gpu, STAGES)
        result = await total
        assert result.is_success(), result.error
        assert result.value == (x * 2.0**STAGES).sum()
        # every stage after the first and the total were sent behind the stage making their input
        assert pool.stats().fed_ahead - before == STAGES
        results = [await f for f in futures]
        assert {r.slot for r in results} == {result.slot} and result.backend is not None
        refs = [r.value for r in results]
        assert all(isinstance(r, ObjectRef) for r in refs)
        for i, kept in enumerate(refs):  # each stage kept exactly its own value
            np.testing.assert_allclose(await pool.get(kept), x * 2.0 ** (i + 1))
        # the same chain on the CPU slot of the same host
        futures, total = await chain(pool, ref, on_cpu, 3)
        cpu = await total
        assert cpu.is_success() and cpu.value == (x * 8.0).sum() and cpu.slot != result.slot
        assert pool.stats().fed_ahead - before == STAGES + 3


async def test_a_failing_producer_fails_the_stages_fed_behind_it_naming_it_and_the_slot_goes_on() -> None:
    async with gpu_pool() as pool:
        x = np.arange(N, dtype=np.float64)
        ref = pool.put(x)
        await value(pool, on_gpu("test_scale", ref, 1.0))
        before = pool.stats().fed_ahead
        bad = await pool.submit(on_gpu("test_scale", ref, "not a number"), keep=True)
        futures, total = await chain(pool, bad, on_gpu, 2)
        # the first stage went behind it at once (a window holds two tasks at least; the others
        # follow as the window frees, or fail waiting)
        assert pool.stats().fed_ahead - before >= 1
        failed = await bad
        assert failed.status is TaskStatus.FAILED
        for future in (*futures, total):
            result = await future
            assert result.status is TaskStatus.FAILED, result
            assert result.error is not None and "was not sent" not in result.error
            assert "not on this host" not in result.error  # a slot's answer is never taken for it
        first = await futures[0]
        assert f"its producer, task {bad.task_id}, failed" in (first.error or "")
        # the slot that was to run them is fine: the same chain from a good input succeeds
        futures, total = await chain(pool, ref, on_gpu, 2)
        good = await total
        assert good.is_success() and good.value == (x * 4.0).sum()


async def test_a_stage_fed_ahead_that_also_reads_a_value_from_another_host_gets_both() -> None:
    async with two_host_pool(tags=True) as pool:
        other = await (await pool.submit(fill(5.0, requires=["on-b"]), keep=True))
        assert other.value.host == "b"
        before = pool.stats()
        made = await pool.submit(fill(3.0, requires=["on-a"]), keep=True)
        # behind `made` on host a at once; its Run waits there only for the relay of `other`
        both = await pool.submit(stage(made, 2.0, other.value, requires=["on-a"]))
        result = await both
        assert result.is_success(), result.error
        assert result.host == "a"
        np.testing.assert_array_equal(result.value, np.full(DEPS_N, 7.0))
        after = pool.stats()
        assert after.fed_ahead - before.fed_ahead == 1
        assert after.relayed_bytes - before.relayed_bytes == DEPS_N * 8  # `other` only: `made` never moved
