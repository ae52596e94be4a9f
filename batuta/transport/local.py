"""Local transport: a host agent started as a subprocess of the coordinator, over pipes.

This is the embedded default (`batuta tui` or `batuta run` with no cluster file) and the
way tests get real agents without SSH. The agent's stdin/stdout carry the framed stream;
its stderr goes to our logs. Secrets never travel in argv; the environment is inherited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from batuta.errors import TransportError
from batuta.transport.base import (
    Buffer,
    StderrTail,
    StreamClosedError,
    describe_exit,
    forward_stderr,
    signal_process,
    wait_for_exit,
)
from batuta.transport.fdio import FdPull, FdWriter, widen_pipe

log = logging.getLogger("batuta.transport.local")

READ_CHUNK = 256 * 1024


def agent_command(
    *,
    slots: int | None = None,
    gpus: str = "auto",
    kernel_modules: Sequence[str] = (),
    name: str | None = None,
    python: str | None = None,
) -> list[str]:
    """The argv that starts a host agent speaking the protocol on stdin/stdout.

    `-P`: the folder the agent starts in is not on its import path (`-m` would put it first),
    so a `signal.py` or `random.py` there (the job's folder on this machine, the login's home
    over SSH) neither shadows the standard library in the agent nor makes code importable
    that was never shipped: the hosts import what the coordinator sent (runtime/code.py)."""
    argv = [python or sys.executable, "-P", "-m", "batuta.agent", "--stdio", "--gpus", gpus]
    if slots is not None:
        argv += ["--slots", str(slots)]
    for module in kernel_modules:
        argv += ["--kernel-module", module]
    if name:
        argv += ["--name", name]
    return argv


class LocalStream:
    """A `ByteStream` over a child process's pipes.

    Writes go through an `FdWriter` on a pipe of our own rather than asyncio's pipe
    transport, which copies every frame it cannot write at once into one growing bytearray
    (see batuta/transport/fdio.py): arrays sent to a local agent would spend more CPU in
    that copy than anywhere else. Reads come from a pipe of our own too (`FdPull`), so that
    a large result is read straight into the array it decodes into (`read_into`), not into
    a stream buffer, then a bytes object, then the array.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        stdin: FdWriter,
        stdout: FdPull,
        stderr_task: asyncio.Task[None],
        stderr_tail: StderrTail,
    ) -> None:
        self._process = process
        self._stderr_task = stderr_task
        self._stderr_tail = stderr_tail
        self._stdin = stdin
        self._stdout = stdout

    @property
    def description(self) -> str:
        return f"local agent pid {self._process.pid}"

    @property
    def pid(self) -> int:
        return self._process.pid

    async def read(self) -> bytes:
        return await self._stdout.read(READ_CHUNK)

    async def read_into(self, view: memoryview) -> int:
        """Read into `view` (the decoder's buffer); 0 at end of stream."""
        return await self._stdout.read_into(view)

    def write(self, data: bytes) -> None:
        if self._stdin.failed or self._stdin.closed:
            raise StreamClosedError(f"{self.description}: stream closed")
        self._stdin.write(data)

    def write_parts(self, parts: Sequence[Buffer]) -> None:
        if self._stdin.failed or self._stdin.closed:
            raise StreamClosedError(f"{self.description}: stream closed")
        self._stdin.write_parts(parts)

    async def drain(self) -> None:
        await self._stdin.drain()
        if self._stdin.failed:
            raise StreamClosedError(f"{self.description}: the agent stopped reading its stdin")

    async def close(self, timeout: float = 2.0) -> None:
        """EOF first (the agent exits on its own and reaps its slots), then TERM, then KILL;
        then whatever is left of its process group."""
        self._stdin.close()
        if await wait_for_exit(self._process, timeout) is None:
            self._signal(signal.SIGTERM)
            if await wait_for_exit(self._process, timeout) is None:
                self._signal(signal.SIGKILL)
                await wait_for_exit(self._process, timeout)
        # A `[local] python` that is a script may have left a child behind (holding the stderr
        # pipe open, so the stderr reader and asyncio's transport would never finish). The
        # group outlives its leader while a member is left, so its id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._stderr_task, timeout)
        self._stdout.close()

    async def how_it_ended(self, timeout: float) -> str:
        returncode = await wait_for_exit(self._process, timeout)
        return describe_exit(returncode) if returncode is not None else ""

    async def last_words(self, timeout: float) -> str:
        return await self._stderr_tail.last(timeout)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self._stdin.close()

    def _signal(self, signum: int) -> None:
        signal_process(self._process, signum, group=True)


async def open_local_agent(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, name: str = "local"
) -> LocalStream:
    """Start the agent and return its stream. Raises TransportError if it cannot start."""
    child_env = dict(os.environ)
    if env:
        child_env.update(env)
    stdin_read, stdin_write = os.pipe()  # all close-on-exec; the child gets its ends as fds 0 and 1
    stdout_read, stdout_write = os.pipe()
    widen_pipe(stdin_write)
    widen_pipe(stdout_write)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=stdin_read,
            stdout=stdout_write,
            stderr=asyncio.subprocess.PIPE,
            env=child_env,
            limit=READ_CHUNK,
            # Its own process group, so that a signal reaches what a wrapper script around the
            # agent started too, and Ctrl-C at the terminal reaches the coordinator alone (which
            # then closes the agent in order). Slots lead groups of their own (spawn.py).
            start_new_session=True,
        )
    except OSError as exc:
        os.close(stdin_write)
        os.close(stdout_read)
        raise TransportError(f"cannot start the local agent ({argv[0]}): {exc}") from exc
    finally:
        os.close(stdin_read)
        os.close(stdout_write)
    loop = asyncio.get_running_loop()
    stdin = FdWriter(loop, stdin_write)
    stdout = FdPull(loop, stdout_read)
    tail = StderrTail()
    stderr_task = asyncio.create_task(
        forward_stderr(process.stderr, log, f"{name} agent[{process.pid}]", tail), name=f"stderr-{name}"
    )
    return LocalStream(process, stdin, stdout, stderr_task, tail)
