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
from batuta.transport.base import StreamClosedError, forward_stderr, wait_for_exit

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
    """The argv that starts a host agent speaking the protocol on stdin/stdout."""
    argv = [python or sys.executable, "-m", "batuta.agent", "--stdio", "--gpus", gpus]
    if slots is not None:
        argv += ["--slots", str(slots)]
    for module in kernel_modules:
        argv += ["--kernel-module", module]
    if name:
        argv += ["--name", name]
    return argv


class LocalStream:
    """A `ByteStream` over a child process's pipes."""

    def __init__(self, process: asyncio.subprocess.Process, stderr_task: asyncio.Task[None]) -> None:
        self._process = process
        self._stderr_task = stderr_task
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = process.stdout

    @property
    def description(self) -> str:
        return f"local agent pid {self._process.pid}"

    @property
    def pid(self) -> int:
        return self._process.pid

    async def read(self) -> bytes:
        try:
            return await self._stdout.read(READ_CHUNK)
        except (ConnectionError, OSError):
            return b""

    def write(self, data: bytes) -> None:
        if self._stdin.is_closing():
            raise StreamClosedError(f"{self.description}: stream closed")
        self._stdin.write(data)

    async def drain(self) -> None:
        try:
            await self._stdin.drain()
        except (ConnectionError, OSError) as exc:
            raise StreamClosedError(f"{self.description}: {exc}") from exc

    async def close(self, timeout: float = 2.0) -> None:
        """EOF first (the agent exits on its own and reaps its slots), then TERM, then KILL."""
        with contextlib.suppress(Exception):
            if not self._stdin.is_closing():
                self._stdin.close()
        if await wait_for_exit(self._process, timeout) is None:
            self._signal(signal.SIGTERM)
            if await wait_for_exit(self._process, timeout) is None:
                self._signal(signal.SIGKILL)
                await wait_for_exit(self._process, timeout)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._stderr_task, timeout)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            self._stdin.close()

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signum)


async def open_local_agent(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, name: str = "local"
) -> LocalStream:
    """Start the agent and return its stream. Raises TransportError if it cannot start."""
    child_env = dict(os.environ)
    if env:
        child_env.update(env)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env,
            limit=READ_CHUNK,
        )
    except OSError as exc:
        raise TransportError(f"cannot start the local agent ({argv[0]}): {exc}") from exc
    stderr_task = asyncio.create_task(
        forward_stderr(process.stderr, log, f"{name} agent[{process.pid}]"), name=f"stderr-{name}"
    )
    return LocalStream(process, stderr_task)
