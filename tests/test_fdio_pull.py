"""`FdPull` (transport/fdio.py), the coordinator's reader of a local agent's pipe: it keeps the
pipe watched between reads, stops watching while nobody waits, and ends at EOF."""

from __future__ import annotations

import asyncio
import contextlib
import os

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
