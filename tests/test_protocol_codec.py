"""The wire codec: round trips, framing over split streams, and arrays.

No sockets: frames are bytes, fed to a FrameDecoder in whatever pieces a test likes. What the
codec refuses is tested apart: values and fields it will not send in
test_protocol_codec_refused.py, malformed input it receives in test_protocol_codec_malformed.py
(the helpers all three share are in tests/support/codec.py).
"""

from __future__ import annotations

import mmap
import random
import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from batuta.core.objects import ObjectRef
from batuta.core.task import BinaryCall, KernelCall, Outcome
from batuta.protocol import (
    TAGS,
    Bye,
    Done,
    FrameDecoder,
    Heartbeat,
    Hello,
    Message,
    Put,
    Run,
    SlotChanged,
    Started,
    TaskOutcome,
    TaskRequest,
    Welcome,
    check_value,
    encode_message,
    encode_messages,
)
from batuta.protocol._values import ALIGN, MAPPED_MIN_BYTES, OobWriter, aligned_empty, encode_value
from batuta.protocol.codec import LARGE_FRAME_BYTES
from batuta.protocol.errors import LocalProtocolError
from tests.support.codec import (
    assert_same,
    decode_all,
    one,
    sample_messages,
)

# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    frame = encode_message(msg)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    decoded = one(frame)
    assert_same(decoded, msg)
    if not any(isinstance(v, np.ndarray) for v in _walk(msg)):
        assert decoded == msg  # plain dataclass equality too, where arrays don't prevent it


def _walk(value: Any) -> list[Any]:
    found: list[Any] = [value]
    if hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            found += _walk(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _walk(item)
    elif isinstance(value, dict):
        for item in value.values():
            found += _walk(item)
    return found


def test_tags_cover_every_message_and_are_the_first_element() -> None:
    for msg in sample_messages():
        body = msgpack.unpackb(encode_message(msg)[4:], ext_hook=lambda c, d: None)
        if isinstance(body, int):  # out-of-band payload: 0xce prefix first
            continue
        assert body[0] == TAGS[type(msg)]
    assert sorted(TAGS.values()) == [*range(1, 22), 23, 24]  # 22: never used (feed-ahead needed no new message)


def test_decoded_collections_have_the_dataclass_types() -> None:
    hello, run = one(encode_message(sample_messages()[0])), one(encode_message(sample_messages()[3]))
    assert isinstance(hello, Hello) and isinstance(run, Run)
    assert type(hello.slots) is tuple and type(hello.slots[1].capabilities) is tuple
    assert type(run.tasks) is tuple
    assert isinstance(run.tasks[0].call, KernelCall) and type(run.tasks[0].call.args) is tuple
    assert isinstance(run.tasks[2].call, BinaryCall) and run.tasks[2].call.args == ("-v", "x y")


def test_lists_and_tuples_keep_their_type_at_every_depth() -> None:
    value: Any = ([1, (2, [3, ()])], [], (), {"a": (1,), "b": [1]}, [[[]]])
    msg = Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=value),))
    assert_same(one(encode_message(msg)).results[0].value, value)


def test_numbers_at_the_edges() -> None:
    value = [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, float("inf"), float("nan"), 1e308, True, False]
    msg = Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=value),))
    assert_same(one(encode_message(msg)).results[0].value, value)


def test_int_fields_from_subclasses_are_normalised() -> None:
    import enum

    class Slot(enum.IntEnum):
        FIRST = 0

    msg = Started(task_ids=(np.int64(3).item(), 4))
    assert one(encode_message(msg)) == Started(task_ids=(3, 4))
    state = one(encode_message(SlotChanged(slot=Slot.FIRST, state="up")))
    assert type(state.slot) is int
    beat = one(encode_message(Heartbeat(seq=1, cpu_percent=np.float64(12.5), memory_used=1, memory_total=2)))
    assert type(beat.cpu_percent) is float
    welcome = one(encode_message(Welcome(protocol=1, heartbeat_interval=2)))
    assert welcome == Welcome(protocol=1, heartbeat_interval=2.0) and type(welcome.heartbeat_interval) is float


# -- framing over a split stream ------------------------------------------------------------------


def test_frames_split_at_every_byte_boundary() -> None:
    messages = sample_messages()
    data = encode_messages(messages)
    for cut in range(1, len(data)):
        decoded = decode_all(data, [cut, len(data) - cut])
        assert len(decoded) == len(messages)
    decoded = decode_all(data, [1] * len(data))  # byte by byte
    for got, want in zip(decoded, messages, strict=True):
        assert_same(got, want)


@pytest.mark.parametrize("seed", range(20))
def test_frames_in_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    messages = [rng.choice(sample_messages()) for _ in range(30)]
    data = encode_messages(messages)
    chunks = []
    left = len(data)
    while left:
        size = min(left, rng.choice([1, 2, 3, 7, 64, 500, 4096]))
        chunks.append(size)
        left -= size
    for got, want in zip(decode_all(data, chunks), messages, strict=True):
        assert_same(got, want)


def test_many_frames_in_one_chunk() -> None:
    messages = [Started(task_ids=(i,)) for i in range(1000)]
    data = b"".join(encode_message(m) for m in messages)
    assert data == encode_messages(messages)
    assert decode_all(data) == messages


def test_next_message_without_data_needs_more() -> None:
    decoder = FrameDecoder()
    assert decoder.next_message() is None
    frame = encode_message(Bye())
    decoder.feed(frame[:3])
    assert decoder.next_message() is None and decoder.buffered_bytes == 3
    decoder.feed(memoryview(frame)[3:])
    assert decoder.next_message() == Bye()
    assert decoder.next_message() is None and decoder.buffered_bytes == 0


# -- arrays -------------------------------------------------------------------------------------

DTYPES = [
    "|b1",
    "|i1",
    "|u1",
    "<i2",
    ">i2",
    "<i4",
    ">u4",
    "<i8",
    ">i8",
    "<u8",
    "<f2",
    "<f4",
    ">f4",
    "<f8",
    ">f8",
    "<c8",
    ">c16",
]


def some_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    raw = np.asarray(np.random.default_rng(seed).integers(0, 100, size=shape))
    kind = np.dtype(dtype).kind
    values = raw + 1j * (raw + 1) if kind == "c" else raw % 2 if kind == "b" else raw
    return np.array(values, dtype=dtype)  # np.array: a 0-d array stays an array


def value_round_trip(value: Any) -> Any:
    msg = Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=value),))
    decoded = one(encode_message(msg))
    assert isinstance(decoded, Done)
    return decoded.results[0].value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (7,), (4, 5), (2, 3, 4), (300, 7)])
def test_arrays_round_trip_exactly(dtype: str, shape: tuple[int, ...]) -> None:
    arr = some_array(dtype, shape)
    back = value_round_trip(arr)
    assert type(back) is np.ndarray
    assert back.dtype == arr.dtype and back.dtype.str == dtype  # byte order kept
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable and back.flags.c_contiguous


def test_fortran_strided_and_subclass_arrays_arrive_c_contiguous() -> None:
    base = np.arange(600, dtype=np.float64).reshape(20, 30)
    cases = [np.asfortranarray(base), base[::2, ::3], base.T, np.asfortranarray(base[:3, :4]), base.view(np.memmap)]
    for arr in cases:
        back = value_round_trip(arr)
        assert type(back) is np.ndarray and back.flags.c_contiguous
        np.testing.assert_array_equal(back, np.asarray(arr))


def test_large_arrays_decode_as_aligned_views_into_the_frame() -> None:
    arrays = (np.arange(50_000, dtype="<f8").reshape(500, 100), np.ones(3000, dtype=">i4"), np.arange(5, dtype=np.int8))
    msg = Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k", args=arrays)),))
    data = encode_message(msg)
    assert data[4] == 0xCE  # the out-of-band form
    rng = random.Random(1)
    chunks = [rng.randint(1, 70_000) for _ in range(len(data) // 1000)]
    (decoded,) = decode_all(data, chunks)
    assert isinstance(decoded, Run) and isinstance(decoded.tasks[0].call, KernelCall)
    args = decoded.tasks[0].call.args
    for got, want in zip(args, arrays, strict=True):
        assert_same(got, want)
    big, medium, small = args
    for view in (big, medium):
        assert not view.flags.owndata  # a view, not a copy
        assert view.flags.writeable and view.flags.aligned
        assert view.__array_interface__["data"][0] % ALIGN == 0
    assert np.shares_memory(big.base, medium.base) or big.base.base is medium.base.base
    assert not np.shares_memory(big, medium)  # but never each other's bytes
    assert small.flags.owndata  # small arrays travel inside the body, as copies
    big[0, 0] = -1.0  # writable, and writing touches nothing else
    assert medium[0] == 1


def test_large_receive_buffers_are_mappings_of_their_own() -> None:
    """Large received values land in anonymous mappings (fresh huge pages cost more to fault
    in than ordinary ones); small ones stay NumPy arrays. Both are aligned and writable."""
    big = aligned_empty(MAPPED_MIN_BYTES)
    assert isinstance(big.base, memoryview) and isinstance(big.base.obj, mmap.mmap)
    assert big.nbytes == MAPPED_MIN_BYTES
    small = aligned_empty(MAPPED_MIN_BYTES - 1)
    assert isinstance(small.base, np.ndarray) and small.nbytes == MAPPED_MIN_BYTES - 1
    for buffer in (big, small):
        assert buffer.flags.writeable and buffer.__array_interface__["data"][0] % ALIGN == 0
        buffer[:] = 7
        assert int(buffer[-1]) == 7


def test_large_frame_received_in_pieces_is_decoded_once_complete() -> None:
    arr = np.arange(LARGE_FRAME_BYTES // 4, dtype=np.float64)
    frame = encode_message(Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=arr),)))
    tail = encode_message(Bye())
    decoder = FrameDecoder()
    step = 100_003
    for pos in range(0, len(frame), step):
        assert decoder.next_message() is None
        decoder.feed(frame[pos : pos + step] + (tail if pos + step >= len(frame) else b""))
    assert decoder.buffered_bytes == len(frame) + len(tail)
    done = decoder.next_message()
    assert isinstance(done, Done) and not done.results[0].value.flags.owndata
    np.testing.assert_array_equal(done.results[0].value, arr)
    assert decoder.next_message() == Bye()
    assert decoder.buffered_bytes == 0


def test_numpy_scalars_round_trip_with_their_dtype() -> None:
    scalars = [
        np.bool_(True),
        np.int8(-3),
        np.uint16(7),
        np.int64(-(2**62)),
        np.float16(1.5),
        np.float32(2.25),
        np.float64(np.pi),
        np.complex64(1 - 2j),
        np.complex128(3 + 4j),
    ]
    back = value_round_trip(scalars)
    for got, want in zip(back, scalars, strict=True):
        assert type(got) is type(want) and got == want


def test_a_python_complex_travels_as_complex128() -> None:
    """Refused before, while numpy's complex128 (a subclass of complex) went."""
    [got, [inner]] = value_round_trip([1 - 2j, (3.5j,)])
    assert type(got) is np.complex128 and isinstance(got, complex) and got == 1 - 2j
    assert inner == 3.5j


def test_a_large_put_travels_out_of_band_and_refs_decode_as_refs() -> None:
    value = np.arange(100_000, dtype=np.float32)
    [put] = decode_all(encode_message(Put(object_id=7, value=value)))
    assert isinstance(put, Put) and put.object_id == 7 and np.array_equal(put.value, value)
    call = KernelCall(name="sum", args=(ObjectRef(7, digest="ab", nbytes=400_000), {"w": ObjectRef(8)}))
    [run] = decode_all(encode_message(Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=call),))))
    assert isinstance(run, Run)
    assert run.tasks[0].call.args == (ObjectRef(7), {"w": ObjectRef(8)})  # ids travel; digests stay home


def test_check_value_counts_the_out_of_band_bytes_the_encoder_adds() -> None:
    """`check_value` measures without encoding: its count is the encoder's own buffer region."""
    base = np.arange(600, dtype=np.float64).reshape(20, 30)
    value = (
        np.ones(4096, dtype=np.float32),
        [base[::2, ::3], {"x": np.arange(5, dtype=np.int8)}],  # strided (made contiguous), and small (in-band)
        np.asfortranarray(base),
        np.ones(333, dtype=">i4"),  # 1332 bytes: out-of-band, and the next buffer starts aligned
        np.float32(1.5),
        "text",
    )
    oob = OobWriter()
    encode_value(value, oob, 0)
    assert check_value(value) == oob.size > 0
    assert check_value((1, 2.0, "x", np.arange(5, dtype=np.int8))) == 0  # nothing out-of-band


def test_a_bool_view_of_bytes_other_than_0_and_1_arrives_as_numpy_reads_it() -> None:
    """A 0/255 mask viewed as bool: its bytes went as they were, the receiver refused the frame
    (as it must: NumPy misreads such bools), and the host was lost and relaunched for ever."""
    mask = np.array([0, 1, 2, 255, 0, 7], dtype=np.uint8).view(bool)
    for value in (mask, mask[::2], np.tile(mask, 400)):  # small, strided, out-of-band
        back = value_round_trip(value)
        assert back.dtype == np.bool_ and back.view(np.uint8).max() <= 1
        np.testing.assert_array_equal(back, np.asarray(value).view(np.uint8) != 0)


def test_check_value_refuses_what_would_not_fit_in_a_frame_and_says_what_travels_instead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 MiB of bytes were sent, over the frame limit: the host was lost and the task sent
    again, for ever. Arrays travel beside the frame; what goes inside it is counted."""
    import batuta.protocol._values as values

    monkeypatch.setattr(values, "MAX_INBAND_BYTES", 4096)
    check_value(np.zeros(10**6), "big array")  # streamed beside the frame: fine at any size
    for value in (b"x" * 5000, "y" * 5000, [1.5] * 1000, [np.arange(4)] * 200):
        with pytest.raises(LocalProtocolError, match=r"more than one frame carries \(0 MiB\); send bulk data as numpy"):
            check_value(value, "task 'k' arguments")


def test_array_headers_made_and_read_before_still_say_each_arrays_own_dtype_and_shape() -> None:
    """The encoder and the out-of-band reader keep the headers they made and read (small array
    tasks repeat the same few): a bounded table, and a header seen before means the same."""
    from batuta.protocol import _values

    for rounds in range(2):
        for length in range(300, 300 + _values._CACHED_HEADERS + 10):  # more shapes than either table keeps
            for dtype in ("<i4", ">i4"):  # equal shapes, byte orders told apart
                arr = np.arange(length, dtype=dtype)
                back = value_round_trip(arr)
                assert back.dtype.str == dtype and back.shape == (length,), (rounds, length, dtype)
                np.testing.assert_array_equal(back, arr)
        assert len(_values._HEADERS) <= _values._CACHED_HEADERS
        assert len(_values._PARSED) <= _values._CACHED_HEADERS
    square = value_round_trip(np.ones((40, 40), dtype=np.float32))  # same bytes as a 1600-element row
    assert square.shape == (40, 40)
    assert value_round_trip(np.ones(1600, dtype=np.float32)).shape == (1600,)
