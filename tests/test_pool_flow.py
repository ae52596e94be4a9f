"""Closing as a state transition, and flow control towards hosts that stop reading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import numpy as np
import psutil
import pytest

from batuta import Pool, Task, TaskResult, TaskStatus
from batuta.core.scheduler import SchedulerConfig
from batuta.runtime import events as pe
from tests.test_pool import agent_pids

WAIT_S = 60.0


async def wait_until(condition: object, what: str, timeout: float = WAIT_S) -> None:
    """Poll `condition()` on the loop until it holds (bounded in time), yielding in between."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_closing_while_results_stream_in_is_clean(caplog: pytest.LogCaptureFixture) -> None:
    """Close used to resolve the pending tasks behind the scheduler's back; the next result
    then made it send a task no longer pending (KeyError in the host reader, logged)."""
    caplog.set_level(logging.WARNING, logger="batuta")
    finished: list[int] = []
    pool = Pool.builder().cpu_workers(2).gpu_workers("none").build()
    await pool.start()
    pool.subscribe(lambda e: finished.append(e.result.task_id) if isinstance(e, pe.TaskFinished) else None)
    futures = [await pool.submit(Task.kernel("noop", i)) for i in range(20_000)]
    await futures[200]  # results are streaming in
    await pool.close()
    statuses = {f.result().status for f in futures}
    assert statuses <= {TaskStatus.SUCCEEDED, TaskStatus.CANCELLED} and TaskStatus.CANCELLED in statuses
    assert sorted(finished) == sorted(f.task_id for f in futures)  # each resolved exactly once
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    for future in futures:
        if future.result().status is TaskStatus.SUCCEEDED:
            assert future.result().value == futures.index(future)


@pytest.mark.slow
async def test_a_host_that_stops_reading_bounds_what_the_coordinator_holds() -> None:
    """A stopped agent reads nothing: the session stops writing at its high-water mark and
    submissions wait at the send budget, instead of encoding everything for the pipe."""
    high_water, budget, size = 1 << 20, 1 << 19, 1 << 19  # 512 KiB arguments
    window = SchedulerConfig(initial_window=64, min_window=64, max_window=64)
    pool = (
        Pool.builder()
        .cpu_workers(2)
        .gpu_workers("none")
        .scheduler(window)
        .flow_control(high_water=high_water, budget=budget)
        .liveness(suspect_after=120.0, lost_after=240.0)
        .build()
    )
    async with pool:
        assert (await pool.run(Task.kernel("noop", 1))).value == 1
        (agent,) = agent_pids()
        session = pool._hosts.sessions["local"]
        submitted: list[asyncio.Future[TaskResult]] = []

        async def submit_all() -> None:
            for i in range(400):  # 200 MiB of arguments if nothing pushed back
                future = await pool.submit(Task.kernel("sum", np.full(size // 8, float(i))))
                submitted.append(future.asyncio_future())

        agent.send_signal(signal.SIGSTOP)
        try:
            submitter = asyncio.create_task(submit_all())
            await wait_until(lambda: session.congested, "the session to wait for its host")
            await wait_until(lambda: not submitter.done() and pool._over_budget(), "submissions to wait")
            for _ in range(20):  # whatever runs meanwhile: nothing more is written, nothing submitted
                await asyncio.sleep(0)
            held = len(submitted)
            assert session.unflushed_bytes <= high_water + size + 4096
            assert held <= 2 * 64 + 2, f"{held} tasks were accepted while the host read nothing"
        finally:
            agent.send_signal(signal.SIGCONT)
        await asyncio.wait_for(submitter, WAIT_S)
        results = await asyncio.wait_for(asyncio.gather(*submitted), WAIT_S)
        assert [r.value for r in results] == [float(i) * (size // 8) for i in range(400)]
        assert pool._budget.congested_bytes == 0


async def test_an_unexpected_error_while_sending_loses_the_host_instead_of_hanging_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream that raised something unforeseen (asyncssh's ValueError on an array) left the
    session's writer stalled: the task never ran and never failed. Now the host is lost, its
    tasks requeued, its agent relaunched, and the task runs."""
    from batuta.transport.local import LocalStream

    pool = Pool.builder().cpu_workers(1).gpu_workers("none").build()
    async with pool:
        assert (await pool.run(Task.kernel("noop", 1))).value == 1
        downs: list[pe.HostDown] = []
        pool.subscribe(lambda e: downs.append(e) if isinstance(e, pe.HostDown) else None)
        write_parts = LocalStream.write_parts
        raised: list[bool] = []

        def once(self: LocalStream, parts: object) -> None:
            if not raised:
                raised.append(True)
                raise ValueError("The truth value of an array is ambiguous")
            write_parts(self, parts)  # type: ignore[arg-type]

        monkeypatch.setattr(LocalStream, "write_parts", once)
        result = await asyncio.wait_for(pool.run(Task.kernel("noop", 2)), WAIT_S)
    assert result.status is TaskStatus.SUCCEEDED and result.value == 2
    assert raised == [True]
    assert any("ValueError: The truth value of an array is ambiguous" in down.reason for down in downs)


def test_a_start_cancelled_as_the_agent_launches_ends_it_before_the_loop_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C in the first milliseconds of `async with pool:` cancelled the hosts' starts and
    went on without waiting for them: asyncio.run then closed its loop while a cancelled launch
    was still ending its agent, which was left running past asyncio.run, and asyncio's child
    watcher said "Loop ... that handles pid N is closed" on the console. The cancel lands
    after each number of loop turns in turn, so that one lands inside the agent's launch."""
    caplog.set_level(logging.WARNING, logger="asyncio")

    async def start_then_cancel(turns: int) -> None:
        pool = Pool.local(1)
        starting = asyncio.ensure_future(pool.start())
        for _ in range(turns):
            await asyncio.sleep(0)
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await pool.close()

    before = {p.pid for p in psutil.Process().children()}
    for turns in range(16):
        asyncio.run(start_then_cancel(turns))
        left = [p for p in psutil.Process().children() if p.pid not in before]
        for thread in threading.enumerate():  # asyncio's child watcher: it logs as it reaps
            if thread.name.startswith("waitpid-"):
                thread.join(10)
        assert not left, f"cancelled after {turns} loop turns: {left} outlived asyncio.run"
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]
