"""Shared memory between the agent and its slots (batuta/agent/shm.py), in one process and
through a real pool: large task arguments are mapped by the slot, not copied down its pipe;
mappings go away with their last reference; a locator that does not name the agent's
shared memory is refused."""

from __future__ import annotations

import asyncio
import gc
import os

import numpy as np
import pytest

from batuta import Task
from batuta.agent.shm import SHARED_MIN_BYTES, SharedArena, SharedMapper
from batuta.core.task import KernelCall
from batuta.protocol import FrameDecoder, RemoteProtocolError, Run, TaskRequest
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import encode_streamed_parts
from tests.test_pool_transfer import WAIT_S, make_pool


def _run(value: np.ndarray) -> Run:
    return Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k", args=(value,))),))


def _frame(parts: list[object]) -> bytes:
    return b"".join(bytes(memoryview(part).cast("B")) for part in parts)  # type: ignore[arg-type]


def test_an_argument_in_shared_memory_travels_as_a_reference_and_maps_copy_on_write() -> None:
    arena = SharedArena()
    buffer = arena.allocate(SHARED_MIN_BYTES * 2)
    value = buffer[64 : 64 + 8 * 1000].view(np.float64)
    value[:] = np.arange(1000.0)
    data = _frame(encode_streamed_parts(_run(value), OutgoingStreams(), locate=arena.locate))
    assert len(data) < 200  # the frame names the memory; the bytes stay where they are
    decoder = FrameDecoder(shared=SharedMapper(os.getpid()).array)
    decoder.feed(data)
    run = decoder.next_message()
    assert isinstance(run, Run) and isinstance(run.tasks[0].call, KernelCall)
    (mapped,) = run.tasks[0].call.args
    assert np.array_equal(mapped, np.arange(1000.0))
    mapped[0] = -1.0  # a kernel writing into its argument changes its own copy only
    assert value[0] == 0.0


def test_a_mapping_is_released_with_its_last_reference() -> None:
    arena = SharedArena()
    buffer = arena.allocate(SHARED_MIN_BYTES)
    locator = arena.locate(buffer)
    assert arena.live == 1 and locator is not None
    del buffer
    gc.collect()
    assert arena.live == 0
    assert arena.allocate(100).nbytes == 100 and arena.live == 0  # small buffers are not shared


def test_a_locator_that_does_not_name_the_agents_shared_memory_is_refused() -> None:
    arena = SharedArena()
    buffer = arena.allocate(SHARED_MIN_BYTES)
    data = _frame(encode_streamed_parts(_run(buffer.view(np.float64)), OutgoingStreams(), locate=arena.locate))
    for mapper, reason in (
        (SharedMapper(os.getpid() + 1), "not of this slot's agent"),
        (None, "on a link without shared memory"),
    ):
        decoder = FrameDecoder(shared=mapper.array if mapper is not None else None)
        decoder.feed(data)
        with pytest.raises(RemoteProtocolError, match=reason):
            decoder.next_message()
    del buffer
    gc.collect()
    decoder = FrameDecoder(shared=SharedMapper(os.getpid()).array)
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError, match=r"shared memory 1 is gone|is not shared memory 1"):
        decoder.next_message()  # the fd was closed (or its number reused): refused, never misread


async def test_a_large_argument_reaches_the_slot_through_shared_memory() -> None:
    async with make_pool(slots=1) as pool:
        value = np.arange(2 * SHARED_MIN_BYTES // 8, dtype=np.float64)
        result = await asyncio.wait_for(pool.run(Task.kernel("test_shared_mappings", value)), WAIT_S)
        assert result.is_success(), result.error
        assert result.value >= 1
        small = await asyncio.wait_for(pool.run(Task.kernel("test_shared_mappings", np.ones(10))), WAIT_S)
        assert small.value == 0  # the big one's mapping went with its task
