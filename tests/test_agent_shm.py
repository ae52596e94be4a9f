"""Shared memory between the agent and its slots (batuta/agent/shm.py), in one process and
through a real pool: a large task argument crosses as a reference the slot reads, not down
its pipe; a mapping is reused once its last reference is gone; a locator that does not name
the agent's shared memory is refused."""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

import numpy as np
import pytest

from batuta import Task
from batuta.agent.shm import REUSE_MAX_BYTES, SHARED_MIN_BYTES, SharedArena, SharedReader
from batuta.core.task import KernelCall
from batuta.protocol import FrameDecoder, RemoteProtocolError, Run, TaskRequest
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import encode_streamed_parts
from tests.test_pool_transfer import WAIT_S, make_pool


def _run(value: np.ndarray) -> Run:
    return Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k", args=(value,))),))


def _frame(parts: list[Any]) -> bytes:
    return b"".join(bytes(memoryview(part).cast("B")) for part in parts)


def test_an_argument_in_shared_memory_travels_as_a_reference_and_arrives_as_the_slots_own() -> None:
    arena = SharedArena()
    buffer = arena.allocate(SHARED_MIN_BYTES * 2)
    value = buffer[64 : 64 + 8 * 1000].view(np.float64)
    value[:] = np.arange(1000.0)
    data = _frame(encode_streamed_parts(_run(value), OutgoingStreams(), locate=arena.locate))
    assert len(data) < 200  # the frame names the memory; the bytes stay where they are
    decoder = FrameDecoder(shared=SharedReader(os.getpid()).array)
    decoder.feed(data)
    run = decoder.next_message()
    assert isinstance(run, Run) and isinstance(run.tasks[0].call, KernelCall)
    (received,) = run.tasks[0].call.args
    assert np.array_equal(received, np.arange(1000.0))
    received[0] = -1.0  # the slot's own array: a kernel may change its argument
    assert value[0] == 0.0 and not np.shares_memory(received, value)


def test_a_mapping_too_large_to_be_reused_is_mapped_by_the_slot_not_copied() -> None:
    arena = SharedArena()
    buffer = arena.allocate(REUSE_MAX_BYTES + 1)
    value = buffer[:8000].view(np.float64)
    value[:] = np.arange(1000.0)
    data = _frame(encode_streamed_parts(_run(value), OutgoingStreams(), locate=arena.locate))
    decoder = FrameDecoder(shared=SharedReader(os.getpid()).array)
    decoder.feed(data)
    run = decoder.next_message()
    assert isinstance(run, Run) and isinstance(run.tasks[0].call, KernelCall)
    (received,) = run.tasks[0].call.args
    value[5] = 42.0  # a page the slot has not written is the agent's page: mapped, not copied
    assert received[5] == 42.0 and np.array_equal(received[:5], np.arange(5.0))
    received[6] = -1.0  # and what the slot writes stays its own (copy-on-write)
    assert value[6] == 6.0
    del buffer, value
    gc.collect()
    assert arena.live == 0 and arena.free == 0  # never reused: no one rewrites what a slot maps


def test_a_mapping_is_reused_once_its_last_reference_is_gone() -> None:
    arena = SharedArena()
    buffer = arena.allocate(SHARED_MIN_BYTES + 1)
    view = buffer[10:20]
    locator = arena.locate(buffer)
    assert arena.live == 1 and locator is not None
    del buffer
    gc.collect()
    assert arena.live == 1  # a view still holds it
    del view
    gc.collect()
    assert arena.live == 0 and arena.free == 1
    again = arena.allocate(SHARED_MIN_BYTES + 100)  # the same size class
    assert arena.free == 0 and arena.locate(again) is not None
    assert arena.allocate(100).nbytes == 100 and arena.live == 1  # small buffers are not shared


def test_past_its_free_limit_the_arena_closes_what_it_does_not_keep() -> None:
    arena = SharedArena(free_bytes=0)
    buffer = arena.allocate(SHARED_MIN_BYTES)
    locator = arena.locate(buffer)
    assert locator is not None
    fd = int.from_bytes(locator[4:8], "big")
    del buffer
    gc.collect()
    assert arena.free == 0
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the memory goes with the mapping


def test_a_locator_that_does_not_name_the_agents_shared_memory_is_refused() -> None:
    arena = SharedArena(free_bytes=0)
    buffer = arena.allocate(SHARED_MIN_BYTES)
    data = _frame(encode_streamed_parts(_run(buffer.view(np.float64)), OutgoingStreams(), locate=arena.locate))
    for mapper, reason in (
        (SharedReader(os.getpid() + 1), "not of this slot's agent"),
        (None, "on a link without shared memory"),
    ):
        decoder = FrameDecoder(shared=mapper.array if mapper is not None else None)
        decoder.feed(data)
        with pytest.raises(RemoteProtocolError, match=reason):
            decoder.next_message()
    del buffer
    gc.collect()
    decoder = FrameDecoder(shared=SharedReader(os.getpid()).array)
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError, match=r"shared memory 1 is gone|is not shared memory 1"):
        decoder.next_message()  # the fd was closed (or its number reused): refused, never misread


async def test_large_arguments_reach_the_slots_through_shared_memory_and_come_out_right() -> None:
    async with make_pool(slots=2) as pool:
        values = [np.arange(2 * SHARED_MIN_BYTES // 8, dtype=np.float64) + i for i in range(6)]
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.run(Task.kernel("test_fingerprint", v)) for v in values)), WAIT_S
        )
        for value, result in zip(values, results, strict=True):
            assert result.is_success(), result.error
            assert result.value == ("<f8", value.shape, float(value.sum()), float(value[-1]))


async def test_a_put_value_in_shared_memory_reaches_the_slot_as_a_mapping_not_down_its_pipe() -> None:
    """A put value the agent received into shared memory travels to the slot with the Run
    that names it as a reference: one too large to be reused is mapped there, and every
    task reading it sees the right bytes (the supervisor pins it until the slot has read it)."""
    big = np.arange((REUSE_MAX_BYTES + SHARED_MIN_BYTES) // 8, dtype=np.float64)
    small = np.arange(2 * SHARED_MIN_BYTES // 8, dtype=np.float64) * 3.0
    async with make_pool(slots=1) as pool:
        refs = [pool.put(big), pool.put(small)]
        where = await asyncio.wait_for(pool.run(Task.kernel("test_backing", refs[0])), WAIT_S)
        assert where.is_success(), where.error
        assert where.value.startswith("/memfd:batuta-shm-")  # the agent's memory, mapped: no copy
        for _ in range(2):
            results = await asyncio.wait_for(
                asyncio.gather(*(pool.run(Task.kernel("test_fingerprint", ref)) for ref in refs)), WAIT_S
            )
            for value, result in zip((big, small), results, strict=True):
                assert result.is_success(), result.error
                assert result.value == ("<f8", value.shape, float(value.sum()), float(value[-1]))
