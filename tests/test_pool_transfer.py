"""Large values through a local pool: streamed puts, arguments and results (protocol/chunks.py).

A memory-mapped `.npy` is put and used; a large result streams back while a small task
overtakes it; and the link is cut (the agent SIGKILLed) while a value streams either way:
the session frees what was half received, forgets what was half sent, and the task runs
again on the relaunched agent with the right value. Waits are bounded polls of the session's
own counters (what it is receiving or sending), never sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batuta import Pool, Task, TaskStatus
from batuta.protocol.chunks import DEFAULT_CHUNK_BYTES, DEFAULT_STREAM_MIN_BYTES
from batuta.runtime.builder import PoolConfig, local_host
from batuta.runtime.events import HostStateChanged
from batuta.runtime.session import HostSession
from tests.test_pool import REPO, agent_pids

KERNELS = "tests.support.transfer_kernels"
WAIT_S = 120.0  # a loaded 2-core box moving hundreds of megabytes through pipes


def make_pool(slots: int = 2, **config: Any) -> Pool:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(slots, gpus="none", kernel_modules=[KERNELS], env=env)
    return Pool([host], PoolConfig(**config))


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    async with make_pool(relaunch_backoff=0.1) as p:
        yield p


def session_of(pool: Pool) -> HostSession:
    (session,) = pool._hosts.sessions.values()
    return session


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll `condition` (bounded) while the loop keeps serving the sessions."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)
    assert condition(), what


async def test_a_memory_mapped_npy_is_put_and_used(pool: Pool, tmp_path: Path) -> None:
    count = DEFAULT_STREAM_MIN_BYTES // 8 + 4096  # just over the streaming threshold
    path = tmp_path / "values.npy"
    np.save(path, np.arange(count, dtype=np.float64))
    mapped = np.load(path, mmap_mode="r")
    ref = pool.put(mapped)
    assert (ref.nbytes, ref.shape, ref.dtype) == (mapped.nbytes, (count,), "<f8")  # the array's, as a kept ref's
    result = await asyncio.wait_for(pool.run(Task.kernel("test_fingerprint", ref)), WAIT_S)
    assert result.is_success(), result.error
    assert result.value == ("<f8", (count,), float(count * (count - 1) // 2), float(count - 1))


async def test_a_large_result_streams_back_while_a_small_task_overtakes_it(pool: Pool) -> None:
    count = 12 * DEFAULT_STREAM_MIN_BYTES // 8  # a few hundred MB: long enough to overtake
    session = session_of(pool)
    big = await pool.submit(Task.kernel("test_arange", count))
    await until(lambda: session.receiving_bytes > 0, "the result began streaming")
    small = await asyncio.wait_for(pool.run(Task.kernel("noop", 7)), WAIT_S)
    overtook = not big.done()
    result = await asyncio.wait_for(big, WAIT_S)
    assert small.value == 7 and overtook
    assert result.is_success(), result.error
    assert result.value.shape == (count,) and result.value[-1] == count - 1
    assert np.array_equal(result.value[:: 1 << 16], np.arange(0, count, 1 << 16, dtype=np.float64))
    assert session.receiving_bytes == 0


async def test_a_link_cut_while_a_result_streams_frees_it_and_the_task_runs_again(pool: Pool) -> None:
    count = 12 * DEFAULT_STREAM_MIN_BYTES // 8
    session = session_of(pool)
    future = await pool.submit(Task.kernel("test_arange", count, max_attempts=5))
    await until(lambda: session.receiving_bytes > 0, "the result began streaming")
    conn = session._conn
    assert conn is not None and conn.receiving_bytes > 0
    [agent] = agent_pids()
    os.kill(agent.pid, signal.SIGKILL)
    result = await asyncio.wait_for(future, WAIT_S)
    assert conn.receiving_bytes == 0  # the half-received array was freed with the link
    assert result.is_success(), result.error
    assert result.attempts >= 2 and result.value[-1] == count - 1
    assert np.array_equal(result.value[:: 1 << 16], np.arange(0, count, 1 << 16, dtype=np.float64))


async def test_a_link_cut_while_a_put_streams_sends_it_again_to_the_relaunched_agent(pool: Pool) -> None:
    count = 12 * DEFAULT_STREAM_MIN_BYTES // 8
    session = session_of(pool)
    ref = pool.put(np.arange(count, dtype=np.float64))
    future = await pool.submit(Task.kernel("test_fingerprint", ref, max_attempts=5))
    await until(lambda: session.sending_bytes > 0, "the put began streaming")
    conn = session._conn
    assert conn is not None
    [agent] = agent_pids()
    os.kill(agent.pid, signal.SIGKILL)
    result = await asyncio.wait_for(future, WAIT_S)
    assert not conn.streaming  # nothing of the old link's transfer is kept
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.value == ("<f8", (count,), float(count * (count - 1) // 2), float(count - 1))


async def test_what_a_session_writes_at_once_is_bounded_by_its_high_water_mark_not_the_value(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 12 * DEFAULT_STREAM_MIN_BYTES // 8
    session = session_of(pool)
    stream = session._stream
    assert stream is not None
    writes: list[int] = []
    write_parts = stream.write_parts

    def record(parts: Any) -> None:
        writes.append(sum(memoryview(part).nbytes for part in parts))
        write_parts(parts)

    monkeypatch.setattr(stream, "write_parts", record)  # a spy on this one stream
    value = np.arange(count, dtype=np.float64)
    result = await asyncio.wait_for(pool.run(Task.kernel("test_fingerprint", value)), WAIT_S)
    assert result.value == ("<f8", (count,), float(count * (count - 1) // 2), float(count - 1))
    assert sum(writes) > value.nbytes  # it all went through this stream...
    assert max(writes) <= session.high_water + DEFAULT_CHUNK_BYTES + 4096  # ...a bounded piece at a time


async def test_an_argument_or_put_too_big_for_the_hosts_memory_fails_its_tasks_alone(tmp_path: Path) -> None:
    """The agent, limited to 1 GB of address space, is sent 1.2 GB: it drops the bytes and
    fails the tasks that need them, naming host, size and fix. It used to go down on the
    value, be relaunched, be sent it again and go down again, for ever, taking every other
    task with it."""
    import sys

    wrapper = tmp_path / "small-python"
    wrapper.write_text(f'#!/bin/sh\nulimit -v 1000000\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(1, gpus="none", python=str(wrapper), name="small", env=env)
    huge = np.zeros(150_000_000)  # 1.2 GB of address space here; calloc'd, so no memory used
    huge.flags.writeable = False  # sent as it is, not copied at submit
    async with asyncio.timeout(WAIT_S), Pool([host], PoolConfig(relaunch_backoff=0.1)) as pool:
        before = [await pool.submit(Task.kernel("sum", np.ones(10))) for _ in range(3)]
        await before[0]
        started = [p.pid for p in agent_pids()]
        too_big = await pool.submit(Task.kernel("sum", huge))
        ref = pool.put(huge)
        reads_put = await pool.submit(Task.kernel("sum", ref))
        after = [await pool.submit(Task.kernel("sum", np.ones(10))) for _ in range(3)]
        results = [await f for f in [*before, too_big, reads_put, *after]]
        assert [p.pid for p in agent_pids()] == started and len(started) == 1  # it never went down
    assert [r.value for r in results] == [10.0] * 3 + [None, None] + [10.0] * 3
    failed = {"argument": results[3], "put": results[4]}
    for result in failed.values():
        assert result.status is TaskStatus.FAILED and result.attempts == 1
        assert "host small could not hold" in (result.error or "")
        assert "1,200,000,000 bytes (a float64 array of shape (150000000,))" in (result.error or "")
        assert "more free memory" in (result.error or "")
    assert "this task's arguments" in (failed["argument"].error or "")
    assert "put value" in (failed["put"].error or "")


async def test_a_put_one_host_cannot_hold_runs_on_the_others_and_that_host_is_said_unfit(tmp_path: Path) -> None:
    """Host "small" (1 GB of address space) refuses each task reading a 1.2 GB put value at
    once, so it drew most of them and failed them while "big" could run them all (9 of 10
    failed). Now the first refusal keeps it from new work, with its reason, and the task runs
    on "big" without the refusal counting as an attempt."""
    import sys

    wrapper = tmp_path / "small-python"
    wrapper.write_text(f'#!/bin/sh\nulimit -v 1000000\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    small = local_host(1, gpus="none", python=str(wrapper), name="small", env=env)
    big = local_host(1, gpus="none", name="big", env=env)
    huge = np.zeros(150_000_000)  # 1.2 GB of address space; calloc'd, so no memory used here
    huge.flags.writeable = False
    states: list[tuple[str, str, str]] = []
    pool = Pool([small, big], PoolConfig(relaunch_backoff=0.1))
    pool.subscribe(lambda e: states.append((e.host, e.state, e.reason)) if isinstance(e, HostStateChanged) else None)
    async with asyncio.timeout(WAIT_S), pool:
        ref = pool.put(huge)
        futures = [await pool.submit(Task.kernel("sum", ref, max_attempts=1)) for _ in range(4)]
        results = [await f for f in futures]
        views = {v.slot_id: v.state for v in pool.slots()}
        hosts = {v.name: v.state for v in pool.hosts()}
    assert [(r.status, r.host, r.attempts) for r in results] == [(TaskStatus.SUCCEEDED, "big", 1)] * 4
    # pool.hosts() says what the events said last ("up" before, from the host's liveness alone);
    # a loaded box may suspect the host meanwhile, and when it is heard again it is still unfit
    said = {host: state for host, state, _ in states}
    assert hosts == {"small": said["small"], "big": said.get("big", "up")}, (hosts, states)
    assert said["small"] in ("unfit", "suspected"), states
    unfit = [(host, reason) for host, state, reason in states if state == "unfit"]  # (a loaded box: "suspected" too)
    assert [host for host, _ in unfit] == ["small"]
    assert unfit[0][1].startswith("host small could not hold put value")
    assert "more free memory" in unfit[0][1] and "gets no new work while other hosts can run it" in unfit[0][1]
    assert views == {"small/0": "draining", "big/0": "up"}


@contextlib.contextmanager
def memory_cgroup(name: str, limit: int) -> Iterator[Path]:
    """A memory cgroup (v2, else v1) capped at `limit` bytes, removed afterwards; skips the
    test where this machine does not let us make one (not root, no memory controller)."""
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    if (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.subtree_control").read_text():
        folder, cap = v2 / name, "memory.max"
    elif (v1 / "memory.limit_in_bytes").is_file():
        folder, cap = v1 / name, "memory.limit_in_bytes"
    else:
        pytest.skip("no memory cgroup controller here")
    try:
        folder.mkdir()
        (folder / cap).write_text(str(limit))
    except OSError as exc:
        with contextlib.suppress(OSError):
            folder.rmdir()
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            folder.rmdir()  # empty by now: its processes were stopped with the pool


async def test_an_argument_that_gets_the_agent_oom_killed_fails_its_task_and_spares_the_rest(tmp_path: Path) -> None:
    """The host's memory is capped by a cgroup, not an address-space limit: the agent maps
    290 MB fine and is killed by the kernel as the pages fill (with its own memory, more
    than the 300 MB). Each relaunch is sent the same value; after max_attempts + 2 losses
    before a start the task fails, saying why, and the tasks around it succeed. It used to go
    on for ever. One larger than the cgroup's limit is refused at once, in a line, with no
    loss: it was killed the same way, five times over."""
    import sys

    with memory_cgroup(f"batuta-test-{os.getpid()}", 300 << 20) as cgroup:
        wrapper = tmp_path / "capped-python"
        wrapper.write_text(f'#!/bin/sh\necho $$ > {cgroup}/cgroup.procs\nexec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        host = local_host(1, gpus="none", python=str(wrapper), name="capped", env=env)
        huge = np.zeros(50_000_000)  # 400 MB here without using any (calloc'd pages)
        huge.flags.writeable = False
        big = huge[:36_250_000]  # 290 MB: under the limit, but not with the agent's own memory
        config = PoolConfig(relaunch_backoff=0.1, max_relaunches=50)
        async with asyncio.timeout(WAIT_S), Pool([host], config) as pool:
            before = [await pool.submit(Task.kernel("sum", np.ones(10))) for _ in range(2)]
            refused = await pool.run(Task.kernel("sum", huge))  # alone: a kill would lose it too
            killing = await pool.submit(Task.kernel("sum", big))
            after = [await pool.submit(Task.kernel("sum", np.ones(10))) for _ in range(2)]
            results = [await f for f in [*before, killing, *after]]
    assert [r.value for r in results] == [10.0, 10.0, None, 10.0, 10.0]
    lost = results[2]
    assert refused.status is TaskStatus.FAILED and refused.attempts == 1, refused
    assert "could not hold this task's arguments in memory: 400,000,000 bytes" in (refused.error or ""), refused.error
    assert f"more than the {300 << 20:,} bytes of memory this host has" in (refused.error or ""), refused.error
    assert lost.status is TaskStatus.LOST
    assert (lost.error or "").startswith("its host went down 5 times while it waited there, before it started")
    assert "killed by signal 9 (SIGKILL): out of memory on the host" in (lost.error or "")


class SlowUplink:
    """A local agent's stream whose bytes from the agent arrive at `rate` bytes a second, as
    over a slow link (the host's uplink, at 10 Mbit/s, in the report): what the agent sends
    ahead of its next heartbeat (a large result's chunks) then takes seconds to arrive."""

    read_into = None  # the session then reads through `read`, the throttled way

    def __init__(self, inner: Any, rate: float) -> None:
        self._inner = inner
        self._rate = rate
        self._pending = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def read(self) -> bytes:
        if not self._pending:
            self._pending = await self._inner.read()
        piece, self._pending = self._pending[:16384], self._pending[16384:]
        await asyncio.sleep(len(piece) / self._rate)  # the link's pace, not a wait for anything
        return piece


async def test_a_host_sending_a_large_result_over_a_slow_link_is_not_lost() -> None:
    """Liveness counted whole messages only: a 4 MB result took four seconds to arrive, its
    heartbeats behind it, and the host was lost at `lost_after` (1 s here; 8 s against 10
    Mbit/s in the report), over and over, until the task failed as lost."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(1, gpus="none", kernel_modules=[KERNELS], env=env)
    real_launch = host.launch

    async def slow_launch() -> Any:
        return SlowUplink(await real_launch(), rate=1_000_000.0)

    config = PoolConfig(heartbeat_interval=0.2, suspect_after=0.5, lost_after=1.0, relaunch_backoff=0.1)
    async with Pool([replace(host, launch=slow_launch)], config) as pool:
        a = np.full(1_000_000, 1.0, np.float32)
        result = await asyncio.wait_for(pool.run(Task.kernel("vadd", a, a)), WAIT_S)
        assert result.status is TaskStatus.SUCCEEDED and result.attempts == 1, result.error
        assert np.array_equal(result.value, a + a)
        assert pool.stats().requeues == 0
