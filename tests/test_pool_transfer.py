"""Large values through a local pool: streamed puts, arguments and results (protocol/chunks.py).

A memory-mapped `.npy` is put and used; a large result streams back while a small task
overtakes it; and the link is cut (the agent SIGKILLed) while a value streams either way:
the session frees what was half received, forgets what was half sent, and the task runs
again on the relaunched agent with the right value. Waits are bounded polls of the session's
own counters (what it is receiving or sending), never sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batuta import Pool, Task, TaskStatus
from batuta.protocol.chunks import DEFAULT_CHUNK_BYTES, DEFAULT_STREAM_MIN_BYTES
from batuta.runtime.builder import PoolConfig, local_host
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
    assert ref.nbytes > mapped.nbytes
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
