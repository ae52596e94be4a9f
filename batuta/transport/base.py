"""What every transport gives the runtime: a duplex byte stream to one host agent.

Transports move bytes and nothing else: they know no tasks and no frames. Each one starts
(or reaches) a host agent and hands back a `ByteStream`; the runtime's protocol object sits
on top. Errors are wrapped into `batuta.errors.TransportError` at this edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias

from batuta.errors import TransportError

log = logging.getLogger("batuta.transport")

Buffer: TypeAlias = "bytes | bytearray | memoryview | Any"  # numpy arrays too: anything with the buffer protocol


class ByteStream(Protocol):
    """A duplex byte stream to one host agent."""

    @property
    def description(self) -> str:
        """Where the stream goes, for messages: 'local pid 4242', 'ssh node1:22'."""
        ...

    async def read(self) -> bytes:
        """The next chunk of bytes from the agent; b"" once the agent's side is closed."""
        ...

    def write(self, data: bytes) -> None:
        """Queue bytes for the agent (never blocks; pair with `drain`)."""
        ...

    def write_parts(self, parts: Sequence[Buffer]) -> None:
        """Queue these buffers, in order, as if joined (a stream that can write them without
        joining, a pipe, does so; the others join)."""
        ...

    async def drain(self) -> None:
        """Wait until queued bytes are below the stream's high-water mark (flow control); a
        pipe's is zero: everything handed to the kernel."""
        ...

    async def close(self, timeout: float = 2.0) -> None:
        """Orderly shutdown: EOF to the agent, wait up to `timeout`, then terminate and kill."""
        ...

    def kill(self) -> None:
        """Abandon the stream now (the agent is presumed dead or hung)."""
        ...

    async def how_it_ended(self, timeout: float) -> str:
        """How the agent's process ended ("killed by signal 9 (SIGKILL)", "exited with code
        70"), waiting up to `timeout` for it to end; where the link to it closed without word
        of that, how the link ended ("the SSH connection (...) closed ..."); "" where neither
        is known here."""
        ...

    async def last_words(self, timeout: float) -> str:
        """The agent's last stderr line once its stderr has ended (waiting up to `timeout`),
        or "": why an agent that exited before saying hello did so ("No module named
        batuta", a bad option)."""
        ...


COALESCE_BELOW = 64 * 1024
"""Buffers smaller than this are joined with their neighbours before an encrypting write."""


def coalesced(parts: Sequence[Buffer], below: int = COALESCE_BELOW) -> list[Buffer]:
    """`parts` for a stream that copies (and encrypts) each write into packets of its own:
    runs of small buffers (frame headers, small messages) joined into one write, so that
    they share packets; large ones (arrays, chunks) passed as they are, so that they are
    not copied into a joined bytes object first, as flat byte views: a stream's `write` may
    test a part's truth (asyncssh's `if not data`, ambiguous for an array) or its type
    (asyncio's transports take only bytes, bytearray and memoryview)."""
    out: list[Buffer] = []
    run: list[Buffer] = []
    for part in parts:
        view = memoryview(part)
        if view.nbytes >= below:
            if run:
                out.append(b"".join(run))
                run = []
            out.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
        else:
            run.append(part)
    if run:
        out.append(b"".join(run))
    return out


class StreamClosedError(TransportError):
    """Writing to a stream whose far side has gone away."""


def signal_process(process: asyncio.subprocess.Process, signum: int, *, group: bool = False) -> None:
    """Send `signum` to a child started with asyncio, unless it is known to have exited;
    with `group`, to its whole process group (a child started with `start_new_session`).

    Not `process.send_signal`: its `Popen` polls first (waitpid WNOHANG), and a child that
    has just exited is reaped there instead of by asyncio's child watcher, which then logs
    "Unknown child process pid N, will report returncode 255" on the console and reports 255
    for the real exit code (an agent exiting at start-up, killed on the EOF it caused). A
    signal to the zombie of a child not yet reaped does nothing."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, signum)
            else:
                os.kill(process.pid, signum)


def describe_exit(returncode: int) -> str:
    """A process's exit status in words: "exited with code 3", "killed by signal 9 (SIGKILL)"."""
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {number} ({name})"
    return f"exited with code {returncode}"


async def wait_for_exit(process: asyncio.subprocess.Process, timeout: float) -> int | None:
    """The process's exit code, or None if it is still running after `timeout` seconds."""
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        return None


class StderrTail:
    """The last few non-blank lines an agent wrote to stderr, and whether stderr has ended."""

    def __init__(self, keep: int = 5) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self.ended = asyncio.Event()

    def add(self, line: str) -> None:
        if line.strip():
            self.lines.append(line.strip())

    async def last(self, timeout: float) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ended.wait(), timeout)
        return self.lines[-1] if self.lines else ""


async def forward_stderr(
    reader: asyncio.StreamReader | None, logger: logging.Logger, prefix: str, tail: StderrTail | None = None
) -> None:
    """Send each line the agent writes to stderr into our logs (and `tail`); ends at EOF."""
    try:
        await _forward_lines(reader, logger, prefix, tail)
    finally:
        if tail is not None:
            tail.ended.set()


async def _forward_lines(
    reader: asyncio.StreamReader | None, logger: logging.Logger, prefix: str, tail: StderrTail | None
) -> None:
    if reader is None:
        return
    while True:
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):  # an absurdly long line: skip it
            continue
        except ConnectionError:
            return
        if not line:
            return
        log_stderr_line(logger, prefix, line, tail)


def printed_prefix(task_id: int) -> str:
    """How a host marks each line a kernel printed, in its log: `log_stderr_line` keeps those
    at info (a kernel's prints are its result's stdout and stderr already; at the console, a
    chatty kernel buried the warnings)."""
    return f"task {task_id} printed: "


_PRINTED = re.compile(r"task \d+ printed: ")
# The bootstrap launcher finding no batuta on the host (runtime/install.py's NOT_INSTALLED):
# the install that follows says so at once, in better words; as a warning it read as a fault.
_BOOTSTRAP = "batuta bootstrap: "
_DETAIL = ("Traceback (most recent call last)", " ", "\t", _BOOTSTRAP)
MAX_LINE_CHARS = 2000  # of one stderr line in our log; a kernel printing 100 KB on one line made one record of it


def log_stderr_line(logger: logging.Logger, prefix: str, line: bytes, tail: StderrTail | None) -> None:
    """One line an agent wrote to stderr: a warning in our log, and the tail's latest. A
    traceback's heading and frames (indented) go at info: an agent that dies at import is one
    warning at the console, its exception, and whole in a log file at info. So does what a
    kernel printed (`printed_prefix`)."""
    text = line.decode("utf-8", errors="replace").rstrip()
    detail = (
        text.startswith(("Traceback (most recent call last)", " ", "\t", _BOOTSTRAP))
        or _PRINTED.match(text) is not None
    )
    if len(text) > MAX_LINE_CHARS:
        text = f"{text[:MAX_LINE_CHARS]} … ({len(text) - MAX_LINE_CHARS:,} more characters)"
    logger.log(logging.INFO if detail else logging.WARNING, "%s: %s", prefix, text)
    if tail is not None:
        tail.add(text)
