"""Non-blocking reads and writes on raw pipe file descriptors from an asyncio loop.

The agent talks to its coordinator over two private fds and to each slot process over a
pair of pipes, and the coordinator writes to a local agent's stdin. asyncio's transports
would do, but they want a coroutine to set up per process and copy on every partial write
(a pipe write transport appends what the pipe refused to one bytearray: a 16 MB frame is
copied again with every frame queued behind it, which made shipping arrays to a local agent
CPU-bound in that copy). These two small classes register the fd with the loop directly,
write straight through when the pipe has room (the common case), keep a queue of
memoryviews only for what the pipe refused, and hand every read chunk to a callback (`b""`
meaning end of file). A reader given `receive_buffer` reads straight into the memory it
offers (a large frame's buffer, a streamed array: see `FrameDecoder.receive_buffer`) and
reports how much with `on_received`, so that a large value is not read into a bytes object
first and copied again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
from collections import deque
from collections.abc import Callable, Sequence

READ_CHUNK = 256 * 1024
IOV_MAX = 1024  # buffers one writev takes on Linux
PIPE_BYTES = 1024 * 1024  # Linux's default pipe-max-size; the default pipe holds 64 KiB


def widen_pipe(fd: int, size: int = PIPE_BYTES) -> None:
    """Ask the kernel for a pipe buffer of `size` bytes (Linux; elsewhere, or when the limit
    is lower, the pipe keeps its size). A 16 MB array through a 64 KiB pipe takes 256
    wake-ups of each side; through 1 MiB, 16."""
    f_setpipe_sz = getattr(fcntl, "F_SETPIPE_SZ", None)
    if f_setpipe_sz is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, f_setpipe_sz, size)


class FdReader:
    """Calls `on_data(chunk)` for each chunk read from `fd`, and `on_data(b"")` once at EOF.

    With `receive_buffer` and `on_received`: whenever `receive_buffer()` offers memory, the
    read goes into it and `on_received(n)` is called instead of `on_data`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_data: Callable[[bytes], None],
        *,
        chunk_size: int = READ_CHUNK,
        receive_buffer: Callable[[], memoryview | None] | None = None,
        on_received: Callable[[int], None] | None = None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._on_data = on_data
        self._receive_buffer = receive_buffer
        self._on_received = on_received
        self._chunk_size = chunk_size
        self._active = True
        self._closed = False
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    @property
    def fd(self) -> int:
        return self._fd

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        """Read one chunk and deliver it. False when nothing was there or the reader stopped."""
        if not self._active:
            return False
        if self._receive_buffer is not None and self._on_received is not None:
            view = self._receive_buffer()
            if view is not None:
                try:
                    count = os.readv(self._fd, [view])
                except (BlockingIOError, InterruptedError):
                    return False
                except OSError:
                    count = 0
                if count:
                    self._on_received(count)
                    return True
                self.stop()
                self._on_data(b"")
                return False
        try:
            data = os.read(self._fd, self._chunk_size)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""  # a broken fd reads as end of file: the peer is gone either way
        if not data:
            self.stop()
        self._on_data(data)
        return bool(data)

    def read_available(self) -> None:
        """Deliver whatever is readable right now, without waiting (used before a kill, so a
        result that is already in the pipe is not mistaken for a task still running)."""
        while self._read_once():
            pass

    def stop(self) -> None:
        """Stop watching the fd (it stays open)."""
        if self._active:
            self._active = False
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        self.stop()
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)


class FdPull:
    """Reads from `fd` when asked (`await read(n)`, `await read_into(view)`), for a caller
    that pulls: it waits for the fd to become readable only when nothing is there, and reads
    into the caller's memory when given some (a large frame's buffer, a streamed array).

    A waiting read is done by the readiness callback itself, which hands the bytes to the
    caller: the loop polls again before a woken caller runs, and had the caller read, that
    poll would still see the bytes and wake it once more for nothing (two resumed readers
    and three reads a message, most of an idle coordinator's cost per heartbeat). A read
    asked for tries the pipe first all the same: under load the next batch is usually there
    by the time the last one was handled (waiting for the loop's poll instead, once the last
    read came back short, halved a 128-host bench's throughput)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._closed = False
        self._waiter: asyncio.Future[bytes | int | None] | None = None  # None: closed meanwhile
        self._want: memoryview | int = READ_CHUNK  # what the waiting read asked for: memory to fill, or a size
        self._watching = False  # registered with the loop as a reader
        self._idle_wakes = 0  # wake-ups since the last wait with nobody waiting
        os.set_blocking(fd, False)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None:
            # Readable while nobody waits. Once is normal: the loop polls again before the woken
            # reader has read. Twice in a row, the reader is busy elsewhere: stop watching, or
            # the loop would be woken for this pipe at every turn until it reads.
            self._idle_wakes += 1
            if self._idle_wakes >= 2:
                self._loop.remove_reader(self._fd)
                self._watching = False
            return
        if waiter.done():
            return
        got = self._read_now(self._want)
        if got is not None:  # None: nothing there after all; keep waiting
            waiter.set_result(got)

    def _read_now(self, want: memoryview | int) -> bytes | int | None:
        """One read of what `want` asks for; None when the pipe is empty; b"" or 0 at end of
        file (or once the fd broke: the peer is gone either way)."""
        try:
            if isinstance(want, memoryview):
                return os.readv(self._fd, [want])
            return os.read(self._fd, want)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return 0 if isinstance(want, memoryview) else b""

    async def _read(self, want: memoryview | int) -> bytes | int | None:
        """What one read of `want` got, waiting for the pipe first when it is empty; None
        once the fd was closed."""
        got = self._read_now(want)
        while got is None and not self._closed:
            self._waiter = self._loop.create_future()
            self._want = want
            self._idle_wakes = 0
            if not self._watching:
                # The fd stays watched across reads: a reader that reads, drains and waits again
                # (a heartbeat, a batch of results) costs no epoll_ctl pair a message, which is
                # most of an idle coordinator's cost per host under gVisor.
                self._loop.add_reader(self._fd, self._wake)
                self._watching = True
            try:
                got = await self._waiter
            finally:
                self._waiter = None
        return got

    async def read(self, size: int = READ_CHUNK) -> bytes:
        """Up to `size` bytes; b"" at end of file (or once the fd broke or was closed)."""
        if self._closed:
            return b""
        data = await self._read(size)
        if not data:
            self.close()  # end of file: nothing more will come
            return b""
        assert isinstance(data, bytes)
        return data

    async def read_into(self, view: memoryview) -> int:
        """Bytes read into the start of `view`; 0 at end of file."""
        if self._closed:
            return 0
        count = await self._read(view)
        if not count:
            self.close()
            return 0
        assert isinstance(count, int)
        return count

    def close(self) -> None:
        """Close the fd; a read waiting on it returns end of file."""
        if not self._closed:
            self._closed = True
            self._watching = False
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._loop.remove_reader(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class FdWriter:
    """Writes bytes to `fd` without blocking; buffers what the pipe cannot take yet.

    A write error (the reader went away) calls `on_error` once and drops further writes:
    the reading side notices the peer's death through its own EOF, which is where the
    agent handles it.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._on_error = on_error
        self._pending: deque[memoryview] = deque()
        self._pending_bytes = 0
        self._watching = False
        self._failed = False
        self._closed = False
        self._drained: list[asyncio.Future[None]] = []
        os.set_blocking(fd, False)

    @property
    def buffered(self) -> int:
        """Bytes accepted but not yet written to the fd."""
        return self._pending_bytes

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._failed or self._closed or not data:
            return
        view = memoryview(data).cast("B")
        if not self._pending:
            written = self._try_write(view)
            if written is None or written == len(view):
                return
            view = view[written:]
        self._pending.append(view)
        self._pending_bytes += len(view)
        if not self._watching:
            self._watching = True
            self._loop.add_writer(self._fd, self._on_writable)

    def write_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write the buffers in order, as one `writev` when the pipe has room: a frame's
        arrays go out from where they lie, with no join into one bytes object first."""
        if self._failed or self._closed:
            return
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        if not self._pending:
            try:
                written = os.writev(self._fd, views[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError as exc:
                self._fail(exc)
                return
            done = 0  # views written whole
            while done < len(views) and written >= len(views[done]):
                written -= len(views[done])
                done += 1
            views = views[done:]
            if views and written:
                views[0] = views[0][written:]
        for view in views:
            self.write(view)

    def _try_write(self, view: memoryview) -> int | None:
        """Write what the fd takes now; None after a fatal error."""
        try:
            return os.write(self._fd, view)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._fail(exc)
            return None

    def _on_writable(self) -> None:
        pending = self._pending
        while pending:
            # One writev for all that waits, not a write per buffer: a frame's arrays are
            # buffers of their own, and a syscall is dear in a sandboxed VM (gVisor).
            views = list(itertools.islice(pending, IOV_MAX))
            try:
                written = os.writev(self._fd, views)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._pending_bytes -= written
            for view in views:
                if written < len(view):
                    if written:
                        pending[0] = view[written:]
                    return  # the pipe is full
                written -= len(view)
                pending.popleft()
        self._stop_watching()
        self._wake_drained()

    def _stop_watching(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_writer(self._fd)

    def _wake_drained(self) -> None:
        waiters, self._drained = self._drained, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: OSError) -> None:
        self._failed = True
        self._pending.clear()
        self._pending_bytes = 0
        self._stop_watching()
        self._wake_drained()
        if self._on_error is not None:
            self._on_error(exc)

    async def drain(self) -> None:
        """Wait until everything written so far reached the fd (or writing failed)."""
        if not self._pending or self._failed:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drained.append(waiter)
        await waiter

    def close(self) -> None:
        """Drop anything unwritten and close the fd (closing is the peer's EOF)."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._pending_bytes = 0
        self._stop_watching()
        self._wake_drained()
        with contextlib.suppress(OSError):
            os.close(self._fd)
