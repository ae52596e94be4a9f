"""Many hosts: launches (SSH connections) are opened in parallel, at most `max_parallel_starts`
at once, and every host is still launched; start-up waits for a slow one at most `start_wait`
seconds after another is up, and it joins when it answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import replace

import pytest

from batuta import Task
from batuta.errors import TransportError
from batuta.runtime import events as pe
from batuta.runtime.builder import PoolConfig, local_host
from batuta.runtime.cluster import parse_cluster
from batuta.runtime.future import TaskFuture
from batuta.runtime.pool import Pool
from batuta.runtime.session import HostSpec
from batuta.runtime.stream import FILL_TURN
from batuta.runtime.turns import LoopTurns
from batuta.transport.base import ByteStream


class Unreachable(TransportError):
    retryable = False  # retired at once: each host is launched exactly once here


class LaunchCounter:
    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.launched: list[str] = []

    def spec(self, name: str) -> HostSpec:
        async def launch() -> ByteStream:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.launched.append(name)
            try:
                for _ in range(5):  # stay in flight for a few loop turns, as a connection would
                    await _yield()
            finally:
                self.in_flight -= 1
            raise Unreachable(f"host {name}: unreachable (test)")

        return HostSpec(name=name, launch=launch)


async def _yield() -> None:
    await asyncio.sleep(0)


async def test_hosts_start_in_parallel_within_the_bound() -> None:
    for limit, expected in ((3, 3), (64, 12)):
        counter = LaunchCounter()
        specs = [*(counter.spec(f"h{i}") for i in range(12)), local_host(1, gpus="none", name="real")]
        async with Pool(specs, PoolConfig(max_parallel_starts=limit)) as pool:
            assert (await pool.run(Task.kernel("noop", 1))).value == 1
            assert sorted(counter.launched) == sorted(f"h{i}" for i in range(12))
            assert counter.most == expected
            assert {h.name for h in pool.hosts() if h.state == "retired"} == {f"h{i}" for i in range(12)}


def test_the_cluster_file_sets_the_bound() -> None:
    text = '[pool]\nmax_parallel_starts = 8\n[[hosts]]\nname = "a"\naddress = "10.0.0.1"\n'
    assert parse_cluster(text).pool.max_parallel_starts == 8
    assert parse_cluster(text.replace("max_parallel_starts = 8", "start_wait = 0")).pool.start_wait == 0
    assert parse_cluster(text.replace("max_parallel_starts = 8", "start_wait = inf")).pool.start_wait == math.inf


def gated(spec: HostSpec, gate: asyncio.Event) -> HostSpec:
    """`spec`, whose launch waits for `gate`: a host slow to answer (an SSH connect, an install)."""

    async def launch() -> ByteStream:
        await gate.wait()
        return await spec.launch()

    return replace(spec, launch=launch)


async def test_start_up_goes_on_after_start_wait_and_a_late_host_joins(caplog: pytest.LogCaptureFixture) -> None:
    gate = asyncio.Event()
    specs = [local_host(1, gpus="none", name="quick"), gated(local_host(1, gpus="none", name="slow"), gate)]
    async with Pool(specs, PoolConfig(start_wait=0)) as pool:
        states: list[tuple[str, str, str]] = []
        pool.subscribe(
            lambda e: states.append((e.host, e.state, e.reason)) if isinstance(e, pe.HostStateChanged) else None
        )
        assert {h.name: h.state for h in pool.hosts()} == {"quick": "up", "slow": "starting"}
        said = [
            r.getMessage() for r in caplog.records if r.name == "batuta.runtime.hosts" and r.levelno == logging.WARNING
        ]
        assert said == ["start-up goes on with 1 of 2 hosts up; slow joins when it answers (start_wait in [pool])"]
        assert (await pool.run(Task.kernel("noop", 1))).host == "quick"
        joined = asyncio.Event()
        pool.subscribe(lambda e: joined.set() if isinstance(e, pe.HostUp) and e.host == "slow" else None)
        gate.set()
        await asyncio.wait_for(joined.wait(), 60)
        assert {h.name: h.state for h in pool.hosts()} == {"quick": "up", "slow": "up"}
        # both slots busy at once: the late host takes its share
        results = await asyncio.gather(*(pool.run(Task.kernel("spin", 0.2)) for _ in range(4)))
        assert {r.host for r in results} == {"quick", "slow"}


async def test_start_up_waits_for_every_host_with_start_wait_inf() -> None:
    gate = asyncio.Event()
    specs = [local_host(1, gpus="none", name="quick"), gated(local_host(1, gpus="none", name="slow"), gate)]
    pool = Pool.builder().no_local().hosts(specs).start_wait(math.inf).build()
    entered = asyncio.create_task(pool.__aenter__())
    seen = asyncio.Event()
    pool.subscribe(lambda e: seen.set() if isinstance(e, pe.HostUp) and e.host == "quick" else None)
    await asyncio.wait_for(seen.wait(), 60)
    assert not entered.done()  # one host up, the other not yet: start-up still waits
    gate.set()
    try:
        await asyncio.wait_for(entered, 60)
        assert {h.name: h.state for h in pool.hosts()} == {"quick": "up", "slow": "up"}
    finally:
        await pool.__aexit__(None, None, None)


async def test_filling_a_large_window_gives_the_loop_turns() -> None:
    """With hundreds of slots the default window is tens of thousands of tasks: filling it
    must not hold the loop (heartbeats, results) for the whole burst."""
    async with Pool.local(1, gpu_workers="none") as pool:
        queued: list[int] = []
        pool.subscribe(lambda event: queued.append(1) if isinstance(event, pe.TaskQueued) else None)
        seen_at: list[int] = []
        asyncio.get_running_loop().call_soon(lambda: seen_at.append(len(queued)))
        tasks = (Task.kernel("noop", i) for i in range(3 * FILL_TURN))
        async with contextlib.aclosing(pool.as_completed(tasks, window=3 * FILL_TURN)) as finished:
            values = [future.result().value async for future in finished]
        assert sorted(values) == list(range(3 * FILL_TURN))
        # the loop's turn came after at most one turn's worth (sooner if the iteration's
        # budget ran out first: runtime/turns.py), not after all of them
        assert len(seen_at) == 1 and 1 <= seen_at[0] <= FILL_TURN


async def test_budgeted_work_is_cut_into_loop_iterations() -> None:
    """Readers that find the iteration's budget spent wait for the next one, in order, so
    timers run between them: here a budget of nothing lets one reader through per iteration
    (bench/many_hosts.py: 27 iterations of about 800 callbacks made a whole load phase)."""
    loop = asyncio.get_running_loop()
    turns = LoopTurns(budget_s=0.0)
    iteration = 0
    ticking = True

    def tick() -> None:  # once per loop iteration, as a timer would get its chance
        nonlocal iteration
        iteration += 1
        if ticking:
            loop.call_soon(tick)

    handled: list[tuple[str, int]] = []

    async def reader(name: str) -> None:
        while turns.spent():
            await turns.next_turn()
        handled.append((name, iteration))

    loop.call_soon(tick)
    await asyncio.gather(*(reader(name) for name in "abc"))
    ticking = False
    names = [name for name, _ in handled]
    at = [when for _, when in handled]
    assert names == ["a", "b", "c"]
    assert at[1] == at[0] + 1 and at[2] == at[1] + 1  # one per iteration, the loop ticking between
    assert turns.deferred == 3  # b waited one iteration, c two


async def test_a_loop_of_submits_lets_the_readers_it_deferred_go_first() -> None:
    """`await pool.submit(...)` in a loop lets the loop turn once the iteration's budget is
    spent. It woke ahead of the hosts' readers that the budget had deferred, spent the next
    iteration's budget, and deferred them again: nothing was read from the hosts until the loop
    ended (100,000 submissions: the local host suspected; 300,000: lost, its agent restarted).
    Here a budget of nothing turns the loop after every submission."""
    limit = 10_000
    async with Pool.local(1, gpu_workers="none", max_queued=limit) as pool:
        pool._turns.budget_s = 0.0
        done: list[int] = []
        futures: list[TaskFuture] = []
        while not done and len(futures) < limit:  # the limit: never waiting for room, which reads
            future = await pool.submit(Task.kernel("noop", len(futures)))
            future.add_done_callback(lambda f: done.append(f.task_id))
            futures.append(future)
        assert len(futures) < limit  # a result was read while the loop went on
        assert [(await f).value for f in futures] == list(range(len(futures)))


async def test_the_scheduling_pass_of_a_turns_submissions_counts_in_the_budget() -> None:
    """The pass that places a turn's submissions must run when it comes, but its time is the
    iteration's too: a reader after it in the same iteration finds the budget spent (here a
    budget of nothing), not a fresh one."""
    async with Pool.local(1, gpu_workers="none") as pool:
        pool._turns.budget_s = 0.0
        seen: list[bool] = []
        future = pool.submit_nowait(Task.kernel("noop", 1))  # its pass runs at the next iteration
        asyncio.get_running_loop().call_soon(lambda: seen.append(pool._turns.spent()))  # after the pass
        assert (await future).value == 1
        assert seen == [True]


async def test_hosts_that_join_later_do_not_hold_the_start() -> None:
    """An allocation's nodes (`joins_later`): the pool starts with its other hosts, and each
    joins when its launch returns."""
    gate = asyncio.Event()
    node = local_host(1, gpus="none", name="node-0")

    async def launch_when_started() -> ByteStream:
        await gate.wait()  # the node's job has not started yet
        stream: ByteStream = await node.launch()
        return stream

    joiner = HostSpec(name="node-0", launch=launch_when_started, joins_later=True)
    pool = Pool([local_host(1, gpus="none", name="here"), joiner])
    up: list[str] = []
    joined = asyncio.Event()

    def on_event(event: pe.PoolEvent) -> None:
        if isinstance(event, pe.HostUp):
            up.append(event.host)
            if event.host == "node-0":
                joined.set()

    pool.subscribe(on_event)
    async with pool:
        assert up == ["here"]
        assert (await pool.run(Task.kernel("noop", 1))).host == "here"
        gate.set()
        async with asyncio.timeout(60):
            await joined.wait()
        assert {h.name: h.state for h in pool.hosts()} == {"here": "up", "node-0": "up"}


@contextlib.contextmanager
def said_by_hosts(message: str) -> Iterator[asyncio.Event]:
    """An event set when batuta.runtime.hosts logs exactly `message`."""
    said = asyncio.Event()

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == message:
                said.set()

    heard = Heard()
    logging.getLogger("batuta.runtime.hosts").addHandler(heard)
    try:
        yield said
    finally:
        logging.getLogger("batuta.runtime.hosts").removeHandler(heard)


async def test_start_up_waits_past_start_wait_for_a_host_installing_batuta(caplog: pytest.LogCaptureFixture) -> None:
    """A bootstrap host went on installing after start_wait; a short run then ended, stopping
    the install, and every next run found the host without batuta again."""
    gate = asyncio.Event()
    slow = replace(gated(local_host(1, gpus="none", name="slow"), gate), installing=lambda: not gate.is_set())
    pool = Pool([local_host(1, gpus="none", name="quick"), slow], PoolConfig(start_wait=0))
    entered = asyncio.create_task(pool.__aenter__())
    waits = "start-up waits for slow while batuta installs there (bootstrap = true)"
    try:
        with said_by_hosts(waits) as said:
            await asyncio.wait_for(said.wait(), 60)  # quick is up, start_wait is over: it says why it waits
        assert not entered.done()
        gate.set()
        await asyncio.wait_for(entered, 60)
        assert {h.name: h.state for h in pool.hosts()} == {"quick": "up", "slow": "up"}
    finally:
        await pool.__aexit__(None, None, None)


async def test_a_run_that_ends_waits_for_an_install_that_began_after_start_up() -> None:
    """A host whose install began after start_wait (its connect was slow) was not waited for:
    a short run ended first and stopped the install, and so did every next short run."""
    gate = asyncio.Event()
    began = False
    slow = replace(gated(local_host(1, gpus="none", name="slow"), gate), installing=lambda: began and not gate.is_set())
    pool = Pool([local_host(1, gpus="none", name="quick"), slow], PoolConfig(start_wait=0))
    waits = (
        "the run has ended; waiting for batuta to finish installing on slow, so that the next run finds it there "
        "(Ctrl-C stops the install)"
    )
    up: list[str] = []
    pool.subscribe(lambda e: up.append(e.host) if isinstance(e, pe.HostUp) else None)
    with said_by_hosts(waits) as said:
        async with asyncio.timeout(60):
            await pool.__aenter__()  # slow is not installing yet: start-up goes on without it
            assert (await pool.run(Task.kernel("noop", 1))).host == "quick"
            began = True  # its install is under way now
            closing = asyncio.create_task(pool.__aexit__(None, None, None))
            await said.wait()
            assert not closing.done()
            gate.set()  # the install ends: the host comes up, then the pool closes
            await closing
    assert up == ["quick", "slow"]  # the install was not stopped: slow came up before the pool closed
