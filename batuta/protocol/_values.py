"""Values on the wire: kernel arguments and results, NumPy arrays and scalars.

A value may be None, bool, int (64-bit), float, str, bytes, list, tuple, dict with str keys,
a NumPy array or a NumPy scalar of a fixed-size numeric or bool dtype, nested up to
`MAX_VALUE_DEPTH` levels. msgpack has one array type, so a tuple is written as an array whose
first element is the empty ext `EXT_TUPLE`; a plain array decodes as a list. Lists and tuples
thus come back as they went, at any depth.

Array and scalar ext payloads::

    dtype_len: uint8 | dtype: ascii numpy `dtype.str` (b"<f8") | ndim: uint8 |
    shape: ndim x uint64 BE | raw C-order bytes (EXT_ARRAY) or offset: uint64 BE (EXT_ARRAY_OOB)

    EXT_SCALAR: dtype_len | dtype | raw bytes (itemsize)

    EXT_ARRAY_STREAM: dtype_len | dtype | ndim | shape | stream id: uint64 BE
    EXT_ARRAY_SHARED: dtype_len | dtype | ndim | shape | locator (on a slot's pipe only:
                      agent to slot, batuta/agent/shm.py; slot to agent, a lent array,
                      batuta/agent/lend.py; every other link refuses it)

Byte order is kept (`>i4` comes back `>i4`). Arrays travel in C order: a Fortran-ordered or
strided array arrives C-contiguous with the same values. Arrays of `OOB_MIN_BYTES` or more
travel out-of-band (see `codec.py`) and decode as views into the received frame; smaller ones
travel inside the ext and decode as (writable) copies. When the sender streams, arrays of
its `stream_min_bytes` or more travel after the frame as chunks (`chunks.py`), and decode
as arrays the receiver allocated from the ext and fills as the chunks arrive.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from batuta.core.objects import ObjectRef
from batuta.protocol._fields import (
    INT_MIN,
    TUPLE_MARK,
    UINT_MAX,
    Invalid,
    Malformed,
    Unheld,
    describe,
    expected,
    seq,
    uint,
)
from batuta.protocol.errors import LocalProtocolError

__all__ = [
    "ALIGN",
    "EXT_ARRAY",
    "EXT_ARRAY_OOB",
    "EXT_ARRAY_SHARED",
    "EXT_ARRAY_STREAM",
    "EXT_REF",
    "EXT_SCALAR",
    "EXT_TUPLE",
    "MAX_VALUE_DEPTH",
    "OOB_MIN_BYTES",
    "OobReader",
    "OobWriter",
    "aligned_empty",
    "check_bools",
    "check_value",
    "decode_args",
    "decode_ext",
    "decode_value",
    "encode_args",
    "encode_value",
    "parse_shared_ext",
    "parse_stream_ext",
]

ALIGN = 64
"""Out-of-band array buffers start at multiples of this many bytes from the frame's start."""

OOB_MIN_BYTES = 1024
# What a value may put inside one frame (below the codec's 256 MiB frame limit, leaving room
# for the rest of the message): more is refused by check_value when the task is submitted.
MAX_INBAND_BYTES = 192 * 2**20
"""Arrays of at least this many bytes travel out-of-band and decode as views, not copies."""

MAX_VALUE_DEPTH = 32
"""How deeply lists, tuples and dicts may nest inside a kernel argument or result."""

MAX_NDIM = 32

EXT_ARRAY = 1
EXT_ARRAY_OOB = 2
EXT_SCALAR = 3
EXT_TUPLE = 4
EXT_REF = 5  # an ObjectRef: 8 bytes of object id
EXT_ARRAY_STREAM = 6  # an array whose bytes follow as the chunks of one stream
EXT_ARRAY_SHARED = 7  # an array in the sender's memory: shared (agent to slot) or lent (slot to agent)

_U64 = struct.Struct(">Q")
_SHAPES = tuple(struct.Struct(f">{n}Q") for n in range(MAX_NDIM + 1))
_TUPLE_EXT = msgpack.ExtType(EXT_TUPLE, b"")

# Only plain fixed-size numeric and bool dtypes, in either byte order. The decoder looks a
# peer's dtype string up here and never hands it to np.dtype().
_DTYPES: dict[bytes, np.dtype[Any]] = {}
for _code in ("b1", "i1", "u1"):
    _DTYPES[f"|{_code}".encode()] = np.dtype(f"|{_code}")
for _code in ("i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"):
    for _order in "<>":
        _DTYPES[f"{_order}{_code}".encode()] = np.dtype(f"{_order}{_code}")
_DTYPE_KEYS = {dtype: key for key, dtype in _DTYPES.items()}
del _code, _order

_VALUE_TYPES = (
    "None, bool, int, float, complex, str, bytes, list, tuple, dict with str keys, "
    "numpy arrays and numpy scalars of bool/int/uint/float/complex dtype, batuta.ObjectRef"
)


class OobWriter:
    """Collects the arrays a message sends out-of-band and assigns their aligned offsets.

    With `stream_min_bytes`, arrays at least that large are streamed instead: each gets the
    next stream id from `first_stream_id` on and joins `streamed`, for the caller to send as
    chunks after the frame (and to commit the ids only once the frame is sure to go).

    With `measure`, nothing is encoded: arrays are checked and their out-of-band bytes
    counted in `size`, and the encoder returns None for each (see `check_value`)."""

    __slots__ = (
        "buffers",
        "first_stream_id",
        "inband",
        "locate",
        "measure",
        "size",
        "stream_min_bytes",
        "streamed",
    )

    def __init__(
        self,
        *,
        stream_min_bytes: int | None = None,
        first_stream_id: int = 0,
        locate: Callable[[np.ndarray], bytes | None] | None = None,
        measure: bool = False,
    ) -> None:
        self.buffers: list[tuple[int, np.ndarray]] = []
        self.measure = measure
        self.locate = locate  # where an array lies in shared memory the receiver can map, if it does
        self.size = 0  # bytes of the buffer region so far
        self.inband = 0  # measured: about what travels inside the frame itself (str, bytes, small arrays, items)
        self.stream_min_bytes = stream_min_bytes
        self.first_stream_id = first_stream_id
        self.streamed: list[np.ndarray] = []  # flat uint8 views, stream ids in order

    def add(self, flat: np.ndarray) -> int:
        offset = -(-self.size // ALIGN) * ALIGN
        self.buffers.append((offset, flat))
        self.size = offset + flat.nbytes
        return offset

    def count(self, nbytes: int) -> None:
        """Count a buffer of `nbytes` as `add` would place it, without keeping it (`measure`)."""
        self.size = -(-self.size // ALIGN) * ALIGN + nbytes


MAPPED_MIN_BYTES = 32 << 20
"""Receive buffers at least this large are anonymous mappings of their own (`aligned_empty`):
glibc maps such allocations afresh anyway, while smaller ones may reuse its freed memory."""


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose first byte sits on an `ALIGN` boundary.

    A large one (`MAPPED_MIN_BYTES`) is an anonymous mapping of its own, unmapped when its
    last view goes: NumPy asks the kernel for transparent huge pages on large arrays, and
    faulting in fresh huge pages, which every received value is, cost 3 to 4 times as much
    per byte as ordinary pages on the 2-core VM the benchmarks run on (18 µs against 4-7 µs
    per 4 KiB, `bench/RESULTS.md`). A page-aligned mapping is `ALIGN`-aligned as well."""
    if nbytes >= MAPPED_MIN_BYTES:
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.__array_interface__["data"][0] % ALIGN
    return raw[skip : skip + nbytes]


# -- encoding --------------------------------------------------------------------------------


def _dtype_key(dtype: np.dtype[Any], what: str) -> bytes:
    key = _DTYPE_KEYS.get(dtype)
    if key is None:
        raise Invalid(
            "",
            f"{what} of dtype {dtype.str!r} cannot be sent: only bool, int, uint, float and "
            f"complex dtypes travel; {_dtype_fix(dtype)}",
        )
    return key


def _dtype_fix(dtype: np.dtype[Any]) -> str:
    """What to send instead of a value of `dtype`: the refusal named only what can go, and the
    way round it (README: "Send a datetime array as arr.view('i8')") was in the README alone."""
    if dtype.kind in "mM":
        what = "datetime" if dtype.kind == "M" else "timedelta"
        return f"send a {what} as x.view('i8') and make it {dtype.str!r} again with .view({dtype.str!r})"
    if dtype.names:
        return "send one array per field: {name: x[name] for name in x.dtype.names}"
    if dtype.kind in "fc":  # the only float and complex dtypes refused are the long doubles
        plain = "float64" if dtype.kind == "f" else "complex128"
        return f"send x.astype(np.{plain}) (what long double holds beyond {plain} is lost)"
    if dtype.kind in "US":
        return f"send a list of {'str' if dtype.kind == 'U' else 'bytes'} (x.tolist())"
    if dtype.kind == "V":
        return "send its bytes as x.view(np.uint8)"
    return "send a list (x.tolist()) or an array of one of those dtypes"


# Small array tasks encode the same few (dtype, shape) headers again and again, and read
# them back: both directions keep what they made, up to `_CACHED_HEADERS` each (then start over).
_CACHED_HEADERS = 256
_HEADERS: dict[tuple[np.dtype[Any], tuple[int, ...]], bytes] = {}
_PARSED: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], int]] = {}  # EXT_ARRAY_OOB header -> dtype, shape, nbytes


def _ext(code: int, payload: bytes) -> msgpack.ExtType:
    """`msgpack.ExtType(code, payload)` without the checks of its constructor, which hold here
    (an int code in range, a bytes payload): a tenth of a small array's encoding otherwise."""
    return tuple.__new__(msgpack.ExtType, (code, payload))


def _array_header(arr: np.ndarray) -> bytes:
    """dtype_len | dtype | ndim | shape: refused (Invalid) as the format cannot say it."""
    cache_key = (arr.dtype, arr.shape)
    header = _HEADERS.get(cache_key)
    if header is None:
        key = _dtype_key(arr.dtype, "an array")
        if arr.ndim > MAX_NDIM:
            raise Invalid("", f"an array of {arr.ndim} dimensions cannot be sent (at most {MAX_NDIM})")
        header = bytes((len(key),)) + key + bytes((arr.ndim,)) + _SHAPES[arr.ndim].pack(*arr.shape)
        if len(_HEADERS) >= _CACHED_HEADERS:
            _HEADERS.clear()
        _HEADERS[cache_key] = header
    return header


def _flat_bytes(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view."""
    return arr.view(np.uint8) if arr.ndim == 1 else arr.reshape(-1).view(np.uint8)


def _encode_array(arr: np.ndarray, oob: OobWriter) -> msgpack.ExtType | None:
    if type(arr) is not np.ndarray:
        if isinstance(arr, np.ma.MaskedArray):
            raise Invalid(
                "",
                "a masked array cannot be sent (its mask would be lost); "
                "send x.data and np.ma.getmaskarray(x), two arrays",
            )
        if isinstance(arr, np.matrix):  # it would arrive an ndarray, where * multiplies elementwise
            raise Invalid(
                "",
                "an np.matrix cannot be sent (it would arrive as an ndarray, where * is elementwise); "
                "send np.asarray(x) and multiply with @",
            )
        arr = arr.view(np.ndarray)  # a memmap, another subclass: send the data
    header = _array_header(arr)
    nbytes = arr.nbytes
    if oob.measure:  # checked: count what it adds to a frame, and build nothing
        if nbytes >= OOB_MIN_BYTES:
            oob.count(nbytes)
        else:
            oob.inband += nbytes + len(header)
        return None
    if arr.dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        # A bool view of bytes other than 0 and 1 (a 0/255 mask viewed as bool) is True where
        # they are not 0; sent as they are, the receiver refuses the frame (check_bools).
        arr = arr.view(np.uint8) != 0
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if oob.locate is not None and nbytes >= OOB_MIN_BYTES:
        locator = oob.locate(_flat_bytes(arr))
        if locator is not None:
            return _ext(EXT_ARRAY_SHARED, header + locator)
    stream_min = oob.stream_min_bytes
    if stream_min is not None and nbytes >= stream_min and nbytes:
        stream_id = oob.first_stream_id + len(oob.streamed)
        oob.streamed.append(_flat_bytes(arr))
        return _ext(EXT_ARRAY_STREAM, header + _U64.pack(stream_id))
    if nbytes >= OOB_MIN_BYTES:
        offset = oob.add(_flat_bytes(arr))
        return _ext(EXT_ARRAY_OOB, header + _U64.pack(offset))
    return _ext(EXT_ARRAY, header + arr.tobytes())


def encode_value(v: Any, oob: OobWriter, depth: int) -> Any:
    """A kernel argument or result as msgpack-ready data. Raises Invalid for what can't go."""
    t = type(v)
    if t is int:
        if INT_MIN <= v <= UINT_MAX:
            return v
        raise Invalid(
            "", f"int {v} does not fit in 64 bits; send str(n) and int() it back, or a float if near is enough"
        )
    if t is float or t is bool or v is None:
        return v
    if t is str or t is bytes:
        if oob.measure:
            oob.inband += len(v)
            if t is str and not v.isascii():  # isascii: a flag of the str, no scan
                _check_utf8(v)
        return v
    if t is np.ndarray:
        return _encode_array(v, oob)
    if t is complex:  # as numpy's complex128, a subclass of complex: it arrives equal, and is a complex
        return encode_value(np.complex128(v), oob, depth)
    if t is tuple or t is list or t is dict:
        if depth >= MAX_VALUE_DEPTH:
            raise Invalid("", f"nested deeper than {MAX_VALUE_DEPTH} levels (or a list or dict that holds itself)")
        if t is dict:
            out = {}
            for key, item in v.items():
                if type(key) is not str:
                    raise Invalid("", f"dict keys must be str, got key {describe(key)}")
                if oob.measure and not key.isascii():
                    try:
                        _check_utf8(key)
                    except Invalid as exc:
                        raise exc.at(f" key {key!r}") from None
                try:
                    out[key] = encode_value(item, oob, depth + 1)
                except Invalid as exc:
                    raise exc.at(f"[{key!r}]") from None
            return out
        items = _encode_items(v, oob, depth + 1)
        if t is tuple:
            items.insert(0, _TUPLE_EXT)
        return items
    if t is ObjectRef:
        return msgpack.ExtType(EXT_REF, _U64.pack(uint(v.object_id, ".object_id")))
    if isinstance(v, np.generic) and not isinstance(v, (np.str_, np.bytes_, np.void)):
        key = _dtype_key(v.dtype, "a numpy scalar")
        return msgpack.ExtType(EXT_SCALAR, bytes((len(key),)) + key + v.tobytes())
    if isinstance(v, np.ndarray):
        return _encode_array(v, oob)
    raise Invalid("", f"cannot send a value of type {describe(v)}; allowed: {_VALUE_TYPES}")


_PLAIN_SCALARS = frozenset({float, str, bytes, bool, type(None)})


def _check_utf8(text: str) -> None:
    """Refuse, when a value is checked (at submit), a str msgpack cannot write: one holding
    lone surrogates, as `os.fsdecode` and `os.listdir` make of a file name that is not UTF-8.
    Found only when its task was sent, it failed the whole Run and the host session with it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Invalid(
            "",
            f"str is not valid UTF-8 ({exc.reason} at index {exc.start}: a file name in another encoding?); "
            "pass it as bytes (os.fsencode) or as valid text",
        ) from None


def _encode_items(items: Sequence[Any], oob: OobWriter, depth: int) -> list[Any]:
    for item in items:  # fast path: a flat run of scalars goes as it is
        t = type(item)
        if t is int:
            if not INT_MIN <= item <= UINT_MAX:
                break
        elif t not in _PLAIN_SCALARS:
            break
    else:
        if oob.measure:  # what the frame carries of a flat run: about 9 bytes an item, and the text
            oob.inband += 9 * len(items) + sum(len(item) for item in items if type(item) in (str, bytes))
            for index, item in enumerate(items):
                if type(item) is str and not item.isascii():
                    try:
                        _check_utf8(item)
                    except Invalid as exc:
                        raise exc.at(f"[{index}]") from None
        return list(items)
    if oob.measure:
        oob.inband += len(items)
    out: list[Any] = []
    try:
        for item in items:
            out.append(encode_value(item, oob, depth))
    except Invalid as exc:
        raise exc.at(f"[{len(out)}]") from None
    return out


def encode_args(args: Any, oob: OobWriter, field: str) -> list[Any]:
    """KernelCall.args: written as a plain array (it is always a tuple, no marker needed)."""
    try:
        return _encode_items(seq(args, ""), oob, 1)
    except Invalid as exc:
        raise exc.at(field) from None


def check_value(value: Any, where: str = "value", *, or_put: bool = True) -> int:
    """Raise LocalProtocolError if `value` cannot travel as a kernel argument or result;
    return the bytes its arrays add to a frame (what flow control needs to know of it).

    The runtime can call this when a task is submitted, so that a bad argument fails at the
    call site instead of failing the whole batch it would have been sent in. `or_put`: the
    advice for too much in-frame data names pool.put (not for what is put already). It walks the
    value as the encoder does, with the same checks, but copies and builds no array data.
    """
    oob = OobWriter(measure=True)
    try:
        encode_value(value, oob, 0)
    except Invalid as exc:
        raise LocalProtocolError(exc.describe(where)) from None
    if oob.inband > MAX_INBAND_BYTES:
        # Refused here: sent, the frame would be over the receiver's limit, the host would be
        # lost and the task sent again, for ever (arrays travel beside frames, streamed).
        raise LocalProtocolError(
            f"{where}: about {oob.inband / 2**20:,.0f} MiB of str, bytes, small arrays and list items, "
            f"more than one frame carries ({MAX_INBAND_BYTES // 2**20} MiB); send bulk data as numpy "
            "arrays (bytes: np.frombuffer(data, np.uint8); many small arrays: one stacked array), "
            f"which travel beside the frame{', or pool.put it once' if or_put else ''}"
        )
    return oob.size


# -- decoding --------------------------------------------------------------------------------


def _parse_header(data: bytes, with_shape: bool) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """(dtype, shape, offset of what follows) from an array or scalar ext payload."""
    size = len(data)
    if size < 2:
        raise ValueError(f"payload of {size} bytes is too short")
    key_end = 1 + data[0]
    if key_end > size:
        raise ValueError("payload ends inside the dtype")
    dtype = _DTYPES.get(data[1:key_end])
    if dtype is None:
        raise ValueError(f"dtype {bytes(data[1:key_end])!r} is not allowed")
    if not with_shape:
        return dtype, (), key_end
    if key_end >= size:
        raise ValueError("payload ends before the shape")
    ndim = data[key_end]
    if ndim > MAX_NDIM:
        raise ValueError(f"{ndim} dimensions (at most {MAX_NDIM})")
    end = key_end + 1 + 8 * ndim
    if end > size:
        raise ValueError("payload ends inside the shape")
    return dtype, _SHAPES[ndim].unpack_from(data, key_end + 1), end


def parse_stream_ext(data: bytes) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """(dtype, shape, stream id) of an EXT_ARRAY_STREAM payload; ValueError if malformed."""
    dtype, shape, pos = _parse_header(data, True)
    if len(data) != pos + 8:
        raise ValueError("expected an 8-byte stream id after the shape")
    return dtype, shape, _U64.unpack_from(data, pos)[0]


def parse_shared_ext(data: bytes) -> tuple[np.dtype[Any], tuple[int, ...], bytes]:
    """(dtype, shape, locator) of an EXT_ARRAY_SHARED payload; ValueError if malformed."""
    dtype, shape, pos = _parse_header(data, True)
    return dtype, shape, bytes(data[pos:])


def check_bools(arr: np.ndarray) -> None:
    """ValueError if a bool array holds bytes other than 0 and 1 (NumPy would misread them)."""
    _check_bools(arr)


def _check_bools(arr: np.ndarray) -> None:
    if arr.dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise ValueError("bool data holds bytes other than 0 and 1")


def decode_ext(code: int, data: bytes) -> object:
    """msgpack ext_hook for in-band exts. Never raises: a bad payload becomes Malformed."""
    try:
        if code == EXT_TUPLE:
            return TUPLE_MARK if not data else Malformed("tuple marker with a payload")
        if code == EXT_ARRAY:
            dtype, shape, start = _parse_header(data, True)
            nbytes = math.prod(shape) * dtype.itemsize
            if len(data) - start != nbytes:
                raise ValueError(f"shape {shape} of {dtype.str} needs {nbytes} bytes, got {len(data) - start}")
            if not nbytes:
                return np.empty(shape, dtype)
            arr = np.frombuffer(data, dtype, offset=start).reshape(shape).copy()
            _check_bools(arr)
            return arr
        if code == EXT_SCALAR:
            dtype, _, start = _parse_header(data, False)
            if len(data) - start != dtype.itemsize:
                raise ValueError(f"a {dtype.str} scalar needs {dtype.itemsize} bytes")
            arr = np.frombuffer(data, dtype, offset=start)
            _check_bools(arr)
            return arr[0]
        if code == EXT_REF:
            if len(data) != 8:
                return Malformed(f"object reference of {len(data)} bytes (needs 8)")
            return ObjectRef(_U64.unpack(data)[0])
        if code == EXT_ARRAY_OOB:
            return Malformed("out-of-band array in a frame without out-of-band buffers")
        if code == EXT_ARRAY_STREAM:
            return Malformed("streamed array on a link that does not stream")
        if code == EXT_ARRAY_SHARED:
            return Malformed("shared-memory array on a link without shared memory")
        return Malformed(f"unknown ext type {code}")
    except Exception as exc:  # whatever numpy says about a hostile payload, it is a protocol error
        return Malformed(f"bad ext {code} payload: {exc}")


class OobReader:
    """ext_hook for out-of-band frames: hands out views into the frame's aligned buffer.

    Buffers must come in the order of their exts and must not overlap, so two decoded
    arrays never share memory.
    """

    __slots__ = ("cursor", "fallback", "frame", "region")

    def __init__(self, frame: np.ndarray, region: int, fallback: Callable[[int, bytes], object] = decode_ext) -> None:
        self.frame = frame
        self.region = region
        self.cursor = region
        self.fallback = fallback  # for every other ext

    def hook(self, code: int, data: bytes) -> object:
        if code != EXT_ARRAY_OOB:
            return self.fallback(code, data)
        try:
            header = data[:-8]
            parsed = _PARSED.get(header)
            if parsed is None:
                dtype, shape, pos = _parse_header(data, True)
                if len(data) != pos + 8:
                    raise ValueError("expected an 8-byte offset after the shape")
                parsed = (dtype, shape, math.prod(shape) * dtype.itemsize)
                if len(_PARSED) >= _CACHED_HEADERS:
                    _PARSED.clear()
                _PARSED[header] = parsed
            dtype, shape, nbytes = parsed
            offset = _U64.unpack_from(data, len(header))[0]
            start = self.region + offset
            if offset % ALIGN:
                raise ValueError(f"buffer offset {offset} is not a multiple of {ALIGN}")
            if start < self.cursor:
                raise ValueError(f"buffer at offset {offset} overlaps the one before")
            if start + nbytes > len(self.frame):
                raise ValueError(f"buffer of {nbytes} bytes at offset {offset} runs past the frame")
            self.cursor = start + nbytes
            arr = self.frame[start : start + nbytes].view(dtype)
            if len(shape) != 1:
                arr = arr.reshape(shape)
            _check_bools(arr)
            return arr
        except Exception as exc:  # see decode_ext
            return Malformed(f"bad out-of-band array: {exc}")


_PLAIN = frozenset({int, float, str, bytes, bool, type(None), np.ndarray, ObjectRef})


def decode_value(v: Any, depth: int) -> Any:
    """Validate a decoded value and rebuild its tuples. Raises Invalid."""
    t = type(v)
    if t in _PLAIN:
        return v
    if t is list:
        if depth >= MAX_VALUE_DEPTH:
            raise Invalid("", f"nested deeper than {MAX_VALUE_DEPTH} levels")
        if v and v[0] is TUPLE_MARK:
            return tuple(_decode_items(v, 1, depth + 1))
        return _decode_items(v, 0, depth + 1)
    if t is dict:
        if depth >= MAX_VALUE_DEPTH:
            raise Invalid("", f"nested deeper than {MAX_VALUE_DEPTH} levels")
        out = {}
        for key, item in v.items():
            if type(key) is not str:
                raise Invalid("", f"map keys must be str, got key {describe(key)}")
            try:
                out[key] = decode_value(item, depth + 1)
            except Invalid as exc:
                raise exc.at(f"[{key!r}]") from None
        return out
    if isinstance(v, np.generic):
        return v
    if isinstance(v, Malformed):
        raise Invalid("", v.reason)
    if isinstance(v, Unheld):  # only a receiver that answers for it makes these (chunks.py)
        return v
    if v is TUPLE_MARK:
        raise Invalid("", "tuple marker outside the first slot of an array")
    raise Invalid("", f"unexpected {describe(v)}")


def _decode_items(items: list[Any], start: int, depth: int) -> list[Any]:
    plain = _PLAIN
    for i in range(start, len(items)):  # fast path: nothing to check or rebuild
        if type(items[i]) not in plain:
            break
    else:
        return items[start:] if start else items
    out: list[Any] = []
    try:
        for i in range(start, len(items)):
            out.append(decode_value(items[i], depth))
    except Invalid as exc:
        raise exc.at(f"[{len(out)}]") from None
    return out


def decode_args(w: Any, field: str) -> tuple[Any, ...]:
    """KernelCall.args: the array itself is the tuple."""
    if type(w) is not list:
        raise expected(field, "an array", w)
    try:
        return tuple(_decode_items(w, 0, 1))
    except Invalid as exc:
        raise exc.at(field) from None
