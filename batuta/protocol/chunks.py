"""Values of any size: large arrays travel after their message as a stream of chunk frames.

A sender that streams (`OutgoingStreams`) writes each array of `stream_min_bytes` or more as
an `EXT_ARRAY_STREAM` ext (dtype, shape, stream id; see `_values.py`) instead of putting its
bytes in the frame, and sends the bytes afterwards as chunk frames::

    length: uint32 | 0xcf | stream id: uint64 | offset: uint64 | data: length - 17 bytes

`0xcf` (msgpack's uint64 marker) never starts a message array or an out-of-band payload, so
the decoder tells chunk frames apart by their first byte. A chunk's data is a memoryview of
the sender's own array (the sender never holds a second copy of a value), at most
`chunk_bytes` long; chunks of several streams interleave with each other and with ordinary
frames, so heartbeats, other tasks and other results keep flowing while gigabytes do.

The rules a receiver enforces (`StreamAssembler`), each fault a RemoteProtocolError naming it:
stream ids are announced in order (0, 1, 2, ... per direction of a connection, never
reused); a chunk names an announced, unfinished stream, continues it exactly where the last
one ended (`offset`) and does not run past its end; a stream is at most `max_value_bytes`
and at most `MAX_OPEN_STREAMS` are unfinished at once; a bool array's bytes are 0 or 1.
The receiver allocates each array from its ext when the frame arrives and writes the chunks
straight into it. One it cannot allocate (out of memory) is, for the message types it was
told it may leave unheld (the agent: Run and Put), an `Unheld` whose chunks are dropped; for
any other, a RemoteProtocolError.

A message is delivered once all its arrays are complete. Messages do not wait for each
other, except where the receiver must see one before another (`waits_for`): a task after
the Put of an object it names, a Drop after that Put, a Cancel or StealBack after the Run
of its tasks, a SlotChanged after the results of its slot, and a sender's last words
(Bye, Shutdown, Error) after everything. So an 8 GiB Put holds back only what needs it.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from batuta.core.objects import refs_in
from batuta.core.task import KernelCall
from batuta.protocol._fields import Malformed, Unheld
from batuta.protocol._values import (
    EXT_ARRAY_SHARED,
    EXT_ARRAY_STREAM,
    aligned_empty,
    check_bools,
    decode_ext,
    parse_shared_ext,
    parse_stream_ext,
)
from batuta.protocol.errors import RemoteProtocolError
from batuta.protocol.messages import (
    Bye,
    Cancel,
    Code,
    Done,
    Drop,
    Error,
    Message,
    Put,
    Run,
    Shutdown,
    SlotChanged,
    StealBack,
)

__all__ = [
    "CHUNK_MARK",
    "CHUNK_PREFIX",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_VALUE_BYTES",
    "DEFAULT_STREAM_MIN_BYTES",
    "MAX_OPEN_STREAMS",
    "OutgoingStreams",
    "StreamAssembler",
    "chunk_frame",
    "waits_for",
]

CHUNK_MARK = 0xCF
CHUNK_PREFIX = struct.Struct(">BQQ")  # mark, stream id, offset: the 17 bytes before a chunk's data
_CHUNK_HEADER = struct.Struct(">IBQQ")  # the same with the frame's length in front

DEFAULT_STREAM_MIN_BYTES = 32 * 2**20
"""Arrays at least this large are streamed, by default (smaller ones go in their frame)."""

DEFAULT_CHUNK_BYTES = 4 * 2**20
"""The most data one chunk frame carries, by default."""

DEFAULT_MAX_VALUE_BYTES = 2**40
"""The largest array a receiver allocates for a stream, by default (1 TiB)."""

MAX_OPEN_STREAMS = 4096
"""Streams announced and not yet finished, at most, per direction of a connection."""

_LAST_WORDS = (Bye, Shutdown, Error)


def chunk_frame(stream_id: int, offset: int, data: memoryview) -> list[Any]:
    """One chunk frame as two buffers: its 21-byte header and the data (not copied)."""
    return [_CHUNK_HEADER.pack(CHUNK_PREFIX.size + len(data), CHUNK_MARK, stream_id, offset), data]


# -- sending ---------------------------------------------------------------------------------


class Behind(Protocol):
    """Told how much of a stream has been written (transport/dropbehind.py's DropBehind)."""

    def done(self, sent: int) -> None: ...


class _Outgoing:
    __slots__ = ("behind", "data", "sent", "stream_id")

    def __init__(self, stream_id: int, data: memoryview, behind: Behind | None) -> None:
        self.stream_id = stream_id
        self.data = data
        self.sent = 0
        self.behind = behind


class OutgoingStreams:
    """The sending side of one direction of a link: numbers streams and hands out their chunks.

    The codec stages the arrays of the frames it encodes (`stream_min_bytes`, `next_id`) and
    commits them once those frames are sure to go; the writer then asks for chunk frames as
    its flow control allows (`next_chunk_parts`), or for all of them at once on a local pipe
    (`all_chunk_parts`). Streams take turns, one chunk each, so a small value does not wait
    behind a huge one.
    """

    __slots__ = ("_ended", "_open", "behind", "chunk_bytes", "divert", "next_id", "pending_bytes", "stream_min_bytes")

    def __init__(
        self, *, stream_min_bytes: int = DEFAULT_STREAM_MIN_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        if stream_min_bytes < 1 or chunk_bytes < 1:
            raise ValueError(
                f"stream_min_bytes and chunk_bytes must be positive, not {stream_min_bytes}, {chunk_bytes}"
            )
        self.stream_min_bytes = stream_min_bytes
        self.chunk_bytes = chunk_bytes
        self.next_id = 0
        self.pending_bytes = 0  # bytes of committed streams not yet handed out as chunks
        self._open: deque[_Outgoing] = deque()
        # A data link beside the channel (`transport/bulk.py`): committed streams go to it,
        # whole, instead of becoming chunk frames here.
        self.divert: Callable[[int, memoryview], None] | None = None
        # A writer that asks for chunks only once it has written the last ones (a socket's,
        # which drains between writes) may set this: each stream's `behind` is told, at every
        # ask, how much of it went before, so that a memory-mapped file is not kept mapped
        # as it is sent (`transport/dropbehind.py`).
        self.behind: Callable[[memoryview], Behind] | None = None
        self._ended: list[_Outgoing] = []  # handed out whole, since the last ask

    @property
    def active(self) -> bool:
        """Whether chunks are waiting to be sent."""
        return bool(self._open)

    def commit(self, flats: list[np.ndarray]) -> None:
        """The staged arrays (flat uint8 views) of frames now sent, in stream-id order."""
        for flat in flats:
            view = flat.data.cast("B")
            if self.divert is not None:
                self.divert(self.next_id, view)
                self.next_id += 1
                continue
            self._open.append(_Outgoing(self.next_id, view, self.behind(view) if self.behind is not None else None))
            self.next_id += 1
            self.pending_bytes += len(view)

    def next_chunk_parts(self, budget: int) -> list[Any]:
        """Chunk frames worth about `budget` bytes of data (at least one chunk, if any wait)."""
        self.written()  # what earlier asks handed out
        return self._chunk_parts(budget, drop_later=True)

    def written(self) -> None:
        """Every chunk handed out so far has been written (the writer drained): tell the
        streams' `behind`."""
        for stream in (*self._ended, *self._open):
            if stream.behind is not None:
                stream.behind.done(stream.sent)
        self._ended.clear()

    def _chunk_parts(self, budget: int, *, drop_later: bool) -> list[Any]:
        parts: list[Any] = []
        taken = 0
        streams = self._open
        while streams and (not parts or taken < budget):
            stream = streams.popleft()
            start = stream.sent
            end = min(start + self.chunk_bytes, len(stream.data))
            parts += chunk_frame(stream.stream_id, start, stream.data[start:end])
            stream.sent = end
            taken += end - start
            if end < len(stream.data):
                streams.append(stream)
            elif drop_later and stream.behind is not None:  # at the next ask
                self._ended.append(stream)
        self.pending_bytes -= taken
        return parts

    def all_chunk_parts(self) -> list[Any]:
        """Every chunk still to send, for a writer that sends them right behind their frame
        (none of them is written yet, so none is dropped behind)."""
        parts: list[Any] = []
        while self._open:
            parts += self._chunk_parts(self.pending_bytes, drop_later=False)
        return parts

    def clear(self) -> None:
        """Forget the unsent chunks (the link is gone); the arrays are the callers' again."""
        self._open.clear()
        self._ended.clear()
        self.pending_bytes = 0


# -- receiving -------------------------------------------------------------------------------


def _object_ids_named(run: Run) -> set[int]:
    return {
        ref.object_id
        for task in run.tasks
        if type(task.call) is KernelCall and task.call.args
        for ref in refs_in(task.call.args)
    }


def waits_for(later: Message, earlier: Message) -> bool:
    """Whether `later` must be delivered after `earlier` when both arrived and `earlier` is
    still incomplete (or itself waiting). Everything else may overtake (see module doc)."""
    if isinstance(later, _LAST_WORDS):
        return True
    if isinstance(later, Run):
        if isinstance(earlier, Code):
            return True
        return isinstance(earlier, Put) and earlier.object_id in _object_ids_named(later)
    if isinstance(later, Drop):
        return isinstance(earlier, Put) and earlier.object_id in later.object_ids
    if isinstance(later, Cancel | StealBack):
        if not isinstance(earlier, Run):
            return False
        wanted = set(later.task_ids)
        return any(task.task_id in wanted for task in earlier.tasks)
    if isinstance(later, SlotChanged):
        return isinstance(earlier, Done) and any(o.slot == later.slot for o in earlier.results)
    return False


class _Incoming:
    __slots__ = ("array", "entry", "filled", "flat", "size")

    def __init__(self, array: np.ndarray | Unheld, flat: np.ndarray | None, entry: _Entry) -> None:
        self.array = array
        self.flat = flat  # None: unheld, its bytes are dropped
        self.size = flat.nbytes if flat is not None else array.nbytes
        self.entry = entry
        self.filled = 0


class _Entry:
    __slots__ = ("message", "remaining")

    def __init__(self, message: Message, remaining: int) -> None:
        self.message = message
        self.remaining = remaining  # its streams not yet complete


class StreamAssembler:
    """The receiving side of one direction: allocates announced arrays, takes chunks into
    them, and releases messages once complete (and not held back by `waits_for`).

    The frame decoder calls `ext_hook` while it unpacks a frame and `accept` once the frame
    decoded to a message (`reject` if it did not); for a chunk frame, `sink` names where its
    data goes and `filled` says it arrived. Complete messages wait in `ready`.
    """

    __slots__ = (
        "_allocate",
        "_dropped",
        "_open",
        "_pending",
        "_staged",
        "_unheld_in",
        "max_value_bytes",
        "next_id",
        "on_held",
        "on_open",
        "on_progress",
        "ready",
        "shared",
        "unheld_count",
    )

    def __init__(
        self,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        *,
        allocate: Allocator = aligned_empty,
        shared: SharedArrays | None = None,
        unheld_in: tuple[type[Message], ...] = (),
    ) -> None:
        self.max_value_bytes = max_value_bytes
        # the messages whose receiver answers for an array it could not allocate (`Unheld`)
        self._unheld_in = unheld_in
        self._dropped: np.ndarray | None = None  # where an unheld stream's chunks go
        self.unheld_count = 0  # arrays left unheld so far: none, and no message need be searched
        self._allocate = allocate  # where received arrays live (the agent's: shared memory)
        # maps EXT_ARRAY_SHARED arrays: on a slot's pipe only, where the agent's memory is
        # shared with the slot (shm.py), and a slot lends its own to the agent (lend.py)
        self.shared = shared
        self.next_id = 0
        self.ready: deque[Message] = deque()
        self._open: dict[int, _Incoming] = {}
        self._pending: list[_Entry] = []  # arrived, not yet delivered, in arrival order
        # (array, flat) of the frame being decoded; (Unheld, None) for one not allocated
        self._staged: list[tuple[np.ndarray | Unheld, np.ndarray | None]] = []
        # A data link beside the channel (`transport/bulk.py`) is told of every stream
        # announced (id, flat array), and says when one is filled (`filled_elsewhere`).
        # An unheld stream is announced with its size alone: the link drops its bytes.
        self.on_open: Callable[[int, np.ndarray | int], None] | None = None
        # Whoever forwards values while they arrive (`agent/forward.py`) is told of each
        # message that waits for its streams (with their ids and arrays) and how far each
        # stream is filled, chunk by chunk.
        self.on_held: Callable[[Message, list[tuple[int, np.ndarray]]], None] | None = None
        self.on_progress: Callable[[int, int], None] | None = None

    @property
    def open_streams(self) -> int:
        """Streams announced and not yet complete."""
        return len(self._open)

    @property
    def open_bytes(self) -> int:
        """Bytes allocated for streams not yet complete (what a lost link frees)."""
        return sum(stream.flat.nbytes for stream in self._open.values() if stream.flat is not None)

    @property
    def held(self) -> int:
        """Messages arrived but not yet delivered."""
        return len(self._pending)

    def held_messages(self) -> list[Message]:
        """Messages arrived but not yet delivered (waiting for chunks, or behind one that is)."""
        return [entry.message for entry in self._pending]

    def ext_hook(self, code: int, data: bytes) -> object:
        """msgpack ext_hook: allocates a streamed array; every other ext goes to `decode_ext`.
        Never raises (see `decode_ext`)."""
        if code == EXT_ARRAY_SHARED and self.shared is not None:
            try:
                return self.shared(*parse_shared_ext(data))
            except (ValueError, OSError) as exc:
                return Malformed(f"bad shared-memory array: {exc}")
        if code != EXT_ARRAY_STREAM:
            return decode_ext(code, data)
        try:
            dtype, shape, stream_id = parse_stream_ext(data)
        except ValueError as exc:
            return Malformed(f"bad streamed array: {exc}")
        expected = self.next_id + len(self._staged)
        if stream_id != expected:
            return Malformed(f"stream id {stream_id} out of order (expected {expected})")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes == 0:
            return Malformed("streamed array of 0 bytes (send it in its frame)")
        if nbytes > self.max_value_bytes:
            return Malformed(f"streamed array of {nbytes} bytes exceeds the {self.max_value_bytes}-byte limit")
        if len(self._open) + len(self._staged) >= MAX_OPEN_STREAMS:
            return Malformed(f"more than {MAX_OPEN_STREAMS} streams unfinished at once")
        try:
            flat = self._allocate(nbytes)
        except (MemoryError, OSError, ValueError) as exc:  # OSError: a mapping refused (ENOMEM)
            if not self._unheld_in:
                return Malformed(f"cannot allocate {nbytes} bytes for a streamed array: {type(exc).__name__}")
            unheld = Unheld(dtype, shape, nbytes, f"{type(exc).__name__}: {exc}")
            self._staged.append((unheld, None))
            self.unheld_count += 1
            return unheld
        array = flat.view(dtype).reshape(shape)
        self._staged.append((array, flat))
        return array

    def reject(self) -> None:
        """The frame being decoded failed: forget what its exts allocated."""
        self._staged.clear()

    def accept(self, message: Message) -> Message | None:
        """A frame decoded to `message`: returns it if it may be delivered now, else keeps it
        (it comes out of `ready` later)."""
        staged = self._staged
        if not staged and not self._pending:
            return message  # the usual case: nothing streamed, nothing held
        unheld = next((array for array, flat in staged if flat is None), None)
        if isinstance(unheld, Unheld) and not isinstance(message, self._unheld_in):
            staged.clear()
            raise RemoteProtocolError(f"{type(message).__name__}: cannot allocate {unheld.describe()}")
        entry = _Entry(message, len(staged))
        opened: list[tuple[int, np.ndarray]] = []
        for array, flat in staged:
            self._open[self.next_id] = incoming = _Incoming(array, flat, entry)
            if self.on_open is not None:
                self.on_open(self.next_id, flat if flat is not None else incoming.size)
            if flat is not None:
                opened.append((self.next_id, flat))
            self.next_id += 1
        staged.clear()
        self._pending.append(entry)
        if opened and unheld is None and self.on_held is not None:  # nothing to forward of a failed one
            self.on_held(message, opened)
        self._release()
        return self.ready.popleft() if self.ready else None

    def sink(self, stream_id: int, offset: int, length: int) -> np.ndarray:
        """Where a chunk's `length` data bytes go; RemoteProtocolError if the chunk is wrong."""
        stream = self._open.get(stream_id)
        if stream is None:
            state = "finished" if stream_id < self.next_id else "not announced"
            raise RemoteProtocolError(f"chunk for stream {stream_id}, which is {state}")
        if offset != stream.filled:
            raise RemoteProtocolError(f"chunk for stream {stream_id} at offset {offset}, expected {stream.filled}")
        if length < 1:
            raise RemoteProtocolError(f"empty chunk for stream {stream_id}")
        size = stream.size
        if offset + length > size:
            raise RemoteProtocolError(
                f"chunk of {length} bytes at offset {offset} runs past stream {stream_id}'s {size} bytes"
            )
        if stream.flat is None:  # unheld: read, and dropped
            dropped = self._dropped
            if dropped is None or dropped.nbytes < length:
                self._dropped = dropped = np.empty(length, dtype=np.uint8)  # a chunk's size, once
            return dropped[:length]
        return stream.flat[offset : offset + length]

    def filled(self, stream_id: int, length: int) -> None:
        """`length` more bytes of the stream arrived (all of what `sink` gave, in order)."""
        stream = self._open[stream_id]
        stream.filled += length
        if stream.filled < stream.size:
            if stream.flat is not None and self.on_progress is not None:
                self.on_progress(stream_id, stream.filled)
            return
        del self._open[stream_id]
        if isinstance(stream.array, np.ndarray):  # held
            try:
                check_bools(stream.array)
            except ValueError as exc:
                raise RemoteProtocolError(f"{type(stream.entry.message).__name__}: streamed array: {exc}") from None
            if self.on_progress is not None:  # a forwarded array's last piece goes once it passed the check
                self.on_progress(stream_id, stream.filled)
        stream.entry.remaining -= 1
        if not stream.entry.remaining:
            self._release()

    def filled_elsewhere(self, stream_id: int, length: int) -> bool:
        """A data link wrote all of stream `stream_id` (`length` bytes) into its array. False
        if the stream is not open (the link was cleared meanwhile); RemoteProtocolError if it
        already had bytes from the channel or the length is not the stream's."""
        stream = self._open.get(stream_id)
        if stream is None:
            return False
        if stream.filled or length != stream.size:
            raise RemoteProtocolError(
                f"stream {stream_id} came both over the channel and the data link, or with a wrong length"
            )
        self.filled(stream_id, length)
        return True

    def abort(self, stream_id: int) -> bool:
        """The sender gave up on stream `stream_id` part-way (its source died): forget it and
        the message that announced it, which is never delivered (the sender answers it again);
        messages held behind that one go on. False if the stream is not open."""
        stream = self._open.pop(stream_id, None)
        if stream is None:
            return False
        entry = stream.entry
        for other in [i for i, s in self._open.items() if s.entry is entry]:
            del self._open[other]  # its other streams' bytes, if any come, find nothing open
        if entry in self._pending:
            self._pending.remove(entry)
            self._release()
        return True

    def clear(self) -> None:
        """Free every partial array and held message (the link is gone)."""
        self._open.clear()
        self._pending.clear()
        self._staged.clear()
        self.ready.clear()

    def _release(self) -> None:
        held: list[_Entry] = []
        for entry in self._pending:
            if entry.remaining or any(waits_for(entry.message, before.message) for before in held):
                held.append(entry)
            else:
                self.ready.append(entry.message)
        self._pending = held


Allocator = Callable[[int], np.ndarray]
"""Returns an uninitialised, aligned uint8 buffer of the given size."""

SharedArrays = Callable[[np.dtype[Any], tuple[int, ...], bytes], np.ndarray]
"""Maps a shared-memory array from its dtype, shape and locator; ValueError if it cannot."""
