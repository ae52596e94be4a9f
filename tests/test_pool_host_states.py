"""What `Pool.hosts()` and the host events say about a host the scheduler holds, on a real
local agent: drained by request, unfit, and a mark lifted."""

from __future__ import annotations

import asyncio

from batuta import Task, TaskStatus
from batuta.runtime import events as pe
from tests.test_pool import make_pool

WAIT_S = 60.0


async def test_pool_hosts_says_draining_then_drained_as_the_events_do_and_up_after_the_undo() -> None:
    """`pool.hosts()` said "up" (the agent's liveness) for a host drained by request, while
    the log and the dashboard said "draining" and "drained": a script draining hosts could not
    tell when one was done."""
    said: list[tuple[str, str]] = []
    async with asyncio.timeout(WAIT_S), make_pool(slots=1) as pool:
        pool.subscribe(lambda e: said.append((e.state, e.reason)) if isinstance(e, pe.HostStateChanged) else None)
        started = asyncio.Event()
        pool.subscribe(lambda e: started.set() if isinstance(e, pe.TaskStarted) else None)
        running = await pool.submit(Task.kernel("spin", 30.0))
        await started.wait()
        pool.drain("local")
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "draining")]
        assert running.cancel()
        assert (await running).status is TaskStatus.CANCELLED
        async with asyncio.timeout(WAIT_S):
            while said[-1][0] != "drained":
                await asyncio.sleep(0.01)  # a bounded poll while the loop serves the agent
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "drained")]
        pool.drain("local", undo=True)
        assert [(v.name, v.state) for v in pool.hosts()] == [("local", "up")]
        assert (await pool.run(Task.kernel("noop", 3))).value == 3
    assert [state for state, _ in said] == ["draining", "drained", "up"]
