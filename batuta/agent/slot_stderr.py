"""A slot process's stderr, read by the agent: passed on to the agent's own stderr, line by
line (so the coordinator logs it as before), and its last line kept.

A slot that cannot start (out of file descriptors, a broken import) says why on stderr and
exits; the agent saw only "exited with code 70", and the coordinator's reason for giving the
host up named that alone, the cause being in the agent's stderr lines of its log. With the
last line kept, the reason names it (`SlotSupervisor`): "... exited with code 70; its last
line on stderr: OSError: [Errno 24] Too many open files".
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from batuta.transport.fdio import FdReader

LAST_LINE_CHARS = 300  # of the last line kept for a reason; a traceback's last line fits
_PARTIAL_MAX = 64 * 1024  # of a line without its end yet: passed on unfinished past this


class SlotStderr:
    """Reads the stderr pipe `fd` of one slot process (owned from now on: `close` closes it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, *, out_fd: int = 2) -> None:
        self._out_fd = out_fd
        self._partial = b""
        self._last = b""
        self._reader = FdReader(loop, fd, self._on_data)

    @property
    def last_line(self) -> str:
        """The last non-blank line read so far (an unfinished one counts), bounded; "" if none."""
        text = self._last.decode("utf-8", errors="replace").strip()
        if len(text) > LAST_LINE_CHARS:
            text = f"{text[:LAST_LINE_CHARS]} … ({len(text) - LAST_LINE_CHARS:,} more characters)"
        return text

    def finish(self) -> str:
        """Read what the pipe holds now (the process is gone; a child of it may still hold the
        pipe, so this does not wait for its end), stop, and return the last line."""
        self._reader.read_available()
        self.close()
        return self.last_line

    def close(self) -> None:
        self._reader.close()
        if self._partial:
            self._pass_on(self._partial + b"\n")
            self._partial = b""

    def _on_data(self, data: bytes) -> None:
        if not data:  # its end (the slot is ready, or gone): its fd goes, one fewer per slot
            self.close()  # an unfinished line is passed on as a line
            return
        data = self._partial + data
        end = data.rfind(b"\n") + 1
        whole, self._partial = data[:end], data[end:]
        if len(self._partial) > _PARTIAL_MAX:
            whole, self._partial = data + b"\n", b""
        for line in reversed(data.splitlines()):
            if line.strip():
                self._last = line
                break
        if whole:
            self._pass_on(whole)  # whole lines only: the agent's own log lines stay unbroken

    def _pass_on(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the agent's stderr gone: its log is lost anyway
            view = memoryview(data)
            while view:
                view = view[os.write(self._out_fd, view) :]
