"""`FdPull` (transport/fdio.py), the coordinator's reader of a local agent's pipe: it keeps the
pipe watched between reads, stops watching while nobody waits, reads once a message, and
ends at EOF."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from batuta.transport import fdio
from batuta.transport.fdio import FdPull


async def test_reads_keep_the_pipe_watched_and_a_pipe_nobody_waits_on_stops_waking_the_loop() -> None:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    pull = FdPull(loop, read_fd)
    try:
        reading = asyncio.ensure_future(pull.read())
        await asyncio.sleep(0)  # it found nothing and waits for the pipe
        assert pull._watching
        os.write(write_fd, b"one")
        assert await reading == b"one"
        assert pull._watching  # still watched: the next wait costs no registration
        # readable while nobody reads: the first wake-up stops the watching
        os.write(write_fd, b"two")
        for _ in range(3):
            await asyncio.sleep(0)
        assert not pull._watching
        assert await pull.read() == b"two"  # the data waited for the next read
        reading = asyncio.ensure_future(pull.read())
        await asyncio.sleep(0)
        assert pull._watching
        os.close(write_fd)
        assert await asyncio.wait_for(reading, 5) == b""  # end of file
        assert not pull._watching
    finally:
        pull.close()
        with contextlib.suppress(OSError):  # closed above, unless the test failed first
            os.close(write_fd)


async def test_close_wakes_a_waiting_read_with_end_of_file() -> None:
    read_fd, write_fd = os.pipe()
    pull = FdPull(asyncio.get_running_loop(), read_fd)
    reading = asyncio.ensure_future(pull.read())
    await asyncio.sleep(0)
    pull.close()
    assert await asyncio.wait_for(reading, 5) == b""
    os.close(write_fd)


async def test_a_waiting_read_is_done_by_the_wake_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The readiness callback reads for the waiting caller, so the loop's next poll finds the
    pipe empty and wakes nobody for nothing: two reads a message (the wake-up's, and the
    caller's next try, which finds nothing and waits), not three."""
    reads: list[int] = []
    real_read = os.read

    def counted_read(fd: int, size: int) -> bytes:
        reads.append(fd)
        return real_read(fd, size)

    monkeypatch.setattr(fdio.os, "read", counted_read)
    read_fd, write_fd = os.pipe()
    pull = FdPull(asyncio.get_running_loop(), read_fd)
    received: list[bytes] = []
    arrived = asyncio.Event()

    async def reader() -> None:  # a session's read loop
        while data := await pull.read():
            received.append(data)
            arrived.set()

    reading = asyncio.ensure_future(reader())
    await asyncio.sleep(0)  # it found nothing and waits for the pipe
    try:
        for number in range(1, 4):
            arrived.clear()
            os.write(write_fd, b"heartbeat %d" % number)
            await asyncio.wait_for(arrived.wait(), 5)
            for _ in range(3):  # the loop polls again: the bytes were taken, nobody is woken
                await asyncio.sleep(0)
            assert len(reads) == 1 + 2 * number  # the first try found nothing; then two a message
        os.close(write_fd)
        await asyncio.wait_for(reading, 5)  # end of file ends the loop
        assert received == [b"heartbeat 1", b"heartbeat 2", b"heartbeat 3"]
    finally:
        reading.cancel()
        pull.close()
        with contextlib.suppress(OSError):  # closed above, unless the test failed first
            os.close(write_fd)


async def test_a_waiting_read_into_the_callers_memory() -> None:
    read_fd, write_fd = os.pipe()
    pull = FdPull(asyncio.get_running_loop(), read_fd)
    try:
        into = memoryview(bytearray(4))
        reading = asyncio.ensure_future(pull.read_into(into))
        await asyncio.sleep(0)
        os.write(write_fd, b"0123456789")
        assert await asyncio.wait_for(reading, 5) == 4
        assert bytes(into) == b"0123"
        into = memoryview(bytearray(64))
        assert await asyncio.wait_for(pull.read_into(into), 5) == 6  # there already: read at once
        assert bytes(into[:6]) == b"456789"
        os.close(write_fd)
        assert await asyncio.wait_for(pull.read_into(into), 5) == 0
    finally:
        pull.close()
        with contextlib.suppress(OSError):
            os.close(write_fd)
