"""One host agent as the coordinator sees it: a byte stream, a protocol object, liveness.

`HostSession` owns no scheduling policy. It opens the transport, completes the handshake,
turns incoming messages into calls on a `HostListener` (the pool), and coalesces outgoing
messages into one write per event-loop turn. Liveness is "when did we last hear anything":
heartbeats guarantee we hear something at least every heartbeat interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from batuta._version import __version__
from batuta.errors import AgentError, TransportError
from batuta.protocol import messages as m
from batuta.protocol.codec import encode_message
from batuta.protocol.connection import CLOSED, NEED_DATA, Connection, Role
from batuta.protocol.errors import ProtocolError
from batuta.transport.base import ByteStream

log = logging.getLogger("batuta.runtime.host")
LAST_WORDS_WAIT_S = 1.0  # for an agent's stderr to end after its stdout did, when it dies at start-up

Launcher = Callable[[], Awaitable[ByteStream]]


@dataclass(frozen=True, slots=True, kw_only=True)
class HostSpec:
    """How to reach one host agent. `launch` opens a fresh stream (it is called again to relaunch)."""

    name: str
    launch: Launcher
    expected_capabilities: tuple[frozenset[str], ...] = ()  # what its slots will offer, if known
    tags: frozenset[str] = frozenset()  # extra capabilities every slot of this host offers
    check_versions: bool = True


class HostListener(Protocol):
    """What a session reports to (the pool). Every call happens on the event loop."""

    def host_ready(self, session: HostSession) -> None: ...
    def host_messages(self, session: HostSession, messages: list[m.Message]) -> None: ...
    def host_closed(self, session: HostSession, reason: str) -> None: ...


class HostState:
    STARTING = "starting"
    UP = "up"
    SUSPECTED = "suspected"
    LOST = "lost"
    DRAINING = "draining"
    CLOSED = "closed"


@dataclass(eq=False)
class HostSession:
    spec: HostSpec
    listener: HostListener
    heartbeat_interval: float
    handshake_timeout: float = 30.0
    state: str = HostState.STARTING
    hello: m.Hello | None = None
    last_heard: float = 0.0
    generation: int = 0  # bumps at each (re)launch, so stale callbacks are ignored
    _stream: ByteStream | None = None
    _conn: Connection | None = None
    _reader: asyncio.Task[None] | None = None
    _outbox: list[m.Message] = field(default_factory=list)
    _flush_scheduled: bool = False
    _closing: bool = False
    _ready: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self._stream.description if self._stream is not None else self.spec.name

    async def start(self) -> None:
        """Launch the agent and complete the handshake; raises AgentError or TransportError."""
        self.generation += 1
        self._closing = False
        self.state = HostState.STARTING
        self.hello = None
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._stream = await self.spec.launch()
        self._conn = Connection(Role.COORDINATOR)
        self.last_heard = time.monotonic()
        self._reader = asyncio.create_task(self._read_loop(self.generation), name=f"read-{self.name}")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.handshake_timeout)
        except TimeoutError:
            self.kill()
            raise AgentError(
                f"host {self.name}: agent did not say hello within {self.handshake_timeout:g}s "
                f"({self.description}); check that batuta is installed there"
            ) from None

    def send(self, message: m.Message) -> None:
        """Queue a message; all messages queued in one loop turn go out in one write."""
        if self.state in (HostState.LOST, HostState.CLOSED) or self._closing:
            return
        self._outbox.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox or self._conn is None or self._stream is None:
            return
        outbox, self._outbox = self._outbox, []
        try:
            self._stream.write_parts(self._conn.send_many_parts(outbox))
        except (ProtocolError, TransportError) as exc:
            self._fail(f"cannot send to {self.description}: {exc}")

    async def _read_loop(self, generation: int) -> None:
        assert self._stream is not None and self._conn is not None
        stream, conn = self._stream, self._conn
        reason = "agent closed the stream"
        try:
            while True:
                data = await stream.read()
                conn.receive_data(data)
                batch: list[m.Message] = []
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA or event is CLOSED:
                        break
                    batch.append(event)
                if batch:
                    self.last_heard = time.monotonic()
                    if generation != self.generation:
                        return
                    self._dispatch(batch)
                if not data or event is CLOSED:
                    if self.hello is None:
                        said = await stream.last_words(LAST_WORDS_WAIT_S)
                        reason = (
                            f"agent exited before saying hello: {said}"
                            if said
                            else "agent exited before saying hello (is batuta installed for that python?)"
                        )
                    break
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            # the connection refuses use after an error, so encode the goodbye by hand
            with contextlib.suppress(Exception):
                stream.write(encode_message(m.Error(message=str(exc))))
        except asyncio.CancelledError:
            return
        except Exception as exc:  # a bug in a listener must not leave the session half-dead
            log.exception("host %s: reader failed", self.name)
            reason = f"internal error: {exc!r}"
        if generation == self.generation:
            self._fail(reason)

    def _dispatch(self, batch: list[m.Message]) -> None:
        if self.hello is None:
            first = batch[0]
            if isinstance(first, m.Error):
                self._fail(f"agent refused: {first.message}")
                return
            if not isinstance(first, m.Hello):
                self._fail(f"agent sent {type(first).__name__} before Hello")
                return
            problem = self._check_hello(first)
            if problem:
                with contextlib.suppress(Exception):
                    assert self._conn is not None and self._stream is not None
                    self._stream.write(self._conn.send(m.Error(message=problem)))
                self._fail(problem)
                return
            self.hello = first
            self.send(m.Welcome(protocol=m.PROTOCOL_VERSION, heartbeat_interval=self.heartbeat_interval))
            self.state = HostState.UP
            self.listener.host_ready(self)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            batch = batch[1:]
            if not batch:
                return
        self.listener.host_messages(self, batch)

    def _check_hello(self, hello: m.Hello) -> str:
        if not self.spec.check_versions:
            return ""
        if hello.batuta_version != __version__:
            return (
                f"host {self.name} runs batuta {hello.batuta_version}, the coordinator {__version__}; "
                f"install batuta=={__version__} there"
            )
        ours = ".".join(platform.python_version_tuple()[:2])
        theirs = ".".join(hello.python_version.split(".")[:2])
        if theirs != ours:
            return (
                f"host {self.name} runs Python {hello.python_version}, the coordinator {platform.python_version()}; "
                f"point the host's 'python' at a Python {ours} with batuta {__version__} installed"
            )
        return ""

    def _fail(self, reason: str) -> None:
        if self.state in (HostState.LOST, HostState.CLOSED):
            return
        was_closing = self._closing
        self.state = HostState.CLOSED if was_closing else HostState.LOST
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(AgentError(f"host {self.name}: {reason}"))
            self._ready.exception()  # retrieved here so an unawaited failure is not logged twice
        self.kill()
        self.listener.host_closed(self, reason)

    def mark_lost(self, reason: str) -> None:
        """Called by the liveness monitor: stop listening and kill the stream."""
        self._fail(reason)

    def kill(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.kill()

    async def close(self, timeout: float = 2.0) -> None:
        """Orderly: Shutdown, then EOF, then the transport's own escalation."""
        self._closing = True
        if self._conn is not None and self._stream is not None and self.state not in (HostState.LOST, HostState.CLOSED):
            with contextlib.suppress(Exception):
                self._flush()
                self._stream.write(self._conn.send(m.Shutdown(reason="coordinator closing")))
        self.state = HostState.CLOSED
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.close(timeout)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
