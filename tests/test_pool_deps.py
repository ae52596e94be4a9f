"""Results kept where they were made (`keep=True`), `pool.get` / `pool.drop` of them, and tasks
that name other tasks' futures: waiting, locality, relays, failure and lineage re-runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest

from batuta import ObjectRef, Pool, Task, TaskStatus
from batuta.core.task import Backend
from batuta.errors import TaskFailedError, UsageError
from batuta.protocol import messages as m
from batuta.runtime import events as pe
from batuta.runtime.builder import PoolConfig, local_host
from batuta.runtime.session import HostSession
from tests.test_pool import REPO, TEST_KERNELS, agent_pids, children, living

N = 300_000  # float64 elements: 2.4 MB, over the scheduler's locality threshold


def two_host_pool(slots: int = 1, tags: bool = False, **config: object) -> Pool:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    hosts = []
    for name in ("a", "b"):
        spec = local_host(slots, gpus="none", kernel_modules=[TEST_KERNELS], env=env, name=name)
        if tags:
            spec = replace(spec, tags=frozenset({f"on-{name}"}))
        hosts.append(spec)
    return Pool(hosts, PoolConfig(**config))  # type: ignore[arg-type]


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    async with two_host_pool() as p:
        yield p


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, m.Message]]:
    """Every message the coordinator queues for an agent, with the host, in order."""
    messages: list[tuple[str, m.Message]] = []
    original = HostSession.send

    def spy(self: HostSession, message: m.Message, nbytes: int = 0) -> None:
        messages.append((self.name, message))
        original(self, message, nbytes)

    monkeypatch.setattr(HostSession, "send", spy)
    return messages


def fill(value: float, n: int = N, **options: object) -> Task:
    return Task.kernel("test_fill", n, value, backend=Backend.CPU, **options)  # type: ignore[arg-type]


def stage(x: object, k: float, *extra: object, **options: object) -> Task:
    return Task.kernel("test_stage", x, k, *extra, backend=Backend.CPU, **options)  # type: ignore[arg-type]


# -- keep, get, drop ----------------------------------------------------------------------------


async def test_a_kept_result_is_a_ref_that_says_what_and_where_and_get_fetches_it(
    pool: Pool, sent: list[tuple[str, m.Message]]
) -> None:
    result = await (await pool.submit(fill(2.5), keep=True))
    assert result.is_success(), result.error
    ref = result.value
    assert isinstance(ref, ObjectRef)
    assert ref.shape == (N,) and ref.dtype == "<f8" and ref.nbytes == N * 8 and ref.host == result.host
    runs = [msg for _, msg in sent if isinstance(msg, m.Run)]
    assert runs[0].tasks[0].keep == ref.object_id
    value = await pool.get(ref)
    np.testing.assert_array_equal(value, np.full(N, 2.5))
    fetches = [(host, msg) for host, msg in sent if isinstance(msg, m.Fetch)]
    assert fetches == [(ref.host, m.Fetch(object_id=ref.object_id, request_id=fetches[0][1].request_id))]
    pool.drop(ref)
    assert (ref.host, m.Drop(object_ids=(ref.object_id,))) in sent
    with pytest.raises(UsageError, match=f"object {ref.object_id} is not in this pool"):
        await pool.get(ref)


async def test_map_keep_returns_refs_in_order(pool: Pool) -> None:
    refs = await pool.map("test_fill", [(1000, float(i)) for i in range(6)], keep=True)
    assert all(isinstance(r, ObjectRef) for r in refs)
    values = await asyncio.gather(*(pool.get(r) for r in refs))
    for i, value in enumerate(values):
        np.testing.assert_array_equal(value, np.full(1000, float(i)))


async def _host_objects_reach_zero(pool: Pool, timeout: float = 30.0) -> dict[str, int]:
    """The hosts' object counts from their heartbeats, once every host reports none (or as
    they stood when `timeout` ran out)."""
    counts: dict[str, int] = {}
    emptied = asyncio.Event()

    def on_event(event: object) -> None:
        if isinstance(event, pe.HostTelemetry):
            counts[event.host] = event.objects
            if len(counts) == len(pool.hosts()) and not any(counts.values()):
                emptied.set()

    unsubscribe = pool.subscribe(on_event)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(emptied.wait(), timeout)
    finally:
        unsubscribe()
    return counts


async def test_a_kept_task_cancelled_as_it_succeeds_leaves_no_value_on_its_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cancel resolved the task at once; the agent, which had finished it, kept the value
    and said so, and that late result was dropped as a duplicate: the value stayed on the host,
    which nobody could drop, until the pool closed."""
    original = Pool.host_messages
    racing: list[int] = []

    def cancel_first(self: Pool, session: HostSession, messages: list[m.Message]) -> None:
        for msg in messages:  # the race, made certain: the cancel is handled just before the result
            if isinstance(msg, m.Done) and any(o.task_id in racing for o in msg.results):
                self.cancel(racing.pop())
        original(self, session, messages)

    monkeypatch.setattr(Pool, "host_messages", cancel_first)
    async with two_host_pool(heartbeat_interval=0.1) as pool:
        future = await pool.submit(fill(1.0), keep=True)
        racing.append(future.task_id)
        assert (await future).status is TaskStatus.CANCELLED
        assert not any((await _host_objects_reach_zero(pool)).values())
        # a kept value that is the task's result is left alone
        ref = (await (await pool.submit(fill(2.0), keep=True))).value
        np.testing.assert_array_equal(await pool.get(ref), np.full(N, 2.0))


async def test_a_map_keep_that_fails_or_is_given_up_frees_the_values_it_kept(tmp_path: Path) -> None:
    """map(keep=True) raised on the first failure and dropped the refs of the tasks that had
    succeeded: nobody could pool.drop them, and their values stayed on the hosts (hundreds of
    MiB each, in a real map) until the pool closed."""
    async with two_host_pool(heartbeat_interval=0.1) as pool:
        items = [(N, float(i)) for i in range(12)] + [(-1, 0.0)]  # np.full(-1) raises
        with pytest.raises(TaskFailedError, match="negative dimensions"):
            await pool.map("test_fill", items, keep=True)
        assert not any((await _host_objects_reach_zero(pool)).values())
        # one given up by its caller: what it kept so far goes too
        open_gate, shut = tmp_path / "open", tmp_path / "never"
        open_gate.touch()
        finished = 0
        four_done = asyncio.Event()

        def count(event: object) -> None:
            nonlocal finished
            if isinstance(event, pe.TaskFinished):
                finished += 1
                if finished == 4:
                    four_done.set()

        pool.subscribe(count)
        gates = [(str(open_gate), i) for i in range(4)] + [(str(shut), 4)]
        mapping = asyncio.create_task(pool.map("test_gate", gates, keep=True))
        await asyncio.wait_for(four_done.wait(), 60)
        mapping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await mapping
        assert not any((await _host_objects_reach_zero(pool)).values())
        kept = await pool.map("test_fill", [(10, 1.0)], keep=True)  # a map that succeeds keeps its values
        np.testing.assert_array_equal(await pool.get(kept[0]), np.full(10, 1.0))


async def test_a_result_that_cannot_travel_fails_when_kept_and_takes_no_other_value_with_it() -> None:
    """keep=True made such a value a success; pool.get of it then ended its slot process three
    times, and a good value kept on that slot was lost with it."""
    async with two_host_pool() as pool:
        good = await (await pool.submit(Task.kernel("test_unsendable", "ok", backend=Backend.CPU), keep=True))
        assert good.is_success(), good.error
        for kind, what in (
            ("datetime", "an array of dtype '<M8[s]'"),
            ("record", "an array of dtype"),
            ("matrix", "np.asarray(x)"),
        ):
            kept = await (await pool.submit(Task.kernel("test_unsendable", kind, backend=Backend.CPU), keep=True))
            plain = await pool.run(Task.kernel("test_unsendable", kind, backend=Backend.CPU))
            assert kept.status is TaskStatus.FAILED and plain.status is TaskStatus.FAILED
            assert kept.error is not None and kept.error.startswith("the task's result cannot be kept: the value it")
            assert what in kept.error and "cannot be sent" in kept.error
        np.testing.assert_array_equal(await pool.get(good.value), np.arange(4.0))
        assert pool.stats().failed == 6


# -- tasks that feed tasks ----------------------------------------------------------------------


async def test_a_consumer_runs_where_its_kept_input_is_and_no_bytes_move(
    pool: Pool, sent: list[tuple[str, m.Message]]
) -> None:
    producers = [await pool.submit(fill(float(i)), keep=True) for i in range(8)]
    consumers = [await pool.submit(stage(p, 2.0), keep=True) for p in producers]
    finals = [await pool.submit(Task.kernel("sum", c, backend=Backend.CPU)) for c in consumers]
    for i, (p, c, f) in enumerate(zip(producers, consumers, finals, strict=True)):
        made, used, total = await p, await c, await f
        assert made.is_success() and used.is_success() and total.is_success(), (used.error, total.error)
        assert used.host == made.host and total.host == used.host  # locality, by TaskResult.host
        assert total.value == pytest.approx(N * (i * 2.0 + 1.0))
    assert {(await p).host for p in producers} == {"a", "b"}  # both hosts worked
    assert not [msg for _, msg in sent if isinstance(msg, m.Fetch)]  # nothing went through here
    assert not [msg for _, msg in sent if isinstance(msg, m.Put)]


async def test_a_future_that_is_not_kept_feeds_its_value_and_the_consumer_waits() -> None:
    async with two_host_pool() as pool:
        first = await pool.submit(Task.kernel("test_echo_after", 7, 0.2, backend=Backend.CPU))
        second = await pool.submit(Task.kernel("test_stage", np.arange(4.0), first, backend=Backend.CPU))
        assert pool.stats().waiting == 1 or first.done()  # stats(): submissions reach the scheduler
        assert pool._scheduler.where(second.task_id) == ("waiting", None) or first.done()
        result = await second
        assert result.is_success(), result.error
        np.testing.assert_array_equal(result.value, np.arange(4.0) * 7 + 1)


async def test_a_finished_future_whose_value_is_an_array_feeds_it() -> None:
    """Its array replaced the future, and submit compared the two (ValueError: the truth value
    of an array): a journaled run whose producers were restored could not be resumed."""
    async with two_host_pool() as pool:
        made = await pool.submit(Task.kernel("vadd", np.ones(4), np.ones(4), backend=Backend.CPU))
        await made
        summed = await pool.run(Task.kernel("sum", made, backend=Backend.CPU))
    assert summed.value == 8.0, summed.error


async def test_a_value_another_host_needs_is_relayed_once_through_the_coordinator(
    sent: list[tuple[str, m.Message]],
) -> None:
    async with two_host_pool(tags=True) as pool:
        ref_task = await pool.submit(
            Task.kernel("test_fill", N, 3.0, backend=Backend.CPU, requires=["on-a"]), keep=True
        )
        ref = (await ref_task).value
        assert ref.host == "a"
        uses = [
            await pool.submit(Task.kernel("test_stage", ref, float(k), backend=Backend.CPU, requires=["on-b"]))
            for k in range(3)
        ]
        for k, use in enumerate(uses):
            result = await use
            assert result.is_success(), result.error
            assert result.host == "b"
            np.testing.assert_array_equal(result.value, np.full(N, 3.0) * k + 1)
        fetches = [(host, msg) for host, msg in sent if isinstance(msg, m.Fetch)]
        puts_to_b = [msg for host, msg in sent if isinstance(msg, m.Put) and host == "b"]
        assert [host for host, _ in fetches] == ["a"] and len(puts_to_b) == 1  # once per host
        assert pool.stats().relayed_bytes == N * 8


async def test_a_relayed_value_fetched_and_written_to_changes_neither_the_next_get_nor_other_hosts() -> None:
    """`pool.get` of a kept value the coordinator had relayed returned the relay copy itself:
    a write into the fetched array (it is the caller's) changed what the next get returned
    and what a consumer on a third host computed on (wrong answers, seen over SSH at 64 MiB)."""
    async with two_host_pool(tags=True) as pool:
        made = await pool.submit(Task.kernel("test_fill", N, 3.0, backend=Backend.CPU, requires=["on-a"]), keep=True)
        ref = (await made).value
        relay = await pool.run(Task.kernel("test_stage", ref, 1.0, backend=Backend.CPU, requires=["on-b"]))
        assert relay.is_success() and relay.host == "b", relay.error
        assert pool.stats().relayed_bytes == N * 8  # held here now: what the gets below are served from
        got = await pool.get(ref)
        got[:] = -1.0  # the caller's own array
        np.testing.assert_array_equal(await pool.get(ref), np.full(N, 3.0))


async def test_a_relayed_copy_stays_in_the_coordinators_memory_until_dropped() -> None:
    """README: the copy the coordinator relays stays in its memory until `pool.drop` (once no
    unresolved task names it) or the pool closes; a finished consumer does not free it."""
    async with two_host_pool(tags=True) as pool:
        made = await pool.submit(Task.kernel("test_fill", N, 3.0, backend=Backend.CPU, requires=["on-a"]), keep=True)
        ref = (await made).value
        relay = await pool.run(Task.kernel("test_stage", ref, 1.0, backend=Backend.CPU, requires=["on-b"]))
        assert relay.is_success() and relay.host == "b", relay.error
        present, value = pool._objects.cached(ref.object_id)
        assert present and value.nbytes == N * 8  # held here after its only consumer finished
        pool.drop(ref)
        assert pool._objects.cached(ref.object_id) == (False, None)


def test_relayed_bytes_count_the_arrays_inside_a_kept_tuple_or_dict() -> None:
    """A kept tuple of arrays relayed between hosts added nothing to relayed_bytes."""
    from batuta.runtime.dataplane import _array_bytes

    a, b = np.zeros(1000), np.zeros(10, dtype=np.int8)
    assert _array_bytes(a) == 8000
    assert _array_bytes((a, [b, "text"], {"b": b, "n": 3})) == 8020


async def test_a_failed_upstream_fails_its_dependents_naming_it(pool: Pool) -> None:
    bad = await pool.submit(Task.kernel("test_raise", "boom", backend=Backend.CPU), keep=True)
    child = await pool.submit(stage(bad, 2.0))
    grandchild = await pool.submit(stage(child, 2.0))
    assert (await bad).status is TaskStatus.FAILED
    failed = await child
    assert failed.status is TaskStatus.FAILED
    assert f"task {bad.task_id}" in (failed.error or "") and "boom" in (failed.error or "")
    assert (await grandchild).status is TaskStatus.FAILED
    assert f"upstream task {child.task_id}" in ((await grandchild).error or "")
    late = await pool.submit(stage(bad, 3.0))  # naming it after it failed: fails at once
    assert (await late).status is TaskStatus.FAILED and f"upstream task {bad.task_id}" in ((await late).error or "")


async def test_a_cancelled_upstream_cancels_its_dependents(tmp_path: Path) -> None:
    async with two_host_pool() as pool:
        gate = await pool.submit(Task.kernel("test_gate", str(tmp_path / "never"), 1, 30.0, backend=Backend.CPU))
        child = await pool.submit(stage(np.ones(3), 1.0, gate))
        grandchild = await pool.submit(stage(child, 1.0))
        gate.cancel()
        assert (await gate).status is TaskStatus.CANCELLED
        result = await child
        assert result.status is TaskStatus.CANCELLED and f"upstream task {gate.task_id}" in (result.error or "")
        assert (await grandchild).status is TaskStatus.CANCELLED
        assert pool._scheduler.waiting == 0


async def test_the_dashboard_sees_waiting_tasks(tmp_path: Path) -> None:
    async with two_host_pool() as pool:
        waiting: list[tuple[int, tuple[int, ...]]] = []
        pool.subscribe(lambda e: waiting.append((e.task_id, e.waiting_on)) if isinstance(e, pe.TaskQueued) else None)
        gate_file = tmp_path / "open"
        gate = await pool.submit(Task.kernel("test_gate", str(gate_file), 1, 30.0, backend=Backend.CPU))
        child = await pool.submit(stage(np.ones(3), 1.0, gate))
        pool.stats()  # submissions reach the scheduler
        assert waiting == [(gate.task_id, ()), (child.task_id, (gate.task_id,))]
        assert pool.stats().waiting == 1
        gate_file.write_text("open")
        assert (await child).is_success()


# -- lineage ------------------------------------------------------------------------------------


def _agent_of(host: str) -> int:
    return next(p.pid for p in agent_pids() if f"--name {host}" in " ".join(p.cmdline()))


async def test_kill_9_of_a_host_holding_kept_values_reruns_their_producers(tmp_path: Path) -> None:
    async with two_host_pool(slots=2) as pool:
        fills: list[str | None] = []
        pool.subscribe(
            lambda e: (
                fills.append(e.result.host) if isinstance(e, pe.TaskFinished) and e.result.name == "test_fill" else None
            )
        )
        gate_file = tmp_path / "open"
        gate = await pool.submit(Task.kernel("test_gate", str(gate_file), 1, 60.0, backend=Backend.CPU))
        firsts = [await pool.submit(fill(float(i)), keep=True) for i in range(6)]
        made = [await f for f in firsts]
        seconds = [await pool.submit(stage(f, 2.0, gate), keep=True) for f in firsts]
        finals = [await pool.submit(Task.kernel("sum", s, backend=Backend.CPU)) for s in seconds]
        lost_host = made[0].host
        assert lost_host is not None
        os.kill(_agent_of(lost_host), signal.SIGKILL)
        down = asyncio.Event()
        pool.subscribe(lambda e: down.set() if isinstance(e, pe.HostDown) and e.host == lost_host else None)
        await asyncio.wait_for(down.wait(), 30)
        gate_file.write_text("open")
        totals = [await asyncio.wait_for(f.asyncio_future(), 120) for f in finals]
        for i, total in enumerate(totals):
            assert total.is_success(), total.error
            assert total.value == pytest.approx(N * (i * 2.0 + 1.0))  # identical to an undisturbed run
        on_lost = sum(1 for r in made if r.host == lost_host)
        assert len(fills) == 6 + on_lost  # each value lost with its host was made again, once
        rerun = await pool.get((await seconds[0]).value)
        np.testing.assert_array_equal(rerun, np.full(N, 0.0) * 2.0 + 1.0)


async def test_a_value_relayed_from_a_lost_host_is_made_again_there_and_then_relayed(tmp_path: Path) -> None:
    async with two_host_pool(tags=True) as pool:
        gate_file = tmp_path / "open"
        gate = await pool.submit(
            Task.kernel("test_gate", str(gate_file), 1, 60.0, backend=Backend.CPU, requires=["on-b"])
        )
        made = await (await pool.submit(fill(5.0, requires=["on-a"]), keep=True))
        assert made.is_success() and made.host == "a"
        use = await pool.submit(stage(made.value, 3.0, gate, requires=["on-b"]))
        down = asyncio.Event()
        pool.subscribe(lambda e: down.set() if isinstance(e, pe.HostDown) and e.host == "a" else None)
        os.kill(_agent_of("a"), signal.SIGKILL)
        await asyncio.wait_for(down.wait(), 30)
        gate_file.write_text("open")
        result = await asyncio.wait_for(use.asyncio_future(), 120)
        assert result.is_success(), result.error
        assert result.host == "b"
        np.testing.assert_array_equal(result.value, np.full(N, 5.0) * 3.0 + 1.0)


# -- kept results live in the slot process that made them ---------------------------------------


def one_host_pool(slots: int, **env: str) -> Pool:
    environ = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    host = local_host(slots, gpus="none", kernel_modules=[TEST_KERNELS], env=environ, name="solo")
    return Pool([host], PoolConfig(heartbeat_interval=0.05))


async def _telemetry_after(pool: Pool, condition: Callable[[pe.HostTelemetry], bool]) -> pe.HostTelemetry:
    """The first heartbeat report that satisfies `condition` (bounded wait)."""
    seen: asyncio.Future[pe.HostTelemetry] = asyncio.get_running_loop().create_future()

    def on_event(event: pe.PoolEvent) -> None:
        if isinstance(event, pe.HostTelemetry) and condition(event) and not seen.done():
            seen.set_result(event)

    pool.subscribe(on_event)
    return await asyncio.wait_for(seen, 30)


def _slot_process(slot: str) -> psutil.Process:
    """The live worker process of `slot` ("host/N"); slots name themselves batuta-slot-N."""
    name = f"batuta-slot-{slot.rsplit('/', 1)[1]}"

    def is_slot(proc: psutil.Process) -> bool:
        return proc.name() == name and proc.status() != psutil.STATUS_ZOMBIE

    alive = [c for a in agent_pids() for c in living(children(a), is_slot)]
    assert alive, f"no process named {name} among the agents' children"
    return alive[0]


async def test_a_chain_of_kept_values_on_one_slot_moves_no_bytes_out_of_it_until_get() -> None:
    async with one_host_pool(1) as pool:
        first = await pool.submit(fill(2.0), keep=True)
        second = await pool.submit(stage(first, 3.0), keep=True)
        third = await pool.submit(stage(second, 0.5), keep=True)
        total = await pool.run(Task.kernel("sum", third, backend=Backend.CPU))
        assert total.is_success(), total.error
        assert total.value == pytest.approx(N * ((2.0 * 3.0 + 1.0) * 0.5 + 1.0))
        report = await _telemetry_after(pool, lambda t: t.objects == 3)
        assert report.object_bytes == 3 * N * 8  # counted against the host's cap, where they are
        assert report.slot_object_bytes == 0  # not one kept byte left the slot process
        ref = (await third).value
        np.testing.assert_array_equal(await pool.get(ref), np.full(N, 4.5))  # asked of the slot
        moved = await _telemetry_after(pool, lambda t: t.slot_object_bytes > 0)
        assert moved.slot_object_bytes == N * 8  # that one value, once
        # the agent kept no copy of it (the host would hold it twice, counted once): a second
        # get asks the slot again
        np.testing.assert_array_equal(await pool.get(ref), np.full(N, 4.5))
        again = await _telemetry_after(pool, lambda t: t.slot_object_bytes > N * 8)
        assert again.slot_object_bytes == 2 * N * 8


async def test_a_consumer_on_another_slot_of_the_host_gets_the_kept_value(tmp_path: Path) -> None:
    async with one_host_pool(2) as pool:
        gate_file = tmp_path / "open"
        gate = await pool.submit(Task.kernel("test_gate", str(gate_file), 1, 60.0, backend=Backend.CPU))
        made = await pool.submit(fill(7.0), keep=True)
        assert (await made).is_success()
        # released together when the gate opens: the maker's slot takes two, the other the rest
        uses = [await pool.submit(stage(made, float(k), gate)) for k in range(4)]
        gate_file.write_text("open")
        results = [await u for u in uses]
        for k, result in enumerate(results):
            assert result.is_success(), result.error
            np.testing.assert_array_equal(result.value, np.full(N, 7.0) * k + 1.0)
        assert len({r.slot for r in results}) == 2
        handed = await _telemetry_after(pool, lambda t: t.slot_object_bytes > 0)
        assert handed.slot_object_bytes == N * 8  # handed over through the agent once


async def test_killing_the_slot_process_holding_kept_values_reruns_their_producers() -> None:
    async with one_host_pool(1) as pool:
        finished: list[str] = []
        pool.subscribe(lambda e: finished.append(e.result.name) if isinstance(e, pe.TaskFinished) else None)
        first = await pool.submit(fill(3.0), keep=True)
        second = await pool.submit(stage(first, 2.0), keep=True)
        made = await second
        assert made.is_success() and made.slot is not None
        restarted = asyncio.Event()
        pool.subscribe(lambda e: restarted.set() if isinstance(e, pe.SlotStateChanged) and e.state == "up" else None)
        _slot_process(made.slot).kill()  # the agent lives on; the values in that process do not
        await asyncio.wait_for(restarted.wait(), 30)
        total = await asyncio.wait_for(pool.run(Task.kernel("sum", second, backend=Backend.CPU)), 120)
        assert total.is_success(), total.error
        assert total.value == pytest.approx(N * (3.0 * 2.0 + 1.0))  # identical to an undisturbed run
        value = await asyncio.wait_for(pool.get((await second).value), 60)
        np.testing.assert_array_equal(value, np.full(N, 7.0))
        assert finished.count("test_fill") == 2 and finished.count("test_stage") == 2  # each made again once


async def test_get_of_a_value_whose_slot_died_waits_for_it_to_be_made_again() -> None:
    async with one_host_pool(1) as pool:
        made = await (await pool.submit(fill(4.0), keep=True))
        assert made.is_success() and made.slot is not None
        _slot_process(made.slot).kill()
        value = await asyncio.wait_for(pool.get(made.value), 60)  # fails over to lineage, never hangs
        np.testing.assert_array_equal(value, np.full(N, 4.0))


async def test_a_kept_task_that_fails_or_is_cancelled_leaves_nothing_in_the_object_table(tmp_path: Path) -> None:
    """Its future resolved to no ref, so nothing could pool.drop the object the table made for
    it: one entry stayed per such task until the pool closed (a map dropped its own; a plain
    submit did not)."""
    async with two_host_pool() as pool:
        bad = await pool.submit(Task.kernel("test_raise", "boom", backend=Backend.CPU), keep=True)
        child = await pool.submit(stage(bad, 2.0))  # names it while it runs: its entry waits for this one
        assert (await bad).status is TaskStatus.FAILED
        assert (await child).status is TaskStatus.FAILED
        gate = await pool.submit(Task.kernel("test_gate", str(tmp_path / "never"), 1, 30.0), keep=True)
        gate.cancel()
        assert (await gate).status is TaskStatus.CANCELLED
        assert pool._objects.stats() == (0, 0)
        late = await pool.submit(stage(bad, 3.0))  # naming it after it failed still says why
        assert (await late).status is TaskStatus.FAILED and f"upstream task {bad.task_id}" in ((await late).error or "")
        ref = (await (await pool.submit(fill(2.0, 10), keep=True))).value  # a kept value made stays
        assert pool._objects.stats() == (1, 0)
        np.testing.assert_array_equal(await pool.get(ref), np.full(10, 2.0))
