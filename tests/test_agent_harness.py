"""A coordinator stand-in for agent tests: starts `python -m batuta.agent` with pipes and
speaks the protocol to it with `Connection(Role.COORDINATOR)`.

No sleeps: tests wait on messages (`wait_for`, `outcome`) or process exits, each with a
bounded timeout. Every process started here is killed by PID in `stop()`, including every
descendant seen (slots, binaries), also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from batuta.agent.spawn import SPAWN_ENV
from batuta.core.task import BinaryCall, KernelCall
from batuta.protocol.connection import CLOSED, NEED_DATA, Connection, Role
from batuta.protocol.messages import (
    PROTOCOL_VERSION,
    Done,
    Heartbeat,
    Hello,
    Message,
    Started,
    TaskOutcome,
    TaskRequest,
    Welcome,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0  # generous: CI machines have 2 cores and slots import numpy

T = TypeVar("T")

# A kernel module the tests load into slots with --kernel-module.
TEST_KERNELS = """
import os
import sys

from batuta.kernels.registry import kernel


@kernel("test_boom")
def boom(message):
    raise ValueError(message)


@kernel("test_print")
def shout(text):
    print(text)                       # Python-level stdout
    sys.stdout.flush()
    os.write(1, b"raw write to fd 1\\n")  # C-level stdout
    return text


@kernel("test_unsendable")
def unsendable():
    return object()


@kernel("test_pid")
def pid():
    return os.getpid()
"""


def kernel_task(task_id: int, name: str, *args: Any, slot: int = 0, **options: Any) -> TaskRequest:
    return TaskRequest(task_id=task_id, slot=slot, attempt=1, call=KernelCall(name=name, args=args), **options)


def binary_task(
    task_id: int,
    path: str,
    *args: str,
    slot: int = 0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    **options: Any,
) -> TaskRequest:
    return TaskRequest(
        task_id=task_id,
        slot=slot,
        attempt=1,
        call=BinaryCall(path=path, args=args, env=env or {}, cwd=cwd),
        backend="cpu",
        **options,
    )


class AgentProcess:
    """One agent subprocess and the coordinator's end of its stream."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.conn = Connection(Role.COORDINATOR)
        self.hello: Hello | None = None
        self.messages: list[Message] = []  # everything but Done and Started, in order
        self.outcomes: dict[int, TaskOutcome] = {}
        self.outcome_count: dict[int, int] = {}
        self.started: list[int] = []
        self.closed = False  # the agent closed its stdout
        self.protocol_error: Exception | None = None
        self.stderr = bytearray()
        self._changed = asyncio.Condition()
        self._seen_pids: set[int] = set()
        self._tasks = [
            asyncio.create_task(self._read_frames()),
            asyncio.create_task(self._read_stderr()),
        ]

    @classmethod
    async def start(
        cls,
        *args: str,
        env: dict[str, str] | None = None,
        handshake: bool = True,
        heartbeat_interval: float = 60.0,
    ) -> AgentProcess:
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "batuta.agent",
            "--stdio",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            cwd=str(REPO_ROOT),
        )
        agent = cls(proc)
        if handshake:
            await agent.handshake(heartbeat_interval)
        return agent

    async def handshake(self, heartbeat_interval: float = 60.0) -> Hello:
        self.hello = await self.wait_for(lambda: self._first(Hello), what="Hello")
        self.send(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=heartbeat_interval))
        return self.hello

    # -- I/O ------------------------------------------------------------------------------

    async def _read_frames(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                data = await self.proc.stdout.read(1 << 20)
                try:
                    self.conn.receive_data(data)
                    while (event := self.conn.next_event()) is not NEED_DATA:
                        if event is CLOSED:
                            break
                        self._record(event)
                except Exception as exc:  # the agent corrupted the stream: tests check this
                    self.protocol_error = exc
                    data = b""
                async with self._changed:
                    self._changed.notify_all()
                if not data:
                    break
        finally:
            self.closed = True
            async with self._changed:
                self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while data := await self.proc.stderr.read(65536):
            self.stderr += data
            if os.environ.get("BATUTA_TEST_ECHO_AGENT_STDERR"):
                sys.stderr.buffer.write(data)

    def _record(self, message: Message) -> None:
        if isinstance(message, Done):
            for outcome in message.results:
                self.outcomes[outcome.task_id] = outcome
                self.outcome_count[outcome.task_id] = self.outcome_count.get(outcome.task_id, 0) + 1
        elif isinstance(message, Started):
            self.started.extend(message.task_ids)
        else:
            self.messages.append(message)

    def send(self, *messages: Message) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.conn.send_many(messages))

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    # -- waiting --------------------------------------------------------------------------

    def _first(self, kind: type[T], where: Callable[[T], bool] = lambda m: True) -> T | None:
        for message in self.messages:
            if isinstance(message, kind) and where(message):
                return message
        return None

    def of_type(self, kind: type[T]) -> list[T]:
        return [m for m in self.messages if isinstance(m, kind)]

    async def wait_for(self, predicate: Callable[[], T | None], *, timeout: float = WAIT_S, what: str = "") -> T:
        """Wait until `predicate()` is truthy (checked after every message); return it."""

        async def waiter() -> T:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    if self.closed:
                        value = predicate()
                        if value:
                            return value
                        raise AssertionError(
                            f"agent closed its stream while waiting for {what or predicate}; "
                            f"stderr: {self.stderr.decode(errors='replace')[-2000:]}"
                        )
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or predicate}; messages: "
                f"{self.messages[-10:]}; stderr: {self.stderr.decode(errors='replace')[-2000:]}"
            ) from None

    async def message(self, kind: type[T], where: Callable[[T], bool] = lambda m: True, **kw: Any) -> T:
        return await self.wait_for(lambda: self._first(kind, where), what=kind.__name__, **kw)

    async def heartbeats(self, count: int) -> list[Heartbeat]:
        """The first `count` heartbeats, once they have arrived."""

        def enough() -> list[Heartbeat] | None:
            beats = self.of_type(Heartbeat)
            return beats[:count] if len(beats) >= count else None

        return await self.wait_for(enough, what=f"{count} heartbeats")

    async def outcome(self, task_id: int, timeout: float = WAIT_S) -> TaskOutcome:
        return await self.wait_for(
            lambda: self.outcomes.get(task_id), timeout=timeout, what=f"outcome of task {task_id}"
        )

    async def outcomes_for(self, task_ids: Iterable[int], timeout: float = WAIT_S) -> list[TaskOutcome]:
        ids = list(task_ids)
        await self.wait_for(
            lambda: all(t in self.outcomes for t in ids),
            timeout=timeout,
            what=f"outcomes of {len(ids)} tasks",
        )
        return [self.outcomes[t] for t in ids]

    async def started_task(self, task_id: int) -> None:
        await self.wait_for(lambda: task_id in self.started, what=f"Started for task {task_id}")

    async def exit_code(self, timeout: float = WAIT_S) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"agent did not exit within {timeout} s") from None

    # -- processes ------------------------------------------------------------------------

    def descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self._seen_pids.update(p.pid for p in found)
        return found

    def slot_process(self, slot: int) -> psutil.Process:
        """The live process of `slot` (slots name themselves "batuta-slot-N")."""
        for proc in self.descendants():
            with contextlib.suppress(psutil.Error):
                if proc.name() == f"batuta-slot-{slot}" and proc.status() != psutil.STATUS_ZOMBIE:
                    return proc
        raise AssertionError(f"no process for slot {slot} among the agent's children")

    async def stop(self) -> None:
        """Kill the agent and everything it started, by PID. Safe to call twice."""
        self.descendants()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        for pid in self._seen_pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 10)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def still_alive(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """PIDs among `pids` that have not exited within `timeout` (zombies count as exited).

    Waits on pidfds (readable once the process has terminated), so no polling and no sleeps.
    """
    loop = asyncio.get_running_loop()
    waits: dict[int, asyncio.Future[None]] = {}
    fds: list[int] = []
    for pid in set(pids):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        fds.append(fd)
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, done)
        waits[pid] = done
    try:
        if waits:
            await asyncio.wait(list(waits.values()), timeout=timeout)
        return sorted(pid for pid, done in waits.items() if not done.done())
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


def write_test_kernels(folder: Path) -> dict[str, str]:
    """Write the test kernel module into `folder`; returns env making it importable."""
    (folder / "batuta_test_kernels.py").write_text(TEST_KERNELS)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


StartAgent = Callable[..., Awaitable[AgentProcess]]
BOTH_SPAWN_MODES = pytest.mark.parametrize("start_agent", ["fork", "exec"], indirect=True)


@pytest.fixture
async def start_agent(request: pytest.FixtureRequest) -> AsyncIterator[StartAgent]:
    """Start agents; every one (and every process it started) is killed by PID afterwards.

    Slots are forked by default; tests marked with `BOTH_SPAWN_MODES` also run with slots
    started as fresh interpreters (`BATUTA_SLOT_SPAWN=exec`).
    """
    agents: list[AgentProcess] = []
    mode = getattr(request, "param", "fork")

    async def start(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> AgentProcess:
        agent = await AgentProcess.start(*args, env={SPAWN_ENV: mode, **(env or {})}, **kwargs)
        agents.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in agents:
            await agent.stop()


@pytest.fixture
def kernel_env(tmp_path: Path) -> dict[str, str]:
    return write_test_kernels(tmp_path)
