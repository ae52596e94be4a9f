"""Wire codec: messages to length-prefixed msgpack frames and back. No pickle, no I/O.

Frame layout (integers in headers are big-endian)::

    length: uint32 | payload: `length` bytes

`length` counts the payload only, not its own 4 bytes, and is checked against
`max_frame_bytes` as soon as those 4 bytes arrive. The payload takes one of two forms:

* in-band (the usual one): one msgpack object, the message array `[tag, field, ...]`;
* out-of-band, when the message carries NumPy arrays of `OOB_MIN_BYTES` or more::

      0xce | body_len: uint32 | body: message array | pad | buffer | pad | buffer ...

  `0xce body_len` is itself a msgpack uint32, so the payload is still a msgpack stream; a
  message array never starts with 0xce, which is how the decoder tells the forms apart.
  Buffers start at multiples of `ALIGN` bytes from the start of the frame (its length
  prefix), so a decoder that receives the frame into an aligned buffer hands out aligned,
  zero-copy NumPy views. An array ext names its buffer by offset from the first aligned
  position after the body; buffers follow in the order of their exts, without overlap, and
  the last one ends the frame.

A link that streams sends arrays of its `stream_min_bytes` or more after the frame, as chunk
frames (payloads starting 0xcf; see `chunks.py`): the frame's size no longer depends on them,
so values of any size travel.

The message array is described in `_wire.py`; values (kernel arguments and results) and the
array and scalar ext formats in `_values.py`. No pickle anywhere.

Decoding validates every field and reports any fault as `RemoteProtocolError` naming it
(`Done.results[3].status: unknown status 'weird'`); encoding reports what cannot be sent
as `LocalProtocolError`, naming the field just the same.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack
import numpy as np

from batuta.protocol._values import (
    ALIGN,
    MAX_VALUE_DEPTH,
    OOB_MIN_BYTES,
    OobReader,
    OobWriter,
    aligned_empty,
    check_value,
)
from batuta.protocol._wire import TAGS, from_wire, to_wire
from batuta.protocol.chunks import (
    CHUNK_MARK,
    CHUNK_PREFIX,
    DEFAULT_MAX_VALUE_BYTES,
    Allocator,
    OutgoingStreams,
    SharedArrays,
    StreamAssembler,
)
from batuta.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from batuta.protocol.messages import Message

__all__ = [
    "ALIGN",
    "DEFAULT_MAX_FRAME_BYTES",
    "LARGE_FRAME_BYTES",
    "MAX_VALUE_DEPTH",
    "OOB_MIN_BYTES",
    "TAGS",
    "FrameDecoder",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "check_value",
    "encode_message",
    "encode_messages",
    "encode_streamed_parts",
]

DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
"""Largest payload a frame may announce, by default (256 MiB)."""

LARGE_FRAME_BYTES = 64 << 10
"""A frame at least this large is received straight into its own aligned buffer: its bytes
are copied once, not into the growing buffer first and then into the frame's own (small
array tasks: 5-6 us less CPU a task in each of the coordinator, the agent and the slot,
`bench/small_tasks.py`)."""

_HEADER = struct.Struct(">I")
_OOB_PREFIX = struct.Struct(">BI")
_OOB_MARK = 0xCE  # msgpack's uint32 marker, which starts an out-of-band payload
_OOB_BODY = 4 + _OOB_PREFIX.size  # where an out-of-band frame's message body starts
_FRAME_LIMIT = (1 << 32) - 1  # what a uint32 length can say

Locator = Callable[[np.ndarray], "bytes | None"]
"""Where a flat uint8 array lies in shared memory the receiver can map (see `_values.OobWriter`)."""


# -- frames: encoding ------------------------------------------------------------------------


def _find_unencodable(value: Any, path: str, depth: int = 0) -> str | None:
    """Where a message holds a str msgpack cannot encode (lone surrogates), for the error."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{path}: str is not valid UTF-8 ({exc.reason} at index {exc.start})"
        return None
    if depth > 64:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items: Iterable[tuple[str, Any]] = ((f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, Mapping):
        items = [(" key", k) for k in value] + [(f"[{k!r}]", v) for k, v in value.items()]
    else:
        return None
    for part, item in items:
        found = _find_unencodable(item, path + part, depth + 1)
        if found:
            return found
    return None


def _frame_parts(
    msg: Message,
    max_frame_bytes: int,
    streams: OutgoingStreams | None = None,
    staged: list[Any] | None = None,
    locate: Locator | None = None,
) -> list[Any]:
    """The pieces of one frame, to be joined: header, body and any out-of-band buffers. With
    `streams`, large arrays are staged (appended to `staged`) instead, for the caller to commit;
    with `locate`, arrays in shared memory go as references to it."""
    if streams is None:
        oob = OobWriter(locate=locate)
    else:
        assert staged is not None
        first = streams.next_id + len(staged)
        oob = OobWriter(stream_min_bytes=streams.stream_min_bytes, first_stream_id=first, locate=locate)
    wire = to_wire(msg, oob)
    message_name = type(msg).__name__
    try:
        body = msgpack.packb(wire)
    except Exception as exc:  # msgpack's own refusal, e.g. a str with lone surrogates
        where = _find_unencodable(msg, message_name)
        raise LocalProtocolError(where or f"cannot encode {message_name}: {exc}") from None
    if staged is not None:
        staged += oob.streamed
    if not oob.buffers:
        _check_size(message_name, len(body), max_frame_bytes)
        return [_HEADER.pack(len(body)), body]
    body_end = _OOB_BODY + len(body)
    region = -(-body_end // ALIGN) * ALIGN
    size = region + oob.size - 4
    _check_size(message_name, size, max_frame_bytes)
    parts: list[Any] = [
        _HEADER.pack(size),
        _OOB_PREFIX.pack(_OOB_MARK, len(body)),
        body,
        bytes(region - body_end),
    ]
    end = 0
    for offset, flat in oob.buffers:
        if offset > end:
            parts.append(bytes(offset - end))
        parts.append(flat)
        end = offset + flat.nbytes
    return parts


def _check_size(message_name: str, size: int, max_frame_bytes: int) -> None:
    if size > max_frame_bytes or size > _FRAME_LIMIT:
        raise LocalProtocolError(
            f"{message_name} frame of {size} bytes exceeds the "
            f"{min(max_frame_bytes, _FRAME_LIMIT)}-byte limit: send fewer tasks or results per "
            "message, or smaller arrays"
        )


def starts_a_frame(data: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bool:
    """Whether `data` (a stream's first bytes, 5 or more) begins as a frame does: a length
    within the limit, then a message array or the out-of-band mark. Text printed ahead of an
    agent does not; a frame the receiver refuses for what it says (another protocol) does."""
    if len(data) < 5:
        return False
    (length,) = _HEADER.unpack_from(data)
    marker = data[4]
    return 0 < length <= max_frame_bytes and (0x90 <= marker <= 0x9F or marker in (0xDC, 0xDD, _OOB_MARK))


def encode_message(msg: Message, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """One complete frame for `msg`, length prefix included. Raises LocalProtocolError."""
    return b"".join(_frame_parts(msg, max_frame_bytes))


def encode_message_parts(msg: Message, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> list[Any]:
    """The same frame as a list of buffers to write in order (a vectored write): arrays stay
    where they are instead of being copied into one bytes object. Raises LocalProtocolError."""
    return _frame_parts(msg, max_frame_bytes)


def encode_messages(msgs: Iterable[Message], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Several frames, concatenated for a single write. Raises LocalProtocolError."""
    return b"".join(encode_messages_parts(msgs, max_frame_bytes=max_frame_bytes))


def encode_messages_parts(
    msgs: Iterable[Message],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    streams: OutgoingStreams | None = None,
    locate: Locator | None = None,
) -> list[Any]:
    """Several frames as buffers for one vectored write (see `encode_message_parts`).

    With `streams`, large arrays are left out of the frames and committed to `streams` (only
    if every message encodes), whose chunks the caller then sends after these frames."""
    parts: list[Any] = []
    if streams is None:
        for msg in msgs:
            parts += _frame_parts(msg, max_frame_bytes)
        return parts
    staged: list[Any] = []
    for msg in msgs:
        parts += _frame_parts(msg, max_frame_bytes, streams, staged, locate)
    streams.commit(staged)
    return parts


def encode_streamed_parts(msg: Message, streams: OutgoingStreams, *, locate: Locator | None = None) -> list[Any]:
    """`msg`'s frame followed at once by the chunks of every stream `streams` has open: for a
    pipe to a local process, where nothing needs to overtake them. With `locate`, arrays in
    shared memory go as references to it (`batuta/agent/shm.py`). Raises LocalProtocolError."""
    parts = encode_messages_parts((msg,), streams=streams, locate=locate)
    return parts + streams.all_chunk_parts()


# -- frames: decoding ------------------------------------------------------------------------


def _unpack(data: Any, size: int, ext_hook: Callable[[int, bytes], object]) -> Any:
    """msgpack.unpackb with limits no larger than the frame, and errors that say what broke."""
    try:
        return msgpack.unpackb(
            data,
            use_list=True,
            raw=False,
            strict_map_key=True,
            ext_hook=ext_hook,
            max_str_len=size,
            max_bin_len=size,
            max_ext_len=size,
            max_array_len=size,
            max_map_len=size // 2,
        )
    except msgpack.ExtraData as exc:
        raise RemoteProtocolError(f"frame holds {len(exc.extra)} bytes after its message") from None
    except msgpack.StackError:
        raise RemoteProtocolError("frame body nests too deeply") from None
    except msgpack.FormatError:
        raise RemoteProtocolError("frame body is not msgpack (reserved byte 0xc1)") from None
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"frame body holds a str that is not UTF-8 ({exc.reason})") from None
    except ValueError as exc:
        if "incomplete" in str(exc):
            raise RemoteProtocolError("frame body ends inside a msgpack object") from None
        raise RemoteProtocolError(f"frame body is not valid msgpack: {exc}") from None


def _decode_frame(frame: np.ndarray, ext_hook: Callable[[int, bytes], object]) -> Message:
    """Decode a whole frame held in its own aligned buffer (out-of-band or large)."""
    total = len(frame)
    if frame[4] != _OOB_MARK:
        return from_wire(_unpack(frame[4:], total - 4, ext_hook))
    if total < _OOB_BODY:
        raise RemoteProtocolError(f"out-of-band frame of {total - 4} bytes is too short")
    body_len = int.from_bytes(frame[5:_OOB_BODY].tobytes(), "big")
    body_end = _OOB_BODY + body_len
    if body_end > total:
        raise RemoteProtocolError(f"out-of-band frame announces a {body_len}-byte body but holds {total - _OOB_BODY}")
    reader = OobReader(frame, -(-body_end // ALIGN) * ALIGN, ext_hook)
    msg = from_wire(_unpack(frame[_OOB_BODY:body_end], body_len, reader.hook))
    if reader.cursor != total:
        raise RemoteProtocolError(f"out-of-band frame has {total - reader.cursor} stray bytes after its last buffer")
    return msg


def _fill(target: np.ndarray, fill: int, data: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """Copy the start of `data` into `target` from `fill` on: (bytes taken, the rest of data)."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    take = min(len(target) - fill, len(view))
    target[fill : fill + take] = view[:take]
    return take, view[take:]


class FrameDecoder:
    """Turns a byte stream into messages: `feed()` bytes in, `next_message()` out.

    Small frames are decoded straight from one growing buffer. A frame of
    `LARGE_FRAME_BYTES` or more is copied, as its bytes arrive, into a buffer of its own
    (allocated once, aligned), and out-of-band frames are decoded from such a buffer, so
    their arrays are aligned views that keep that buffer alive and nothing else. A chunk
    frame's data is copied, as it arrives, straight into the array its stream fills (see
    `chunks.py`); a message with streamed arrays comes out once they are complete.

    `receive_buffer()` offers the memory the next bytes will land in when that is a large
    frame's buffer or a stream's array, so that a reader can read into it (`received(n)`)
    instead of handing over bytes to be copied there.

    The length prefix is checked as soon as it arrives, so an oversized frame is refused
    before any of it is buffered. After a protocol error the stream's framing can no longer
    be trusted: every later `next_message()` raises again.
    """

    __slots__ = (
        "_allocate",
        "_big",
        "_big_fill",
        "_buf",
        "_failure",
        "_max",
        "_sink",
        "_sink_fill",
        "_sink_stream",
        "_streams",
    )

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        allocate: Allocator = aligned_empty,
        shared: SharedArrays | None = None,
        unheld_in: tuple[type[Message], ...] = (),
    ) -> None:
        if not 1 <= max_frame_bytes <= _FRAME_LIMIT:
            raise ValueError(f"max_frame_bytes must be in [1, {_FRAME_LIMIT}], not {max_frame_bytes}")
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._big: np.ndarray | None = None  # the large frame being received, header included
        self._big_fill = 0
        self._sink: np.ndarray | None = None  # where the data of the chunk being received goes
        self._sink_fill = 0
        self._sink_stream = 0
        self._allocate = allocate  # buffers of large frames (the agent's: shared memory)
        self._streams = StreamAssembler(max_value_bytes, allocate=allocate, shared=shared, unheld_in=unheld_in)
        self._failure: str | None = None

    @property
    def max_frame_bytes(self) -> int:
        return self._max

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as messages (streams' arrays not counted)."""
        big = self._big_fill if self._big is not None else 0
        return len(self._buf) + big + (self._sink_fill if self._sink is not None else 0)

    @property
    def streams(self) -> StreamAssembler:
        """The streams being received (`open_streams`, `open_bytes`, `held`)."""
        return self._streams

    def discard(self) -> None:
        """Free everything partly received: frames, streams' arrays, held messages."""
        self._buf = bytearray()
        self._big = None
        self._sink = None
        self._streams.clear()

    def receive_buffer(self) -> memoryview | None:
        """The memory the next bytes of the stream belong in, if it is a large frame's buffer
        or a stream's array; None when they go through `feed()`."""
        if self._sink is not None and self._sink_fill < len(self._sink):
            return self._sink[self._sink_fill :].data
        if self._big is not None and self._big_fill < len(self._big):
            return self._big[self._big_fill :].data
        return None

    def received(self, nbytes: int) -> None:
        """`nbytes` were read into the start of what `receive_buffer()` returned."""
        if self._sink is not None and self._sink_fill < len(self._sink):
            self._sink_fill += nbytes
        elif self._big is not None:
            self._big_fill += nbytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes. Never raises on content; `next_message()` judges it."""
        sink = self._sink
        if sink is not None and self._sink_fill < len(sink):
            take, data = _fill(sink, self._sink_fill, data)
            self._sink_fill += take
        big = self._big
        if big is not None and self._big_fill < len(big):
            take, data = _fill(big, self._big_fill, data)
            self._big_fill += take
        if len(data):
            self._buf += data

    def next_message(self) -> Message | None:
        """The next complete message, or None if more bytes are needed.

        Raises RemoteProtocolError for anything the peer got wrong; the decoder is then
        unusable and raises the same error again on every call.
        """
        if self._failure is not None:
            raise RemoteProtocolError(f"stream unusable after an earlier error: {self._failure}")
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._failure = str(exc)
            self._streams.reject()
            raise
        except Exception as exc:  # nothing but a protocol error may escape a hostile stream
            self._failure = f"cannot decode frame: {type(exc).__name__}" + (
                f": {exc}" if str(exc) else " (not msgpack)"
            )
            self._streams.reject()
            raise RemoteProtocolError(self._failure) from exc

    def _next(self) -> Message | None:
        streams = self._streams
        while True:
            if streams.ready:
                return streams.ready.popleft()
            sink = self._sink
            if sink is not None:
                if self._sink_fill < len(sink):
                    return None
                self._sink = None
                streams.filled(self._sink_stream, len(sink))
                continue
            big = self._big
            if big is not None:
                if self._big_fill < len(big):
                    return None
                self._big = None
                message = streams.accept(_decode_frame(big, streams.ext_hook))
                if message is not None:
                    return message
                continue
            buf = self._buf
            have = len(buf)
            if have < 4:
                return None
            (size,) = _HEADER.unpack_from(buf)
            if size > self._max:
                raise RemoteProtocolError(f"frame of {size} bytes exceeds the {self._max}-byte limit")
            if size == 0:
                raise RemoteProtocolError("empty frame (length 0)")
            if have < 5:
                return None
            if buf[4] == CHUNK_MARK:
                if not self._start_chunk(size):
                    return None
                continue
            total = size + 4
            if have < total:
                if total >= LARGE_FRAME_BYTES:
                    # Receive the rest straight into the frame's own buffer: no regrowth, one copy.
                    frame = self._allocate(total)
                    with memoryview(buf) as view:
                        frame[:have] = view
                    buf.clear()
                    self._big = frame
                    self._big_fill = have
                return None
            if buf[4] == _OOB_MARK:
                frame = self._allocate(total)
                with memoryview(buf) as view:
                    frame[:] = view[:total]
                del buf[:total]
                message = streams.accept(_decode_frame(frame, streams.ext_hook))
            else:
                with memoryview(buf) as view:
                    body = view[4:total]
                    try:
                        wire = _unpack(body, size, streams.ext_hook)
                    finally:
                        body.release()
                del buf[:total]
                message = streams.accept(from_wire(wire))
            if message is not None:
                return message

    def _start_chunk(self, size: int) -> bool:
        """A chunk frame's header is at the start of the buffer: point its data at its
        stream's array (taking what the buffer already holds). False until the header is in."""
        buf = self._buf
        prefix = CHUNK_PREFIX.size
        if size <= prefix:
            raise RemoteProtocolError(f"chunk frame of {size} bytes has no data (its header alone is {prefix})")
        if len(buf) < 4 + prefix:
            return False
        _, stream_id, offset = CHUNK_PREFIX.unpack_from(buf, 4)
        length = size - prefix
        sink = self._streams.sink(stream_id, offset, length)
        start = 4 + prefix
        with memoryview(buf) as view:
            take = min(length, len(buf) - start)
            sink[:take] = view[start : start + take]
        del buf[: start + take]
        self._sink, self._sink_fill, self._sink_stream = sink, take, stream_id
        return True


def first_message(data: bytes, max_frame_bytes: int) -> Message | None:
    """The message `data` (a peer's first bytes) starts with, or None where they do not start
    with a whole valid frame: who is at the other end (a worker's Hello, its "busy" Error)."""
    decoder = FrameDecoder(max_frame_bytes)
    try:
        decoder.feed(data)
        return decoder.next_message()
    except ProtocolError:
        return None
