"""The coordinator <-> agent session as a sans-I/O state machine (h11's shape).

Everything that decides who may send what, and when, lives in the tables below; the
`Connection` class only applies them. A connection never touches a socket: the caller
passes received bytes to `receive_data()`, pulls messages with `next_event()`, and writes
whatever `send()` returns.

    agent                              coordinator
      |  Hello  -------------------------->  |   AWAIT_HELLO   -> AWAIT_WELCOME
      |  <-------------------- Welcome       |   AWAIT_WELCOME -> READY
      |  CodeStored, CodeLoaded, Started,->  |   READY: AGENT_SENDS
      |  Done, StealBackReply, SlotChanged,  |
      |  ObjectsLost, Heartbeat, Bye         |
      |  <- Code, Run, StealBack, Cancel,   |   READY: COORDINATOR_SENDS
      |     Put, Drop, Fetch, DataLink,     |
      |     Keepalive, Shutdown              |
      |  Error (either side, at any time) <->|

`Bye`, `Shutdown` and `Error` are each their sender's last message: afterwards that side
may send nothing more, while the other direction stays open (messages already in flight,
the agent's last results after a Shutdown). A clean end of stream yields `CLOSED`.

Whose fault: a message this side may not send raises `LocalProtocolError`, one the peer may
not send raises `RemoteProtocolError`. A state or direction violation breaks the connection
for good: every later call raises, except that after the peer's fault this side may still
send one `Error` to say why it is hanging up. A message whose *content* cannot be encoded
(an unsupported value, a frame over the limit) raises `LocalProtocolError` before anything
changes, and the connection stays usable.

Large arrays stream (`chunks.py`): `send_many_parts()` returns the frames without them, and
the writer asks `next_chunk_parts()` for their chunks as its flow control allows, so that
other messages go out between them; `send()` and `send_many()` return every chunk at once.
A stream cut short by the end of the stream is the peer's fault like a frame cut short.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, Final

from batuta.protocol._values import aligned_empty
from batuta.protocol.chunks import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_STREAM_MIN_BYTES,
    Allocator,
    OutgoingStreams,
    StreamAssembler,
)
from batuta.protocol.codec import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_messages_parts
from batuta.protocol.errors import CutShortError, LocalProtocolError, RemoteProtocolError
from batuta.protocol.messages import (
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Code,
    CodeLoaded,
    CodeStored,
    DataLink,
    Done,
    Drop,
    Error,
    Fetch,
    GpuCache,
    Heartbeat,
    Hello,
    Keepalive,
    Message,
    ObjectsLost,
    Put,
    Run,
    Shutdown,
    SlotChanged,
    Started,
    StealBack,
    StealBackReply,
    Welcome,
)

__all__ = [
    "AGENT_SENDS",
    "CLOSED",
    "COORDINATOR_SENDS",
    "ENDS_DIRECTION",
    "NEED_DATA",
    "SLOT_PIPE_ONLY",
    "TRANSITIONS",
    "Connection",
    "ConnectionState",
    "Phase",
    "Role",
    "Sentinel",
]


class Role(enum.Enum):
    """Which end of the stream a Connection speaks for."""

    COORDINATOR = "coordinator"
    AGENT = "agent"


class Sentinel(enum.Enum):
    """What `next_event()` returns when it has no message."""

    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    CLOSED = "CLOSED"  # the peer ended the stream cleanly; nothing more will come


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


class Phase(enum.Enum):
    """How far the handshake has got; shared by both directions."""

    AWAIT_HELLO = "await_hello"
    AWAIT_WELCOME = "await_welcome"
    READY = "ready"


class ConnectionState(enum.Enum):
    """The connection as a whole, for callers and logs."""

    HANDSHAKE = "handshake"  # Hello or Welcome still to come
    READY = "ready"  # handshake done, at least one direction open
    CLOSED = "closed"  # end of stream seen, or both sides sent their last message
    ERROR = "error"  # a protocol error broke it; it refuses further use


# -- the rules ---------------------------------------------------------------------------------

AGENT_SENDS: Final[frozenset[type]] = frozenset(
    {CodeStored, CodeLoaded, Started, Done, StealBackReply, SlotChanged, ObjectsLost, Heartbeat, Bye, Error}
)
COORDINATOR_SENDS: Final[frozenset[type]] = frozenset(
    {Code, Run, StealBack, Cancel, Put, Drop, Fetch, DataLink, Keepalive, Shutdown, Error}
)

TRANSITIONS: Final[dict[tuple[Phase, Role], dict[type, Phase]]] = {
    (Phase.AWAIT_HELLO, Role.AGENT): {Hello: Phase.AWAIT_WELCOME, Error: Phase.AWAIT_HELLO},
    (Phase.AWAIT_HELLO, Role.COORDINATOR): {Error: Phase.AWAIT_HELLO},
    (Phase.AWAIT_WELCOME, Role.AGENT): {Error: Phase.AWAIT_WELCOME},
    (Phase.AWAIT_WELCOME, Role.COORDINATOR): {Welcome: Phase.READY, Error: Phase.AWAIT_WELCOME},
    (Phase.READY, Role.AGENT): dict.fromkeys(AGENT_SENDS, Phase.READY),
    (Phase.READY, Role.COORDINATOR): dict.fromkeys(COORDINATOR_SENDS, Phase.READY),
}
"""(phase, sender) -> {message type the sender may send: the phase after it}."""

SLOT_PIPE_ONLY: Final[frozenset[type]] = frozenset({GpuCache})
"""Messages a slot process sends its agent down the slot's pipe: never on this connection."""

ENDS_DIRECTION: Final[frozenset[type]] = frozenset((Bye, Shutdown, Error))
"""After one of these, its sender may send nothing more."""

_SENDERS: dict[type, frozenset[Role]] = {}
for (_phase, _role), _allowed in TRANSITIONS.items():
    for _kind in _allowed:
        _SENDERS[_kind] = _SENDERS.get(_kind, frozenset()) | {_role}
del _phase, _role, _allowed, _kind

_PHASE_WORDS = {
    Phase.AWAIT_HELLO: "before the agent's Hello",
    Phase.AWAIT_WELCOME: "while the agent waits for Welcome",
    Phase.READY: "after the handshake",
}


class _Refused(Exception):
    """A message the rules do not allow; the caller decides whose fault it is."""


def _advance(phase: Phase, finished: dict[Role, str], sender: Role, kind: type) -> Phase:
    """The phase after `sender` sends a `kind` message, or _Refused saying why not."""
    name = kind.__name__
    if sender in finished:
        raise _Refused(f"the {sender.value} sent {name} after its {finished[sender]}")
    senders = _SENDERS.get(kind)
    if senders is None:
        if kind in SLOT_PIPE_ONLY:
            raise _Refused(f"{name} travels only from a slot to its agent, never between agent and coordinator")
        raise _Refused(f"{name} is not a protocol message")
    if sender not in senders:
        (other,) = senders
        raise _Refused(f"the {sender.value} may not send {name}: only the {other.value} does")
    after = TRANSITIONS[phase, sender].get(kind)
    if after is None:
        raise _Refused(f"the {sender.value} may not send {name} {_PHASE_WORDS[phase]}")
    return after


class Connection:
    """One end of a coordinator <-> agent session: bytes in, messages out, and back.

    `receive_data(b"")` means the peer closed its end. `next_event()` returns a message,
    `NEED_DATA` or `CLOSED`; `send()` returns the bytes to write. See the module docstring
    for the rules and for what happens after an error.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        stream_min_bytes: int = DEFAULT_STREAM_MIN_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        allocate: Allocator = aligned_empty,
    ) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        self.role = role
        self.their_role = Role.AGENT if role is Role.COORDINATOR else Role.COORDINATOR
        self.max_frame_bytes = max_frame_bytes
        self.outgoing = OutgoingStreams(stream_min_bytes=stream_min_bytes, chunk_bytes=chunk_bytes)
        self.peer_hello: Hello | None = None  # the agent's Hello, on the coordinator
        self.peer_welcome: Welcome | None = None  # the coordinator's Welcome, on the agent
        # The agent's arrays live in shared memory; one it cannot allocate fails its task or
        # its value (`Unheld`), not the connection: the same value would come again for ever.
        unheld_in = (Run, Put) if role is Role.AGENT else ()
        self._decoder = FrameDecoder(max_frame_bytes, allocate=allocate, unheld_in=unheld_in)
        self._phase = Phase.AWAIT_HELLO
        self._finished: dict[Role, str] = {}  # role -> name of the last message it sent
        self._eof = False
        self._closed = False
        self._local_error: str | None = None
        self._remote_error: str | None = None

    # -- state ----------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def state(self) -> ConnectionState:
        if self._local_error is not None or self._remote_error is not None:
            return ConnectionState.ERROR
        if self._closed or len(self._finished) == 2:
            return ConnectionState.CLOSED
        if self._phase is Phase.READY:
            return ConnectionState.READY
        return ConnectionState.HANDSHAKE

    @property
    def error(self) -> str | None:
        """What broke the connection, or None."""
        return self._local_error or self._remote_error

    @property
    def streaming(self) -> bool:
        """Whether chunks of sent messages wait to be sent (`next_chunk_parts`)."""
        return self.outgoing.active

    @property
    def receiving_bytes(self) -> int:
        """Bytes allocated for arrays still arriving (what a lost link frees)."""
        return self._decoder.streams.open_bytes

    @property
    def incoming(self) -> StreamAssembler:
        """The peer's streams being received (a data link fills some of them: `transport/bulk.py`)."""
        return self._decoder.streams

    @property
    def expected_stream_id(self) -> int:
        """The id the peer's next streamed array must have."""
        return self._decoder.streams.next_id

    def next_chunk_parts(self, budget: int) -> list[Any]:
        """Chunk frames worth about `budget` bytes, at least one if any wait (see `chunks.py`)."""
        return self.outgoing.next_chunk_parts(budget)

    def discard_transfers(self) -> None:
        """The link is gone: forget unsent chunks and free arrays only partly received."""
        self.outgoing.clear()
        self._decoder.discard()

    @property
    def can_send(self) -> bool:
        """Whether this side may still send something (it has not sent its last message)."""
        return self._local_error is None and self.role not in self._finished

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Hand over bytes read from the stream; `b""` means the peer closed it."""
        self._check_usable()
        if self._eof:
            raise LocalProtocolError("receive_data() called after the end of stream (b'')")
        if len(data):
            self._decoder.feed(data)
        else:
            self._eof = True

    def receive_buffer(self) -> memoryview | None:
        """Memory the next bytes belong in (a large frame's buffer, a streamed array), for a
        reader that can read into it; None: pass bytes to `receive_data()` instead."""
        if self._local_error is not None or self._remote_error is not None or self._eof:
            return None
        return self._decoder.receive_buffer()

    def received(self, nbytes: int) -> None:
        """`nbytes` were read into the start of what `receive_buffer()` returned."""
        self._decoder.received(nbytes)

    def next_event(self) -> Message | Sentinel:
        """The next message from the peer, `NEED_DATA` or `CLOSED`.

        Raises RemoteProtocolError if the peer broke the protocol; the connection is then
        unusable except for sending one Error.
        """
        self._check_usable()
        if self._closed:
            return CLOSED
        try:
            msg = self._decoder.next_message()
            if msg is None:
                if not self._eof:
                    return NEED_DATA
                pending = self._decoder.buffered_bytes
                if pending:
                    raise CutShortError(f"stream closed inside a frame ({pending} bytes of it received)")
                unfinished = self._decoder.streams.open_streams
                if unfinished:
                    raise CutShortError(f"stream closed with {unfinished} streamed array(s) unfinished")
                self._closed = True
                return CLOSED
            self._receive(msg)
            return msg
        except RemoteProtocolError as exc:
            self._remote_error = str(exc)
            raise

    def _receive(self, msg: Message) -> None:
        kind = type(msg)
        try:
            self._phase = _advance(self._phase, self._finished, self.their_role, kind)
        except _Refused as exc:
            raise RemoteProtocolError(str(exc)) from None
        if kind in ENDS_DIRECTION:
            self._finished[self.their_role] = kind.__name__
        if isinstance(msg, Hello):
            if msg.protocol != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"agent {msg.hostname!r} speaks protocol {msg.protocol}, this coordinator "
                    f"speaks protocol {PROTOCOL_VERSION}: install the same batuta on both sides"
                )
            self.peer_hello = msg
        elif isinstance(msg, Welcome):
            if msg.protocol != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"coordinator speaks protocol {msg.protocol}, this agent speaks protocol "
                    f"{PROTOCOL_VERSION}: install the same batuta on both sides"
                )
            self.peer_welcome = msg

    # -- sending --------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """The bytes that carry `msg` to the peer. Raises LocalProtocolError."""
        return self.send_many((msg,))

    def send_many(self, msgs: Iterable[Message]) -> bytes:
        """The bytes for several messages, for one write. All of them are checked first:
        if any may not be sent, nothing is and the state does not move."""
        parts = self.send_many_parts(msgs)
        if self.outgoing.active:
            parts += self.outgoing.all_chunk_parts()
        return b"".join(parts)

    def send_many_parts(self, msgs: Iterable[Message]) -> list[Any]:
        """`send_many` as buffers for a vectored write (`ByteStream.write_parts`): arrays are
        not copied into one bytes object first."""
        msgs = tuple(msgs)
        if self._local_error is not None:
            raise LocalProtocolError(f"connection unusable after an earlier error: {self._local_error}")
        if self._remote_error is not None and not (len(msgs) == 1 and type(msgs[0]) is Error):
            raise LocalProtocolError(
                f"the peer broke the protocol ({self._remote_error}); only an Error may be sent now"
            )
        phase, finished = self._phase, dict(self._finished)
        try:
            for msg in msgs:
                phase = _advance(phase, finished, self.role, type(msg))
                if type(msg) in ENDS_DIRECTION:
                    finished[self.role] = type(msg).__name__
        except _Refused as exc:
            self._local_error = str(exc)
            raise LocalProtocolError(self._local_error) from None
        data = encode_messages_parts(msgs, max_frame_bytes=self.max_frame_bytes, streams=self.outgoing)
        self._phase, self._finished = phase, finished
        return data

    def _check_usable(self) -> None:
        if self._local_error is not None:
            raise LocalProtocolError(f"connection unusable after an earlier error: {self._local_error}")
        if self._remote_error is not None:
            raise RemoteProtocolError(f"connection unusable after an earlier error: {self._remote_error}")

    def __repr__(self) -> str:
        return f"<Connection {self.role.value} {self.state.value} phase={self._phase.value}>"
