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


async def test_a_waiting_read_is_done_by_the_wake_up_and_an_emptied_pipe_is_not_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One read a message: the readiness callback reads for the waiting caller (so the loop's
    next poll finds the pipe empty and wakes nobody for nothing), and after a short read the
    next read waits for the pipe instead of trying a read that would find nothing."""
    reads: list[int] = []
    real_read, real_readv = os.read, os.readv

    def counted_read(fd: int, size: int) -> bytes:
        reads.append(fd)
        return real_read(fd, size)

    def counted_readv(fd: int, buffers: list[memoryview]) -> int:
        reads.append(fd)
        return real_readv(fd, buffers)

    monkeypatch.setattr(fdio.os, "read", counted_read)
    monkeypatch.setattr(fdio.os, "readv", counted_readv)
    read_fd, write_fd = os.pipe()
    pull = FdPull(asyncio.get_running_loop(), read_fd)
    try:
        reading = asyncio.ensure_future(pull.read())
        await asyncio.sleep(0)
        assert reads == [read_fd]  # found nothing: it waits
        for number, message in enumerate((b"heartbeat 1", b"heartbeat 2", b"heartbeat 3"), 1):
            os.write(write_fd, message)
            assert await asyncio.wait_for(reading, 5) == message
            reading = asyncio.ensure_future(pull.read())
            for _ in range(3):  # the loop polls again: nothing there, nobody woken
                await asyncio.sleep(0)
            assert not reading.done()
            assert len(reads) == 1 + number  # one read a message, none after it
        # a read that fills what it was given does not empty the pipe: the next one reads at once
        reading.cancel()
        os.write(write_fd, b"0123456789")
        into = memoryview(bytearray(4))
        assert await asyncio.wait_for(pull.read_into(into), 5) == 4
        assert bytes(into) == b"0123"
        before = len(reads)
        assert await asyncio.wait_for(pull.read_into(memoryview(bytearray(64))), 5) == 6
        assert len(reads) == before + 1
    finally:
        pull.close()
        os.close(write_fd)
