"""One host agent as the coordinator sees it: a byte stream, a protocol object, liveness.

`HostSession` owns no scheduling policy. It opens the transport, completes the handshake,
turns incoming messages into calls on a `HostListener` (the pool), and coalesces outgoing
messages into one write per event-loop turn. Liveness is "when did we last hear anything":
heartbeats guarantee we hear something at least every heartbeat interval; the pool's
liveness state machine (`batuta.core.liveness`) decides what silence means.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from batuta._version import __version__
from batuta.core.task import host_tag_problem
from batuta.errors import AgentError, BatutaError, HostUnusableError, TransportError, UsageError
from batuta.protocol import messages as m
from batuta.protocol.chunks import DEFAULT_STREAM_MIN_BYTES
from batuta.protocol.codec import encode_message, starts_a_frame
from batuta.protocol.connection import CLOSED, NEED_DATA, Connection, Role
from batuta.protocol.errors import ProtocolError
from batuta.runtime.round_trip import RoundTripMeter
from batuta.runtime.turns import LoopTurns
from batuta.transport.base import ByteStream
from batuta.transport.datalink_setting import DataLinkSetting
from batuta.transport.dropbehind import DropBehind

log = logging.getLogger("batuta.runtime.session")
LAST_WORDS_WAIT_S = 1.0  # for an agent's stderr to end after its stdout did, when it dies at start-up
ENDED_WAIT_S = 0.5  # for an agent whose stream ended to be seen to exit, to say how
_FIRST_BYTES_SHOWN = 40  # of a stream that did not start with a frame
# How CPython ends its refusal of a command-line option. The agent's only interpreter option
# is -P (new in 3.11), so this is a Python 3.10 or older ("Unknown option: -P" before it).
_PYTHON_USAGE = "Try `python -h' for more information"


def _too_old(python: str) -> str:
    which = python or "its python3"
    return (
        f"{which} does not know -P, so it is older than Python 3.11, which batuta needs; install a newer "
        "Python there and set python for this host in the cluster file, or set bootstrap = true"
    )


def _install_command(spec: HostSpec) -> str:
    """`batuta cluster install` for the host's cluster file, named as it was given where known."""
    return f"batuta cluster install --cluster {shlex.quote(spec.cluster_file) if spec.cluster_file else 'FILE'}"


def _install_hint(said: str, spec: HostSpec) -> str:
    """The fix, where the host's python said it has no batuta: the command that puts it there."""
    if "No module named 'batuta'" not in said and "No module named batuta" not in said:
        return ""
    return f"; install it there with `{_install_command(spec)}`, or set bootstrap = true for the host"


def _ended(how: str) -> str:
    """Why a host's stream ended, from `ByteStream.how_it_ended`: how its agent's process
    ended, if known, else how the link closed. A SIGKILL nobody here sent is most often the
    kernel's out-of-memory killer."""
    if not how:
        return "agent closed the stream"
    if not how.startswith(("killed", "exited")):  # the link's end, not the agent's: in the stream's words
        return how
    if "SIGKILL" in how:
        return f"the agent was {how}: out of memory on the host (the kernel's OOM killer), if no one killed it"
    return f"the agent was {how}" if how.startswith("killed") else f"the agent {how}"


def _not_an_agent(first: bytes, exc: ProtocolError, description: str = "") -> str:
    """Why a stream failed before the hello, when its first bytes were no frame: most often
    text printed ahead of the agent (a login banner, a shell startup file, a wrapper script);
    at a TLS address, something else than a `batuta worker` listening there."""
    text = first.decode("utf-8", "replace")
    # U+FFFD is printable, and undecodable bytes shown as text were mojibake
    printable = sum((c.isprintable() and c != "\ufffd") or c in "\r\n\t" for c in text) >= 0.9 * len(text)
    shown = repr(text) if printable else first[:16].hex(" ") + " ..."
    what = "text" if printable else "bytes"
    if description.startswith("tls "):
        return (
            f"protocol error before the worker's hello: it began with {what} {shown}, not a batuta frame ({exc}); "
            "is that address a `batuta worker` of the same batuta version, and not another service?"
        )
    return (
        f"protocol error before the agent's hello: its stdout began with {what} {shown}, not a batuta frame "
        f"({exc}); something printed before the agent started (a login banner, a shell startup file or a "
        "wrapper script): make it print nothing when not interactive, or to stderr"
    )


Launcher = Callable[[], Awaitable[ByteStream]]


@dataclass(frozen=True, slots=True, kw_only=True)
class HostSpec:
    """How to reach one host agent. `launch` opens a fresh stream (it is called again to relaunch)."""

    name: str
    launch: Launcher
    expected_capabilities: tuple[frozenset[str], ...] = ()  # what its slots will offer, if known
    tags: frozenset[str] = frozenset()  # extra capabilities every slot of this host offers
    check_versions: bool = True
    kernel_modules: tuple[str, ...] = ()  # what it imports by name; the pool ships those that are the user's
    joins_later: bool = False  # an allocation's node: the pool starts without waiting for it (runtime/allocation.py)
    data_link: DataLinkSetting | None = None  # big arrays beside the stream (runtime/datalink.py); None: off
    python: str = ""  # the interpreter its agent runs with, where known here (for messages); "": unknown
    cluster_file: str = ""  # the cluster file naming it, as given (its fixes name it); "": none
    # True while its launch installs batuta there (bootstrap = true): start-up waits for it past start_wait
    installing: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        # checked as the cluster file's tags are (a "gpu" tag gave CPU slots GPU tasks)
        if isinstance(self.tags, str):
            raise UsageError(f"host {self.name!r}: tags={self.tags!r}: pass a set of tags, e.g. tags={{{self.tags!r}}}")
        for tag in self.tags:
            problem = host_tag_problem(tag)
            if problem is not None:
                raise UsageError(f"host {self.name!r}: tags: {problem}")
        if not isinstance(self.tags, frozenset):  # a list or set given: the pool unites them with slots' sets
            object.__setattr__(self, "tags", frozenset(self.tags))


@dataclass(slots=True)
class SendBudget:
    """Bytes written to hosts whose streams have not drained yet, over all of a pool's
    sessions; `Pool.submit` waits while it is over the pool's `send_budget`."""

    congested_bytes: int = 0


class SideLink(Protocol):
    """Something that lives as long as one session's stream (its data link)."""

    def close(self) -> None: ...

    @property
    def sending_bytes(self) -> int: ...


BYTES_HEARD_EVERY_S = 0.25  # a frame arriving in parts refreshes the host's liveness this often


class HostListener(Protocol):
    """What a session reports to (the pool). Every call happens on the event loop."""

    def host_ready(self, session: HostSession) -> None: ...
    def host_messages(self, session: HostSession, messages: list[m.Message]) -> None: ...
    def host_closed(self, session: HostSession, reason: str) -> None: ...
    def host_writable(self, session: HostSession) -> None: ...


@dataclass(eq=False)
class HostSession:
    """The coordinator's end of one host agent's stream.

    It has one writer: messages queued by `send` in one loop turn go out in one vectored
    write, and once `high_water` bytes have been written since the stream last drained, the
    writer waits for `drain()` before encoding more. Messages queued meanwhile wait as
    objects (their arrays are the caller's own), so a host that stops reading holds at most
    about `high_water` encoded bytes here, not everything sent to it.

    Arrays of `stream_min_bytes` or more stream (`protocol/chunks.py`): their frame goes out
    with the others, their chunks (views of the caller's array) fill what is left of each
    write up to `high_water`, and every drain lets the messages queued meanwhile go first. So
    heartbeat answers, other tasks and their arrays keep moving during a transfer of any
    size, and the bytes in flight stay bounded by `high_water`, not by the value.
    """

    spec: HostSpec
    listener: HostListener
    heartbeat_interval: float
    # The agent exits after this long without a byte from us (Welcome.silence_limit; 0: never):
    # a host cut off by a partition gets no end of stream. We send a Keepalive where we would
    # otherwise be silent for a tenth of it (answering a heartbeat, so no timer of our own).
    silence_limit: float = 0.0
    handshake_timeout: float = 30.0
    high_water: int = 16 * 2**20
    stream_min_bytes: int = DEFAULT_STREAM_MIN_BYTES
    budget: SendBudget = field(default_factory=SendBudget)
    turns: LoopTurns = field(default_factory=LoopTurns)  # shared by a pool's sessions: inbound work per loop iteration
    round_trip: RoundTripMeter = field(default_factory=RoundTripMeter)  # estimated from its results (round_trip.py)
    code: m.Code | None = None  # the user's code, sent right after every Welcome (see runtime/code.py)
    hello: m.Hello | None = None
    generation: int = 0  # bumps at each (re)launch, so stale callbacks are ignored
    # slots this agent gave up (inbound.slot_down), with why: several in one batch of messages are
    # said before the scheduler has handled the first one's loss, and an undrain says why
    given_up: dict[str, str] = field(default_factory=dict)
    unflushed_bytes: int = 0  # written since the stream last drained
    _stream: ByteStream | None = None
    _conn: Connection | None = None
    _reader: asyncio.Task[None] | None = None
    _outbox: list[m.Message] = field(default_factory=list)
    _outbox_bytes: list[int] = field(default_factory=list)  # the senders' estimates, per message
    _flush_scheduled: bool = False
    _drainer: asyncio.Task[None] | None = None
    _congested: int = 0  # what this session adds to the budget's congested bytes
    _open: bool = False  # handshake done, stream not failed, not closing
    _closing: bool = False
    _ready: asyncio.Future[None] | None = None
    _written_at: float = 0.0  # time.monotonic() of our last write to the agent
    _bytes_heard_at: float = 0.0  # time.monotonic() when bytes of an unfinished frame last counted as heard
    data_link: SideLink | None = None  # closed with the stream

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self._stream.description if self._stream is not None else self.spec.name

    @property
    def code_digest(self) -> str:
        """The digest every task sent to this host names ("" when no code is shipped)."""
        return self.code.digest if self.code is not None else ""

    @property
    def receiving_bytes(self) -> int:
        """Bytes allocated for streamed arrays from this host still arriving."""
        return self._conn.receiving_bytes if self._conn is not None else 0

    @property
    def sending_bytes(self) -> int:
        """Bytes of streamed arrays to this host not yet written, on the channel or its data link."""
        linked = self.data_link.sending_bytes if self.data_link is not None else 0
        return linked + (self._conn.outgoing.pending_bytes if self._conn is not None else 0)

    @property
    def stream(self) -> ByteStream | None:
        return self._stream

    @property
    def connection(self) -> Connection | None:
        return self._conn

    @property
    def is_open(self) -> bool:
        """Handshake done, stream not failed, not closing: what `send` queues goes out."""
        return self._open

    @property
    def closing(self) -> bool:
        """`close` has begun: what its links do from now on is the end, not a fault."""
        return self._closing

    @property
    def congested(self) -> bool:
        """The writer is waiting for the host to take what was written (flow control)."""
        return self._drainer is not None

    async def start(self) -> None:
        """Launch the agent and complete the handshake; raises AgentError or TransportError."""
        self.generation += 1
        self.given_up = {}
        self._closing = False
        self._open = False
        self.hello = None
        self.unflushed_bytes = 0
        self._outbox, self._outbox_bytes = [], []
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._stream = await self.spec.launch()
        if self._conn is not None:
            self._conn.discard_transfers()
        self._conn = Connection(Role.COORDINATOR, stream_min_bytes=self.stream_min_bytes)
        self._conn.outgoing.behind = DropBehind  # _flush asks for more chunks once the last write drained
        self._reader = asyncio.create_task(self._read_loop(self.generation), name=f"read-{self.name}")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.handshake_timeout)
        except TimeoutError:
            self.kill()
            raise AgentError(
                f"host {self.name}: agent did not say hello within {self.handshake_timeout:g}s "
                f"({self.description}); check that batuta is installed there, or give it longer "
                f"(start_timeout, in the cluster file's [pool] table)"
            ) from None

    def send(self, message: m.Message, nbytes: int = 0) -> None:
        """Queue a message; all messages queued in one loop turn go out in one write, up to
        `high_water` bytes. `nbytes`: the caller's estimate of its array payload, so that the
        writer can stop before a write that would take it far past the mark."""
        if not self._open:
            return
        self._outbox.append(message)
        self._outbox_bytes.append(nbytes)
        if not self._flush_scheduled and self._drainer is None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self._conn
        if conn is None or self._stream is None or self._drainer is not None:
            return
        if not self._outbox and not conn.streaming:
            return
        room = self.high_water - self.unflushed_bytes
        take, estimate = 0, 0
        for nbytes in self._outbox_bytes:  # at least one message; then as many as fit
            if take and estimate + nbytes > room:
                break
            take += 1
            estimate += nbytes
        batch = self._outbox[:take]
        del self._outbox[:take], self._outbox_bytes[:take]
        try:
            parts = conn.send_many_parts(batch) if batch else []
            written = sum(memoryview(part).nbytes for part in parts)
            if conn.streaming and not self._outbox and written < room:
                # chunks of what is streaming fill the rest of this write
                chunks = conn.next_chunk_parts(room - written)
                written += sum(memoryview(part).nbytes for part in chunks)
                parts += chunks
            self._stream.write_parts(parts)
            self._written_at = time.monotonic()
        except (ProtocolError, TransportError) as exc:
            said = str(exc).removeprefix(f"{self.description}: ")  # a stream's error names it already
            self._fail(f"cannot send to {self.description}: {said}")
            return
        except Exception as exc:  # a bug on our side: lose this host (its tasks requeued), never hang it
            log.exception("sending to %s failed", self.description)
            self._fail(
                f"cannot send to {self.description}: {type(exc).__name__}: {exc} (a batuta bug; please report it)"
            )
            return
        self.unflushed_bytes += written
        if self.unflushed_bytes >= self.high_water or self._outbox or conn.streaming:
            # wait for the host to take it; what is still queued goes out after
            self._congested = self.unflushed_bytes
            self.budget.congested_bytes += self._congested
            self._drainer = asyncio.create_task(self._drain(self.generation), name=f"drain-{self.name}")

    async def _drain(self, generation: int) -> None:
        assert self._stream is not None
        stream = self._stream
        try:
            await stream.drain()
        except TransportError as exc:
            if generation == self.generation:
                self._end_congestion()
                # most often the agent died: how it ended says more than the broken pipe
                how = "" if self._closing else await stream.how_it_ended(ENDED_WAIT_S)
                if generation == self.generation:
                    said = str(exc).removeprefix(f"{self.description}: ")
                    self._fail(_ended(how) if how else f"cannot send to {self.description}: {said}")
            return
        if generation != self.generation:
            return
        self._end_congestion()
        self.unflushed_bytes = 0
        if self._conn is not None:
            self._conn.outgoing.written()
        self._flush()
        if self._drainer is None:
            self.listener.host_writable(self)

    async def _read_loop(self, generation: int) -> None:
        assert self._stream is not None and self._conn is not None
        stream, conn = self._stream, self._conn
        # a stream that can read into memory it is given (a pipe) fills large frames and
        # streamed arrays directly: no stream buffer, no bytes object, one copy
        read_into: Callable[[memoryview], Awaitable[int]] | None = getattr(stream, "read_into", None)
        reason = "agent closed the stream"
        first = b""  # the stream's first bytes, to show when they are not a frame at all
        try:
            while True:
                into = conn.receive_buffer() if read_into is not None else None
                if into is not None and read_into is not None:
                    count = await read_into(into)
                    ended = not count
                    if ended:
                        conn.receive_data(b"")
                    else:
                        first = first or bytes(into[: min(count, _FIRST_BYTES_SHOWN)])
                        conn.received(count)
                else:
                    data = await stream.read()
                    ended = not data
                    first = first or data[:_FIRST_BYTES_SHOWN]
                    conn.receive_data(data)
                batch: list[m.Message] = []
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA or event is CLOSED:
                        break
                    batch.append(event)
                if batch:
                    while self.turns.spent():  # this loop iteration did enough: the next one handles it
                        await self.turns.next_turn()
                    if generation != self.generation:
                        return
                    self._dispatch(batch)
                elif self.hello is not None and not ended:
                    self._heard_bytes()
                if ended or event is CLOSED:
                    if self.hello is None:
                        said = await stream.last_words(LAST_WORDS_WAIT_S)
                        reason = (
                            f"agent exited before saying hello: {said}{_install_hint(said, self.spec)}"
                            if said
                            else "agent exited before saying hello, with nothing on stderr (is batuta installed for "
                            f"{self.spec.python or 'that python'}? "
                            f"`{_install_command(self.spec)}` puts it there)"
                        )
                        if said.startswith(_PYTHON_USAGE):  # the interpreter refused its options: too old
                            if generation == self.generation:
                                self._fail(_too_old(self.spec.python), HostUnusableError)
                            return
                    elif not self._closing:  # a loss: say how the agent ended, if that can be known
                        reason = _ended(await stream.how_it_ended(ENDED_WAIT_S))
                    break
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            if self.hello is None and first and not starts_a_frame(first):
                reason = _not_an_agent(first, exc, stream.description)
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

    def take_ready(self) -> None:
        """Deliver the messages whose streamed arrays a data link completed (the reader
        only looks when bytes arrive on the stream)."""
        conn = self._conn
        if conn is None or not self._open:
            return
        batch: list[m.Message] = []
        try:
            while (event := conn.next_event()) is not NEED_DATA and event is not CLOSED:
                batch.append(event)
        except ProtocolError as exc:
            self._fail(f"protocol error: {exc}")
            return
        if batch:
            self._dispatch(batch)

    def _heard_bytes(self) -> None:
        """Bytes of a frame not whole yet (a large result arriving) count as hearing from the
        host: its heartbeats wait behind them, and on a slow link (10 Mbit/s) the 8 MiB it may
        send ahead took longer than `lost_after`, so a host sending all it could was lost,
        over and over, and the result never came back. Said at most every quarter second."""
        now = time.monotonic()
        if now - self._bytes_heard_at >= BYTES_HEARD_EVERY_S:
            self._bytes_heard_at = now
            self.listener.host_messages(self, [])

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
                # as a Python too old: a relaunch meets the same batuta until someone installs
                # another there, so the host is retired at once, not retried for 2.5 minutes
                self._fail(problem, HostUnusableError)
                return
            self.hello = first
            self._open = True
            self.send(
                m.Welcome(
                    protocol=m.PROTOCOL_VERSION,
                    heartbeat_interval=self.heartbeat_interval,
                    silence_limit=self.silence_limit,
                )
            )
            if self.code is not None:  # in the same write, before any Run: tasks name its digest
                self.send(self.code, sum(len(f.data) for f in self.code.files))
            self.listener.host_ready(self)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            batch = batch[1:]
            if not batch:
                return
        if self.silence_limit and time.monotonic() - self._written_at > self.silence_limit / 10:
            self.send(m.Keepalive())  # the agent would take our silence for a partition
        self.listener.host_messages(self, batch)

    def _check_hello(self, hello: m.Hello) -> str:
        """Why the agent is refused, or "". Only batuta's version must match: every message is
        msgpack with its own schema (no pickle), so the host's Python minor may differ."""
        if not self.spec.check_versions:
            return ""
        if hello.batuta_version != __version__:
            return (  # after "host NAME: ", which _fail puts first
                f"its agent runs batuta {hello.batuta_version}, the coordinator {__version__}; "
                f"put this batuta there with `{_install_command(self.spec)}` "
                f"(or point the host's 'python' at an interpreter with batuta {__version__})"
            )
        return ""

    def _fail(self, reason: str, error: type[BatutaError] = AgentError) -> None:
        if self._stream is None or (not self._open and (self._ready is None or self._ready.done())):
            return  # already failed, closed, or never started
        self._open = False
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error(f"host {self.name}: {reason}"))
            self._ready.exception()  # retrieved here so an unawaited failure is not logged twice
        self.kill()
        if not self._closing:
            self.listener.host_closed(self, reason)

    def _end_congestion(self) -> None:
        self._drainer = None
        self.budget.congested_bytes -= self._congested
        self._congested = 0

    def abandon(self) -> None:
        """The host is lost (liveness decided): stop listening and kill the stream, quietly."""
        self._open = False
        self.generation += 1  # whatever the old reader or drainer still says is stale
        self.kill()

    def kill(self) -> None:
        self._close_link()
        self._outbox, self._outbox_bytes = [], []
        if self._conn is not None:
            self._conn.discard_transfers()  # partial arrays freed, unsent chunks forgotten
        if self._drainer is not None:
            self._drainer.cancel()
            self._end_congestion()
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.kill()

    def _close_link(self) -> None:
        link, self.data_link = self.data_link, None
        if link is not None:
            link.close()

    async def close(self, timeout: float = 2.0) -> None:
        """Orderly: what is queued, then Shutdown, then EOF, then the transport's own escalation."""
        self._closing = True
        if self._conn is not None and self._stream is not None and self._open:
            with contextlib.suppress(Exception):
                if self._drainer is None:
                    self._flush()
                if self._conn.streaming:
                    # a transfer still under way is abandoned, not written out whole here:
                    # the end of the stream tells the agent (a Shutdown would wait behind it)
                    self._conn.discard_transfers()
                else:
                    self._stream.write(self._conn.send(m.Shutdown(reason="coordinator closing")))
        self._open = False
        if self._drainer is not None:
            self._drainer.cancel()
            self._end_congestion()
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.close(timeout)
        # The data link goes after the agent: cut first, a value it was receiving looked like a
        # broken link to it (a Ctrl-C mid-put warned so); after its stream's end, it is ending.
        self._close_link()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
