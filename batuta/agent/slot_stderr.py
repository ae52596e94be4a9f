"""A slot process's stderr, read by the agent: passed on to the agent's own stderr, line by
line (so the coordinator logs it as before), and its last line kept.

A slot that cannot start (out of file descriptors, a broken import) says why on stderr and
exits; the agent saw only "exited with code 70", and the coordinator's reason for giving the
host up named that alone, the cause being in the agent's stderr lines of its log. With the
last line kept, the reason names it (`SlotSupervisor`): "... exited with code 70; its last
line on stderr: OSError: [Errno 24] Too many open files".

Once the slot is ready it writes to the agent's stderr itself, and only a fatal signal's dump
(`faulthandler`, enabled on this pipe) comes here: a slot that dies mid-run of a segfault in
native code said only "killed by signal 11"; the reason now names the error and the frames
it happened in (`fault`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re

from batuta.transport.fdio import FdReader

LAST_LINE_CHARS = 300  # of the last line kept for a reason; a traceback's last line fits
_PARTIAL_MAX = 64 * 1024  # of a line without its end yet: passed on unfinished past this
_DUMP_MAX = 16 * 1024  # of what comes after the slot is ready: a dump of 100 frames fits
_FATAL = "Fatal Python error:"
_FRAME = re.compile(r'File "(?P<path>[^"]*)", line (?P<line>\d+) in (?P<function>.+)')
FRAMES_NAMED = 2  # the innermost: the call that faulted, and what called it (often the kernel)


class SlotStderr:
    """Reads the stderr pipe `fd` of one slot process (owned from now on: `close` closes it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, *, out_fd: int = 2) -> None:
        self._out_fd = out_fd
        self._partial = b""
        self._last = b""
        self._dump: bytearray | None = None  # once ready: what comes (a fatal signal's dump), bounded
        self._reader = FdReader(loop, fd, self._on_data)

    def ready(self) -> None:
        """The slot is ready: what comes from now on is a fatal signal's dump, if anything."""
        self._dump = bytearray()

    @property
    def last_line(self) -> str:
        """The last non-blank line read so far (an unfinished one counts), bounded; "" if none."""
        text = self._last.decode("utf-8", errors="replace").strip()
        if len(text) > LAST_LINE_CHARS:
            text = f"{text[:LAST_LINE_CHARS]} … ({len(text) - LAST_LINE_CHARS:,} more characters)"
        return text

    def finish(self) -> str:
        """Read what the pipe holds now (the process is gone; a child of it may still hold the
        pipe, so this does not wait for its end), stop, and return the last line; once ready,
        the fatal error it died of, with where (`fault`), or ""."""
        self._reader.read_available()
        self.close()
        return self.last_line if self._dump is None else fault(self._dump.decode("utf-8", errors="replace"))

    def close(self) -> None:
        self._reader.close()
        if self._partial:
            self._pass_on(self._partial + b"\n")
            self._partial = b""

    def _on_data(self, data: bytes) -> None:
        if not data:  # its end (the slot is ready, or gone): its fd goes, one fewer per slot
            self.close()  # an unfinished line is passed on as a line
            return
        if self._dump is not None:
            self._dump += data
            del self._dump[:-_DUMP_MAX]
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


def fault(dump: str) -> str:
    """A faulthandler dump as one line: "Fatal Python error: Segmentation fault (in string_at
    at __init__.py:519, called from kern at mod.py:12)"; "" if `dump` holds none (a line read
    late from before the slot was ready is no reason for its death)."""
    lines = dump.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(_FATAL)]
    if not starts:
        return ""
    head, *rest = lines[starts[-1] :]
    frames = []
    for line in rest:
        match = _FRAME.search(line)
        if match is not None:
            frames.append(f"{match['function']} at {os.path.basename(match['path'])}:{match['line']}")
            if len(frames) == FRAMES_NAMED:
                break
    where = f" (in {', called from '.join(frames)})" if frames else ""
    return f"{head.strip()[:LAST_LINE_CHARS]}{where}"
